"""The ``esrfarm`` command.

``esrfarm upscale`` is the coordinator. ``esrfarm worker`` and ``esrfarm models`` belong to the worker
side; they run as ``python -m worker ...`` in this same process image (``exec``), so the
coordinator never imports worker code: the two sides meet only in ``manifests`` and on disk/HTTP.
``esrfarm compare`` runs as ``python -m compare ...`` the same way (that package sits above both).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

from coordinator.job import (
    DEFAULT_MODEL,
    JobError,
    JobProgress,
    UpscaleSettings,
    default_shared_root,
    run_upscale,
)
from manifests.layout import FrameFormat
from manifests.tokens import TOKEN_ENV, read_token

WORKER_COMMANDS = {"worker": [], "models": ["models"]}

log = logging.getLogger("esrfarm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esrfarm",
        description="Upscale videos with Real-ESRGAN on a farm of GPU worker processes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser(
        "upscale",
        help="upscale one video file",
        description=(
            "Upscale INPUT into OUTPUT: probe it, extract its frames into a job directory under the "
            "shared root, upscale them on the workers, and encode the result once, carrying over every "
            "audio stream (copied), subtitles, chapters, metadata, timing and colour. Without --workers, "
            "local workers are started (one per GPU, or one on the CPU) and stopped afterwards."
        ),
    )
    up.add_argument("input", type=Path, help="the video to upscale")
    up.add_argument("output", type=Path, help="the file to write (its extension picks the container)")
    up.add_argument("--scale", type=float, help="output scale, e.g. 2, 3 or 4 (default: the model's own, 4)")
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
        help="extra flag for local workers, repeatable (e.g. --worker-arg=--cpu-threads=1)",
    )
    up.add_argument(
        "--tile", type=int, help="tile edge in pixels for frames too large for GPU memory (default off)"
    )
    up.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="local workers' precision")
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
        choices=[f.value for f in FrameFormat],
        default=FrameFormat.PNG.value,
        help="frame files on shared storage: png (compact) or npy (raw, fast) (default %(default)s)",
    )
    work.add_argument(
        "--keep-frames",
        action="store_true",
        help="keep the job directory and every upscaled frame after success (then --max-disk cannot hold)",
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
    up.add_argument(
        "--stats", type=Path, metavar="FILE", help="write stage timings (JSON) here after success"
    )
    up.add_argument("-q", "--quiet", action="store_true", help="no progress, warnings and errors only")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub.add_parser("worker", help="run one worker service (see: esrfarm worker --help)", add_help=False)
    sub.add_parser("models", help="list and fetch models (see: esrfarm models --help)", add_help=False)
    sub.add_parser(
        "compare", help="compare models on your video (see: esrfarm compare --help)", add_help=False
    )
    return parser


class ProgressPrinter:
    """A one-line progress bar on a terminal; a log line every ``interval_s`` otherwise."""

    def __init__(self, stream: TextIO, interval_s: float = 10.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_s = interval_s
        self.last_line = 0.0
        self.last_stage = ""

    def __call__(self, p: JobProgress) -> None:
        eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
        text = f"{p.stage:8s} {p.done}/{p.total} frames  {p.fps:.2f} fps  ETA {eta}"
        if self.tty:
            width = 30
            filled = int(width * p.done / p.total) if p.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if p.done >= p.total:
                self.stream.write("\n")
            self.stream.flush()
            return
        now = time.monotonic()
        if p.stage != self.last_stage or now - self.last_line >= self.interval_s or p.done >= p.total:
            log.info("progress: %s", text)
            self.last_line, self.last_stage = now, p.stage


def settings_from_args(args: argparse.Namespace) -> UpscaleSettings:
    from coordinator.encode import EncodeSettings
    from manifests.chunks import parse_size

    token = read_token(args.token_file)
    workers = tuple(u.strip().rstrip("/") for u in (args.workers or "").split(",") if u.strip())
    encode = EncodeSettings.for_codec(
        args.codec,
        crf=args.crf,
        preset=args.preset,
        pix_fmt=args.pix_fmt,
        extra_args=tuple(shlex.split(args.encoder_args)),
    )
    return UpscaleSettings(
        input=args.input,
        output=args.output,
        scale=args.scale,
        model=args.model,
        workers=workers,
        local_workers=args.local_workers,
        local_worker_args=tuple(args.worker_arg),
        shared_root=args.shared_root,
        batch_size=args.batch_size,
        tile=args.tile,
        precision=args.precision,
        max_disk=parse_size(args.max_disk),
        max_chunk_frames=args.chunk_frames,
        encoders=args.encoders,
        frame_format=FrameFormat(args.frame_format),
        encode=encode,
        overwrite=args.overwrite,
        keep_frames=args.keep_frames,
        token=token,
        unreachable_after_s=args.unreachable_timeout,
        health_interval_s=min(2.0, args.unreachable_timeout / 4),
        stats_file=args.stats,
        stale_after_s=args.stale_timeout,
    )


def upscale_main(args: argparse.Namespace) -> int:
    from coordinator.errors import MediaError

    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        settings = settings_from_args(args)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"esrfarm upscale: error: {exc}\n")
        return 2
    progress = None if args.quiet else ProgressPrinter(sys.stderr)
    started = time.monotonic()
    try:
        info = asyncio.run(run_upscale(settings, progress))
    except (JobError, MediaError) as exc:
        sys.stderr.write(f"esrfarm upscale: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("esrfarm upscale: interrupted\n")
        return 130
    if not args.quiet:
        elapsed = time.monotonic() - started
        sys.stderr.write(
            f"wrote {settings.output}: {info.frame_count} frames in {elapsed:.1f} s "
            f"({info.frame_count / elapsed:.2f} fps end to end)\n"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in WORKER_COMMANDS:
        worker_argv = [sys.executable, "-m", "worker", *WORKER_COMMANDS[args_list[0]], *args_list[1:]]
        sys.stdout.flush()
        os.execv(sys.executable, worker_argv)
    if args_list and args_list[0] == "compare":
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "compare", *args_list[1:]])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "upscale":
        return upscale_main(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
