"""What ``--dedup`` saves and what it costs, on clips built from real footage.

From one video (Big Buck Bunny here) it builds, at ``--size``:

- held2/held3 at CRF 18 and 28: every frame held for 2 or 3 frames (animation on twos and threes),
  re-encoded with libx264, so repeats are near, not exact;
- pan: a window moving 1 pixel per frame over a still frame of the full-size video;
- fade: that still frame fading out to black over the whole clip (about 2 levels a frame at most);
- square: that still frame where only a 16x16 area changes every fourth frame (a grey box at 30 %);
- faint: the same with the box at 10 %;
- pan, fade, square and faint are at CRF 18, and again at CRF 28 (``-crf28``).

With ``--detector-only`` only the detector runs, on each clip's frames as a job with YUV frames
decodes them (seconds per clip): the frames it would upscale, and the reused frames whose picture
differs by construction, with the largest window score among them.

Each ``--level`` (``--dedup-level``; default: every level) is measured on every clip.

Otherwise each clip is upscaled by ``esrfarm upscale`` with ``--dedup`` off and on, on the same running
workers, to a lossless output (libx264 CRF 0, so the frames compared are the upscaled frames). The
model is deterministic (seeded weights; ``--model`` for another), so off against off is identical
(infinite PSNR): any finite PSNR of on against off is a reused frame. Per clip, one JSON line: the
fraction of frames upscaled, seconds off and on, the minimum per-frame PSNR of on against off (RGB),
and flicker (``compare``'s temporal energy of on over off's: below 1 is steadier).

    python benchmarks/dedup.py ../shared/media/bigbuckbunny.mp4 --size 320x180 --frames 132
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.pipeline import running_workers, time_upscale  # noqa: E402
from compare.metrics import flicker_ratio, psnr, temporal_energy  # noqa: E402
from coordinator.dedup import DuplicateFinder  # noqa: E402
from manifests.dedup import DEDUP_FILE, DEDUP_LEVELS, DuplicateMap, dedup_level  # noqa: E402
from media.extract import decode_frames  # noqa: E402
from media.probe import probe  # noqa: E402
from tests import clips  # noqa: E402
from tests.model_factory import compact_state_dict, write_official, write_tiny_compact  # noqa: E402

LOSSLESS = ["--codec", "libx264", "--crf", "0", "--preset", "ultrafast"]


def build_clips(source: Path, work: Path, size: str, frames: int) -> dict[str, Path]:
    still = clips.still_image(work / "still.png", source=source, at=60)
    made: dict[str, Callable[[], Path]] = {
        f"held{hold}-crf{crf}": (
            lambda hold=hold, crf=crf: clips.held_video(
                work / f"held{hold}-{crf}.mp4", source, hold=hold, frames=frames, size=size, crf=crf
            )
        )
        for hold in (2, 3)
        for crf in (18, 28)
    }
    for crf in (18, 28):
        tail = "" if crf == 18 else f"-crf{crf}"
        made[f"pan{tail}"] = lambda t=tail, c=crf: clips.pan_video(
            work / f"pan{t}.mp4", still, size=size, frames=frames, crf=c
        )
        made[f"fade{tail}"] = lambda t=tail, c=crf: clips.fade_video(
            work / f"fade{t}.mp4", still, size=size, frames=frames, crf=c
        )
        for kind, opacity in (("square", 0.3), ("faint", 0.1)):
            made[f"{kind}{tail}"] = lambda k=kind, o=opacity, t=tail, c=crf: clips.small_change_video(
                work / f"{k}{t}.mp4", still, size=size, frames=frames, crf=c, opacity=o
            )
    return {name: make() for name, make in made.items()}


def detect(name: str, clip: Path, level: str) -> dict[str, object]:
    """The detector alone on ``clip``'s YUV frames (one chunk): what it would upscale and reuse."""
    picture = PICTURES[name.split("-")[0]]
    finder = DuplicateFinder(yuv=True, level=dedup_level(level))
    upscaled, count, wrong = 0, 0, []
    for count, frame in enumerate(decode_frames(probe(clip), yuv=True), start=1):
        reference = finder.reference_of(count, frame)
        if reference is None:
            upscaled += 1
        elif picture(count) != picture(reference):
            wrong.append(finder.differences[-1])
    return {
        "clip": name,
        "level": level,
        "frames": count,
        "upscaled": upscaled,
        "upscaled_fraction": round(upscaled / count, 3),
        "reused_across_pictures": len(wrong),
        "largest_window_of_those": round(max((d.window for d in wrong), default=0.0), 2),
        "largest_shift_of_those": round(max((abs(d.shift) for d in wrong), default=0.0), 3),
    }


