"""``esrfarm compare IN``: measure every model on the same frames of IN; write the report; print the table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from compare.spec import DEFAULT_CROP, DEFAULT_FRAMES, SCALES, CompareError, CompareSpec, Region, parse_time
from manifests.dedup import DEDUP_LEVELS, STRICT

log = logging.getLogger("esrfarm.compare")

DESCRIPTION = """\
Compare models (and the bicubic and lanczos baselines) on the same frames of INPUT and write one
self-contained HTML report (images embedded, works offline) and its JSON; the same table is printed.

One contiguous run of --frames frames is drawn (with --seed) from the window --start/--duration.
For each model:
  fidelity   the run is downscaled by --scale (antialiased bicubic), upscaled back by the model
             and compared with the original frames after a small sub-pixel shift search: PSNR and
             SSIM on luma, VMAF and VMAF NEG (libvmaf of the bundled ffmpeg);
  flicker    the real upscale's frame-to-frame change against a bicubic upscale's (1 = as steady);
  speed      frames per second of the model alone at the video's size, and the projected time
             for the whole video, on this device;
  the look   crops of the most detailed area and a before/after slider.
The best model by VMAF NEG is named, and the fastest one within 1 point of it.

With --dedup, the held frames of the run are found once, by esrfarm upscale --dedup's own detector
on the samples a job compares (whole frames, even with --region), and each model also upscales the
run as a job with --dedup would: the held frames show the upscale of the frame they repeat. Per
model, off and on side by side: frames upscaled, seconds on the run (on: the detector's time
included) and their ratio, PSNR of on against off (the worst frame, and the run as a whole: a frame
upscaled either way is the same, so it is the reused frames that lower it) and flicker of each.
It adds one upscale of the frames that are not held, per model. --dedup-level loose measures that
level of esrfarm upscale --dedup-level instead of the default strict.

Cost: each model upscales the run twice, once degraded (1/scale^2 of the pixels) and once for
real, so the time grows in proportion to --frames, to the frame's pixels (or --region's) and to
the model's cost per pixel. Measured on a 2-core CPU at 320x180 (x2): realesr-animevideov3
2.4 fps, realesrgan-x4plus-anime 0.20 fps (12x slower), realesrgan-x4plus (23 RRDB blocks)
0.066 fps (36x slower); 12 frames of 320x180 with these three and the baselines took 5 minutes,
x4plus most of it. A 1280x720 frame has 16x the pixels of 320x180. VMAF, the shift search and
the baselines add seconds. On a large video use --region (e.g. 320x180: the most detailed area
of that size) and few --frames; decoding seeks to the run, so the video's length costs nothing.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esrfarm compare", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="the video to compare the models on")
    parser.add_argument(
        "--models",
        help="comma-separated model names or .pth/.safetensors paths, and the baselines bicubic, lanczos "
        "(default: every catalog model available offline, then bicubic and lanczos)",
    )
    parser.add_argument(
        "--scale", type=int, default=2, choices=SCALES, help="the upscale to compare at (default %(default)s)"
    )
    frames = parser.add_argument_group("frames")
    frames.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_FRAMES,
        metavar="N",
        help="contiguous frames compared (default %(default)s; at least 2)",
    )
    frames.add_argument(
        "--start", type=parse_time, metavar="T", help="window start: seconds or [HH:]MM:SS[.fff]"
    )
    frames.add_argument(
        "--duration", type=parse_time, metavar="T", help="window length (default: to the end)"
    )
    frames.add_argument(
        "--region",
        type=Region.parse,
        metavar="WxH[+X+Y]",
        help="compare on this part of each frame only; without +X+Y it is placed on the most detailed area",
    )
    frames.add_argument(
        "--seed", type=int, default=0, help="draws the run's position in the window (default %(default)s)"
    )
    frames.add_argument(
        "--crop",
        type=int,
        default=DEFAULT_CROP,
        metavar="PX",
        help="edge of the crops, in output pixels (default %(default)s)",
    )
    out = parser.add_argument_group("report")
    out.add_argument("--report", type=Path, metavar="HTML", help="default: <input name>-compare.html here")
    out.add_argument("--json", type=Path, metavar="JSON", help="default: the report's path with .json")
    out.add_argument("--overwrite", action="store_true", help="replace report files that exist")
    run = parser.add_argument_group("models")
    run.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda, cuda:N")
    run.add_argument(
        "--precision", choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU"
    )
    run.add_argument(
        "--tile", type=int, default=0, metavar="PX", help="tile edge for large frames (default off)"
    )
    run.add_argument("--cpu-threads", type=int, metavar="N", help="CPU threads for models and VMAF")
    run.add_argument(
        "--dedup",
        action="store_true",
        help="also upscale the run as esrfarm upscale --dedup would and report what it changes",
    )
    run.add_argument(
        "--dedup-level",
        choices=list(DEDUP_LEVELS),
        default=STRICT,
        help="with --dedup, the level of esrfarm upscale --dedup-level to measure (default %(default)s)",
    )
    run.add_argument(
        "--no-download",
        action="store_true",
        help="skip models that are not in the cache or the offline source",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines, only the table and errors"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def spec_from_args(args: argparse.Namespace) -> CompareSpec:
    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    return CompareSpec(
        input=args.input,
        models=models,
        scale=args.scale,
        frames=args.frames,
        start=args.start,
        duration=args.duration,
        region=args.region,
        seed=args.seed,
        crop=args.crop,
        device=args.device,
        precision=args.precision,
        tile=args.tile,
        cpu_threads=args.cpu_threads,
        allow_download=not args.no_download,
        dedup=args.dedup,
        dedup_level=args.dedup_level,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    html_path: Path = args.report or Path(f"{args.input.stem}-compare.html")
    json_path: Path = args.json or html_path.with_suffix(".json")

    from compare.report import check_report_paths, write_report
    from compare.results import format_table
    from compare.run import run_comparison, runtime_settings
    from media.errors import MediaError

    try:
        spec = spec_from_args(args)
        runtime_settings(spec)
        check_report_paths(args.input, [html_path, json_path], args.overwrite)
    except (ValueError, CompareError) as exc:
        sys.stderr.write(f"esrfarm compare: error: {exc}\n")
        return 2

    try:
        report = run_comparison(spec)
        write_report(report, html_path, json_path)
    except (CompareError, MediaError, OSError) as exc:
        sys.stderr.write(f"esrfarm compare: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("esrfarm compare: interrupted; no report written\n")
        return 130
    sys.stdout.write(format_table(report) + "\n")
    sys.stdout.write(f"wrote {html_path} and {json_path} in {report.elapsed_s:.0f} s\n")
    return 0
