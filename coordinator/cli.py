"""The ``esrfarm`` command.

``esrfarm upscale`` is the coordinator. The other commands belong to other packages and run as
``python -m <package> ...`` in this same process image (``exec``), so the coordinator never imports
them: ``esrfarm worker`` and ``esrfarm models`` are the worker side (the two sides meet only in
``manifests`` and on disk/HTTP), ``esrfarm compare`` sits above both, and so does the job service
(``esrfarm serve`` and its clients ``submit``, ``jobs``, ``show``, ``cancel``, ``retry``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TextIO

import orjson

from coordinator.errors import EXPECTED_ERRORS, JobCancelledError, SpecError
from coordinator.events import Failed, JobEvent, JobResult, Progress, Started
from coordinator.spec import DEFAULT_MODEL, FarmSettings, JobSpec, default_shared_root
from manifests.dedup import DEDUP_LEVELS, STRICT
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat
from manifests.manifest import BACKENDS
from manifests.ranges import DEFAULT_SEGMENT_FRAMES
from manifests.segment import FRAMES_TRANSPORT, TRANSPORTS
from manifests.tokens import TOKEN_ENV, read_token

#: Subcommands of other packages: command -> the ``python -m`` argument list that runs them.
EXEC_COMMANDS = {
    "worker": ["worker"],
    "models": ["worker", "models"],
    "compare": ["compare"],
    "serve": ["service", "serve"],
    **{name: ["service", name] for name in ("submit", "jobs", "show", "cancel", "retry")},
}

#: The flag behind each JobSpec / FarmSettings field, for error messages.
FLAGS = {
    "model": "--model", "scale": "--scale", "tile": "--tile", "precision": "--precision",
    "backend": "--backend", "batch_size": "--batch-size", "frame_format": "--frame-format",
    "max_disk": "--max-disk",
    "max_chunk_frames": "--chunk-frames", "encoders": "--encoders", "workers": "--workers",
    "local_workers": "--local-workers", "shared_root": "--shared-root", "ray_address": "--ray",
    "ray_workers": "--ray-workers",
    "unreachable_after_s": "--unreachable-timeout", "stale_after_s": "--stale-timeout",
    "transport": "--transport", "segment_frames": "--segment-frames", "dedup": "--dedup",
    "dedup_level": "--dedup-level",
}  # fmt: skip

log = logging.getLogger("esrfarm")


def version() -> str:
    try:
        return metadata.version("esrfarm")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esrfarm",
        description="Upscale videos with Real-ESRGAN on a farm of GPU worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"esrfarm {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser(
        "upscale",
        help="upscale a video, an image or a folder of images",
        description=(
            "Upscale INPUT into OUTPUT: probe it, extract its frames into a job directory under the "
            "shared root, upscale them on the workers, and encode the result once, carrying over every "
            "audio stream (copied), subtitles, chapters, metadata, timing and colour (with --transport "
            "segments the workers decode and encode ranges of the source instead). Without --workers, "
            "local workers are started (one per GPU, or one on the CPU) and stopped afterwards. "
            "Interrupted (Ctrl-C, SIGTERM, a crash), the same command resumes the job."
        ),
    )
    up.add_argument("input", type=Path, help="the video to upscale (or an image, or a folder of images)")
    up.add_argument(
        "output",
        type=Path,
        help="the file to write: its extension picks the container (.mp4, .mkv, ...) or, for images, the "
        "image format (.png, .jpg, .webp, ...); for a folder of images, a folder",
    )
    up.add_argument(
        "--scale",
        type=float,
        help="output scale, 1/16 to 16, e.g. 2, 3 or 4 (default: the model's own, 4); above the model's own "
        "its output is resized, with a warning",
    )
    up.add_argument(
        "--model",
        default=os.environ.get("ESRFARM_MODEL", DEFAULT_MODEL),
        help="model name (see 'esrfarm models list') or .pth/.safetensors path (default %(default)s)",
    )
    where = up.add_argument_group("workers")
    where.add_argument(
        "--workers",
        help="comma-separated worker URLs (http://host:8090,...) already running; needs --shared-root",
    )
    where.add_argument(
        "--local-workers", type=int, metavar="N", help="start N local workers (default: one per GPU)"
    )
    where.add_argument(
        "--ray",
        metavar="auto|ADDRESS",
        help="start the workers as actors on a Ray cluster (auto: the one this host belongs to; or its "
        "address, host:port); every node must mount the shared root at the same path and have esrfarm "
        "installed with the [ray] extra",
    )
    where.add_argument(
        "--ray-workers",
        type=int,
        metavar="N",
        help="how many worker actors (default: one per GPU of the cluster; on a CPU-only cluster one per "
        "esrfarm_worker resource, else 1)",
    )
    where.add_argument(
        "--shared-root",
        type=Path,
        default=os.environ.get("ESRFARM_SHARED_ROOT"),
        help="directory shared with the workers (env ESRFARM_SHARED_ROOT; "
        f"with local workers the default is {default_shared_root()})",
    )
    where.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the workers' bearer token (or set {TOKEN_ENV})",
    )
    where.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for local (or Ray) workers, repeatable (e.g. --worker-arg=--cpu-threads=1)",
    )
    up.add_argument(
        "--tile", type=int, help="tile edge in pixels for frames too large for GPU memory (default off)"
    )
    up.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="local workers' precision")
    up.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="the workers' backend: torch (CUDA or the CPU) or ncnn (any Vulkan GPU); local workers are "
        "started on it, given workers of another backend are not used (default %(default)s)",
    )
    work = up.add_argument_group("work")
    work.add_argument("--batch-size", type=int, default=8, help="frames per batch (default %(default)s)")
    work.add_argument(
        "--max-disk",
        default="4G",
        metavar="SIZE",
        help="most frame data on disk at once, e.g. 4G or 512M (default %(default)s); the video streams "
        "through in chunks that fit",
    )
    work.add_argument(
        "--chunk-frames",
        type=int,
        default=256,
        metavar="N",
        help="most frames in one chunk (default %(default)s)",
    )
    work.add_argument(
        "--encoders", type=int, metavar="N", help="segments encoded at once (default: by CPU count)"
    )
    work.add_argument(
        "--frame-format",
        choices=["auto", *(f.value for f in FrameFormat)],
        default="auto",
        help="frame files on shared storage: yuv (the decoder's own 4:2:0 samples, converted on the "
        "workers' device: fastest), npy (raw RGB), png (compact, slow; for slow network storage); "
        "auto: yuv where the source and output allow it, else npy (default %(default)s)",
    )
    work.add_argument(
        "--keep-frames",
        action="store_true",
        help="keep the job directory and every upscaled frame after success (then --max-disk cannot hold)",
    )
    work.add_argument(
        "--dedup",
        action="store_true",
        help="upscale a held frame once: a frame that repeats the last upscaled one (up to compression "
        "noise) reuses its upscaled frame; every frame and timestamp is kept (videos only; README: --dedup)",
    )
    work.add_argument(
        "--dedup-level",
        choices=list(DEDUP_LEVELS),
        default=STRICT,
        help="with --dedup, how close a repeat must be: strict never reused a frame that changed in "
        "our measurements, but upscales some repeats of heavily compressed video again; loose catches "
        "those too and may reuse a faint change (about 3 levels over a 16x16 area); default %(default)s",
    )
    work.add_argument(
        "--transport",
        choices=list(TRANSPORTS),
        default=FRAMES_TRANSPORT,
        help="how frames reach the workers: frames (this host decodes and encodes; raw frames cross "
        "the shared storage) or segments (each worker decodes a range of the source on the shared root "
        "and encodes it: only compressed video crosses it; for many hosts on NFS; README: Choosing a "
        "transport) (default %(default)s)",
    )
    work.add_argument(
        "--segment-frames",
        type=int,
        default=DEFAULT_SEGMENT_FRAMES,
        metavar="N",
        help="--transport segments: source frames per worker range (rounded up to whole batches), one "
        "segment file each, redone from its start if its worker fails (default %(default)s)",
    )
    work.add_argument(
        "--unreachable-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a worker's /health may fail before its batches go elsewhere (default %(default)s)",
    )
    work.add_argument(
        "--stale-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a worker's status may stand still before its batches go elsewhere "
        "(default %(default)s)",
    )
    enc = up.add_argument_group("encoding")
    enc.add_argument(
        "--codec", default="libx264", help="libx264 (default), libx265, libsvtav1, ffv1, *_nvenc"
    )
    enc.add_argument("--crf", type=int, help="quality (default: per codec, libx264 18)")
    enc.add_argument("--preset", help="encoder preset (default: per codec, libx264 medium)")
    enc.add_argument("--pix-fmt", help="output pixel format (default yuv420p)")
    enc.add_argument(
        "--encoder-args",
        default="",
        metavar="ARGS",
        help='extra ffmpeg output options, e.g. "-tune animation -x264-params aq-mode=3"',
    )
    enc.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    shown = up.add_argument_group("output on the terminal")
    shown.add_argument(
        "--stats", type=Path, metavar="FILE", help="write stage timings (JSON) here after success"
    )
    shown.add_argument(
        "--events",
        choices=["jsonl"],
        help="print the job's events on stdout, one JSON object per line (progress, worker_lost, "
        "batch_failed, segment_done, then finished, failed or cancelled), instead of the progress bar",
    )
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bar; errors and warnings only")
    shown.add_argument(
        "-v", "--verbose", action="count", default=0, help="log what happens (-v: info, -vv: debug)"
    )
    sub.add_parser("worker", help="run one worker service (see: esrfarm worker --help)", add_help=False)
    sub.add_parser("models", help="list and fetch models (see: esrfarm models --help)", add_help=False)
    sub.add_parser(
        "compare", help="compare models on your video (see: esrfarm compare --help)", add_help=False
    )
    sub.add_parser("serve", help="run the job service (see: esrfarm serve --help)", add_help=False)
    for name, text in (
        ("submit", "queue jobs on a running service"), ("jobs", "list the service's jobs"),
        ("show", "one job of the service"), ("cancel", "cancel a job"), ("retry", "queue a job again"),
    ):  # fmt: skip
        sub.add_parser(name, help=f"{text} (see: esrfarm {name} --help)", add_help=False)
    return parser


#: A progress bar's format: a stage with a count, and one without (probing, loading the model: its
#: name and time, no empty bar). Also the service client's (service/cli.py, submit --wait).
BAR_COUNTED = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
BAR_UNCOUNTED = "{desc} ... {elapsed}"


class ProgressDisplay:
    """The job's progress on stderr: one bar that updates in place (tqdm) on a terminal, a log line
    per stage and every ``interval_s`` otherwise. (Warnings are log records; the CLI routes them
    through the bar so they never break it.)"""

    def __init__(self, stream: TextIO, *, interval_s: float = 10.0, bar: bool | None = None) -> None:
        self.stream = stream
        self.bar_enabled = stream.isatty() if bar is None else bar
        self.interval_s = interval_s
        self._bar: object | None = None
        self._stage = ""
        self._last_line = 0.0
        self._drawn = False

    def __call__(self, event: JobEvent) -> None:
        if isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, Started) and event.run > 1:
            self.note(
                f"resuming the job in {event.job_dir} (run {event.run}): what earlier runs finished is kept"
            )
        elif isinstance(event, Failed):
            self.close()

    def note(self, line: str) -> None:
        """A line for the user, above the bar if one is shown."""
        if self.bar_enabled:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")

    def _progress(self, p: Progress) -> None:
        if not self.bar_enabled:
            if not p.total:
                return  # a stage without a count (probing, loading the model) makes no log line
            now = time.monotonic()
            if p.stage != self._stage or now - self._last_line >= self.interval_s or p.done >= p.total:
                log.info("progress: %s", describe(p))
                self._stage, self._last_line = p.stage, now
            return
        from tqdm import tqdm

        bar = self._bar
        if not isinstance(bar, tqdm) or p.stage != self._stage:
            self.close()
            unit = "segment" if p.stage == "joining" else "frame"
            bar = tqdm(
                total=p.total or None, desc=f"{p.stage:13s}", unit=unit, file=self.stream,
                dynamic_ncols=self._sized(), ncols=None if self._sized() else 100, leave=False,
                bar_format=BAR_COUNTED if p.total else BAR_UNCOUNTED,
            )  # fmt: skip
            self._bar, self._stage, self._drawn = bar, p.stage, False
        if (bar.n, bar.total) == (p.done, p.total or None) and self._drawn:
            return  # nothing new to show
        self._drawn = True
        bar.n = p.done
        eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
        rate = f"{p.fps:.2f} fps, ETA {eta}" if p.fps > 0 else (f"ETA {eta}" if p.eta_s is not None else "")
        bar.set_postfix_str(rate, refresh=False)
        bar.refresh()

    def _sized(self) -> bool:
        """Whether the terminal tells its width (a pseudo-terminal may say 0 columns)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns > 0
        except (OSError, ValueError, AttributeError):
            return False

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]