def measure(
    name: str, clip: Path, urls: list[str], root: Path, model: str, scale: str, work: Path, level: str
) -> dict[str, object]:
    off, on = work / f"{name}-off.mkv", work / f"{name}-on-{level}.mkv"
    stats = work / f"{name}-stats.json"
    seconds_off = time_upscale(clip, off, urls, root, model, scale, *LOSSLESS)
    on_args = ["--dedup", "--dedup-level", level, "--keep-frames", "--stats", str(stats)]
    seconds_on = time_upscale(clip, on, urls, root, model, scale, *LOSSLESS, *on_args)
    job_dir = next(p.parent for p in (root / "jobs").glob(f"*/{DEDUP_FILE}"))
    dedup = DuplicateMap.from_json((job_dir / DEDUP_FILE).read_bytes())
    shutil.rmtree(job_dir)
    picture = PICTURES[name.split("-")[0]]
    wrong = [f for f, r in dedup.duplicates.items() if picture(f) != picture(r)]
    frames_off = np.stack(list(decode_frames(off)))
    frames_on = np.stack(list(decode_frames(on)))
    worst = min(psnr(a, b) for a, b in zip(frames_on, frames_off, strict=True))
    upscaled = orjson.loads(stats.read_bytes())["frames_upscaled"]
    # A reused frame whose picture differs by construction (in held clips: source frames that may
    # themselves be near-identical), and the worst PSNR among those frames.
    across = [psnr(frames_on[f - 1], frames_off[f - 1]) for f in wrong]
    return {
        "clip": name,
        "level": level,
        "frames": len(frames_off),
        "upscaled": upscaled,
        "upscaled_fraction": round(upscaled / len(frames_off), 3),
        "seconds_off": round(seconds_off, 1),
        "seconds_on": round(seconds_on, 1),
        "min_psnr_db": _db(worst),
        "reused_across_pictures": len(wrong),
        "min_psnr_of_those_db": _db(min(across, default=math.inf)),
        "flicker_on_over_off": round(
            flicker_ratio(temporal_energy(frames_on), temporal_energy(frames_off)), 3
        ),
    }


#: Per clip kind, which picture frame ``f`` (1-based) shows by construction.
PICTURES: dict[str, Callable[[int], int]] = {
    "held2": lambda f: (f - 1) // 2,
    "held3": lambda f: (f - 1) // 3,
    "pan": lambda f: f,
    "fade": lambda f: f,
    "square": lambda f: (f - 1) // 4,
    "faint": lambda f: (f - 1) // 4,
}


def _db(value: float) -> float | str:
    return "inf" if math.isinf(value) else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("--size", default="320x180")
    parser.add_argument("--frames", type=int, default=132)
    parser.add_argument("--scale", default="2")
    parser.add_argument("--model", help="a model file or name (default: a tiny seeded SRVGGNetCompact)")
    parser.add_argument(
        "--full-size-model",
        action="store_true",
        help="a seeded SRVGGNetCompact of realesr-animevideov3's size (64 features, 16 convs): its cost",
    )
    parser.add_argument("--only", nargs="*", help="clip names to run (default: all)")
    parser.add_argument(
        "--level",
        nargs="+",
        choices=list(DEDUP_LEVELS),
        default=list(DEDUP_LEVELS),
        help="the --dedup-level(s) to measure, each on every clip (default: all)",
    )
    parser.add_argument(
        "--detector-only", action="store_true", help="run the detector alone on each clip (no upscale)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="esrfarm-dedup-") as temp:
        work = Path(temp)
        if args.detector_only:
            for name, clip in build_clips(args.source, work, args.size, args.frames).items():
                for level in args.level if not args.only or name in args.only else ():
                    print(orjson.dumps(detect(name, clip, level)).decode(), flush=True)
            return 0
        if args.full_size_model:
            state = compact_state_dict(num_feat=64, num_conv=16, seed=0)
            model = str(write_official(work / "compact-x4.pth", state, key="params"))
        else:
            model = args.model or str(write_tiny_compact(work / "tiny-x4.pth"))
        made = build_clips(args.source, work, args.size, args.frames)
        with running_workers(1, work / "root", model, ["--cpu-threads", "2"], work / "logs") as urls:
            for name, clip in made.items():
                for level in args.level if not args.only or name in args.only else ():
                    row = measure(name, clip, urls, work / "root", model, args.scale, work, level)
                    print(orjson.dumps(row).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