def summary(result: JobResult, elapsed_s: float) -> str:
    """``3 frames in 2.0 s (1.50 fps end to end)``, the last line of a run; a resumed run's rate
    counts only the frames it upscaled itself."""
    frames = f"{result.frames} {'frame' if result.frames == 1 else 'frames'}"
    now = result.frames_upscaled
    if not result.resumed or not result.frames_found:
        return f"{frames} in {elapsed_s:.1f} s ({result.frames / elapsed_s:.2f} fps end to end)"
    return (
        f"{frames}, resumed: {result.frames_found} upscaled by an earlier run, {now} in this run's "
        f"{elapsed_s:.1f} s ({now / elapsed_s:.2f} fps end to end)"
    )


def describe(p: Progress) -> str:
    eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
    if not p.total:
        return p.stage
    return f"{p.stage} {p.done}/{p.total}  {p.fps:.2f} fps  ETA {eta}"


def settings_from_args(args: argparse.Namespace) -> tuple[JobSpec, FarmSettings]:
    """The CLI's flags as a job spec and farm settings; raises :class:`SpecError` or ValueError."""
    from manifests.chunks import parse_size
    from media.encode import EncodeSettings

    encode = EncodeSettings.for_codec(
        args.codec,
        crf=args.crf,
        preset=args.preset,
        pix_fmt=args.pix_fmt,
        extra_args=tuple(shlex.split(args.encoder_args)),
    )
    spec = JobSpec(
        input=args.input,
        output=args.output,
        scale=args.scale,
        model=args.model,
        batch_size=args.batch_size,
        tile=args.tile,
        precision=args.precision,
        backend=args.backend,
        max_disk=parse_size(args.max_disk),
        max_chunk_frames=args.chunk_frames,
        encoders=args.encoders,
        frame_format=None if args.frame_format == "auto" else FrameFormat(args.frame_format),
        encode=encode,
        overwrite=args.overwrite,
        keep_frames=args.keep_frames,
        dedup=args.dedup,
        dedup_level=args.dedup_level,
        transport=args.transport,
        segment_frames=args.segment_frames,
    )
    return spec, farm_settings_from_args(args, read_token(args.token_file))


def farm_settings_from_args(args: argparse.Namespace, token: str | None) -> FarmSettings:
    """The farm flags (--workers, --local-workers, --worker-arg, --shared-root, --unreachable-timeout,
    --stale-timeout) as settings; ``esrfarm serve`` takes the same flags."""
    return FarmSettings(
        workers=tuple((args.workers or "").split(",")),
        local_workers=args.local_workers,
        local_worker_args=tuple(args.worker_arg),
        ray_address=args.ray,
        ray_workers=args.ray_workers,
        shared_root=args.shared_root,
        token=token,
        unreachable_after_s=args.unreachable_timeout,
        health_interval_s=min(2.0, args.unreachable_timeout / 4),
        stale_after_s=args.stale_timeout,
    )


def upscale_main(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        spec, farm = settings_from_args(args)
    except SpecError as exc:
        flag = FLAGS.get(exc.field, exc.field)
        sys.stderr.write(f"esrfarm upscale: error: {flag} {exc.problem}\n")
        return 2
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"esrfarm upscale: error: {exc}\n")
        return 2
    display: ProgressDisplay | None = None
    on_event: Callable[[JobEvent], None] | None = None
    if args.events == "jsonl":
        on_event = _print_jsonl
    elif not args.quiet:
        display = on_event = ProgressDisplay(sys.stderr)
        if not display.bar_enabled:  # not a terminal: progress as log lines
            log.setLevel(min(level, logging.INFO))
    started = time.monotonic()
    try:
        with _logs_around(display):
            result = asyncio.run(_upscale_until_signalled(spec, farm, on_event))
    except JobCancelledError as exc:
        kept = f"its files are kept in {exc.job_dir}; " if exc.job_dir else ""
        sys.stderr.write(f"esrfarm upscale: interrupted ({kept}the same command resumes it)\n")
        return 130
    except EXPECTED_ERRORS as exc:
        sys.stderr.write(f"esrfarm upscale: error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"esrfarm upscale: error: {exc}\n")
        return 1
    finally:
        if display is not None:
            display.close()
    if args.stats is not None:
        try:
            write_json_atomic(args.stats, orjson.dumps({"frames": result.frames, **result.stats}))
        except OSError as exc:  # the video is written; a stats file that cannot be is only a warning
            log.warning("could not write the stats file %s: %s", args.stats, exc)
    if not args.quiet and args.events is None:
        elapsed = time.monotonic() - started
        sys.stderr.write(f"wrote {spec.output}: {summary(result, elapsed)}\n")
    return 0


def _logs_around(display: ProgressDisplay | None) -> contextlib.AbstractContextManager[None]:
    """While a bar is shown, log lines are printed above it instead of through it."""
    if display is None or not display.bar_enabled:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _print_jsonl(event: JobEvent) -> None:
    sys.stdout.write(orjson.dumps(event.to_dict()).decode() + "\n")
    sys.stdout.flush()


async def _upscale_until_signalled(
    spec: JobSpec, farm: FarmSettings, on_event: Callable[[JobEvent], None] | None
) -> JobResult:
    """The job, cancelled cleanly on SIGINT or SIGTERM (workers reset, ffmpeg killed, job kept)."""
    from coordinator.job import upscale

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await upscale(spec, farm, on_event=on_event, stop=stop)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in EXEC_COMMANDS:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", *EXEC_COMMANDS[args_list[0]], *args_list[1:]])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "upscale":
        return upscale_main(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
