"""``esrfarm worker`` / ``python -m worker``: serve one model on one device (``... models``: weights)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from manifests.manifest import BACKENDS
from manifests.tokens import TOKEN_ENV, TokenError, read_token
from worker.models import DEFAULT_MODEL
from worker.settings import (
    DEFAULT_HOST,
    DEFAULT_MAX_OUTPUT_PIXELS,
    DEFAULT_PORT,
    PART_FRAMES_OF_LARGEST,
    SettingsError,
    WorkerSettings,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="esrfarm worker",
        description=(
            "Serve Real-ESRGAN upscaling for one GPU over HTTP: load the model once, then process the "
            "manifests the coordinator posts, reading and writing frames under the shared root. "
            "'esrfarm worker models ...' lists and fetches model weights."
        ),
    )
    parser.add_argument(
        "--shared-root",
        type=Path,
        default=env.get("ESRFARM_SHARED_ROOT"),
        required="ESRFARM_SHARED_ROOT" not in env,
        help="the storage directory shared with the coordinator (env ESRFARM_SHARED_ROOT)",
    )
    parser.add_argument(
        "--model",
        default=env.get("ESRFARM_MODEL", DEFAULT_MODEL),
        help="catalog name or path to a .pth/.safetensors file (env ESRFARM_MODEL; default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=env.get("ESRFARM_BACKEND") or "torch",
        help="torch: CUDA (NVIDIA) or the CPU; ncnn: any Vulkan device (AMD, Intel, Apple through "
        "MoltenVK, NVIDIA, lavapipe on the CPU), fp16 where the device has it (env ESRFARM_BACKEND; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--host", default=env.get("ESRFARM_HOST", DEFAULT_HOST), help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default %(default)s)"
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help="added to --port (systemd passes the GPU index)",
    )
    parser.add_argument("--port-file", type=Path, help='write {"port", "url", "pid"} here once listening')
    device = parser.add_mutually_exclusive_group()
    device.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        help="torch: CUDA device index among the visible ones; ncnn: Vulkan device index (default "
        "ESRFARM_VULKAN_DEVICE, else 0)",
    )
    device.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"] + [f"cuda:{i}" for i in range(16)],
        metavar="DEVICE",
        help="torch only: auto (default: first visible GPU, else the CPU), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--precision",
        choices=["fp16", "bf16", "fp32"],
        help="default fp16 on CUDA, fp32 on the CPU; ncnn: fp16 where the device has it, or fp32",
    )
    parser.add_argument("--scale", type=float, help="output scale (default: the model's own)")
    parser.add_argument(
        "--tile", type=int, default=0, help="tile edge in input pixels; 0 = whole frames (default)"
    )
    parser.add_argument(
        "--tile-pad", type=int, default=10, help="context pixels around each tile (default %(default)s)"
    )
    parser.add_argument("--max-batch", type=int, help="frames per forward pass (default: per device)")
    parser.add_argument("--cpu-threads", type=int, help="torch threads on the CPU")
    parser.add_argument(
        "--no-download", action="store_true", help="never download weights; offline sources only"
    )
    parser.add_argument("--worker-id", help="name in status files (default <hostname>:<port>)")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=env.get("ESRFARM_WORKER_TOKEN_FILE") or None,
        help="file holding the bearer token (env ESRFARM_WORKER_TOKEN_FILE, or the token itself in "
        f"{TOKEN_ENV}); required when binding a non-loopback address",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up batch after loading")
    parser.add_argument(
        "--warmup-size", type=int, default=64, help="edge of the warm-up frame (default %(default)s)"
    )
    parser.add_argument(
        "--io-threads", type=int, default=4, help="threads reading/writing one batch's frames"
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not sync a batch's output frames to disk (one syncfs per batch) before reporting it "
        "done (faster on slow disks; a power loss can then lose frames a status file calls written)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=90.0,
        help="seconds the batch in flight may take after SIGTERM",
    )
    limits = parser.add_argument_group(
        "limits",
        "What one manifest, frame or client may take. A frame above --max-output-pixels fails its batch "
        "with a message; a batch whose output would exceed "
        f"{PART_FRAMES_OF_LARGEST} x --max-output-pixels is read, upscaled and written in parts.",
    )
    limits.add_argument(
        "--max-output-pixels",
        type=pixel_count,
        default=DEFAULT_MAX_OUTPUT_PIXELS,
        metavar="N|WxH",
        help="largest upscaled frame, in pixels (default 8192x8192 = 67 Mpx, ~200 MB as raw RGB); "
        "larger input frames are refused, before they are decoded",
    )
    limits.add_argument(
        "--pixel-budget",
        type=pixel_count,
        metavar="N|WxH",
        help="most input pixels one forward pass takes: batches are split and larger frames tiled "
        "to fit, so memory follows it (default 2048x1024 on the CPU; none on CUDA, where running out of "
        "memory shrinks batches, then tiles)",
    )
    limits.add_argument(
        "--max-manifest-bytes",
        type=int,
        default=8 << 20,
        metavar="N",
        help="largest manifest file read (default %(default)s); manifests are read only if they are "
        "regular files",
    )
    limits.add_argument(
        "--max-request-bytes", type=int, default=64 * 1024, help="largest request body accepted"
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="open connections at most (default %(default)s, lowered to fit the descriptor limit); a "
        "new one beyond closes the oldest with no request in progress",
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a connection has to send whole request headers, from connecting or from its "
        "previous answer (also the keep-alive idle time; default %(default)s)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a request body may take to arrive (default %(default)s)",
    )
    parser.add_argument(
        "--simulate-latency-ms",
        type=float,
        metavar="MS",
        help="benchmarks only: load no model; every frame takes MS milliseconds and is upscaled by "
        "repeating pixels (shows whether the coordinator keeps many workers busy)",
    )
    parser.add_argument(
        "--log-level", default=env.get("ESRFARM_LOG_LEVEL", "INFO"), help="default %(default)s"
    )
    return parser


def pixel_count(text: str) -> int:
    """``67108864`` or ``8192x8192``: a number of pixels."""
    try:
        if "x" in text.lower():
            width, height = text.lower().split("x")
            pixels = int(width) * int(height)
        else:
            pixels = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a pixel count (N) or a size (WxH), not {text!r}"
        ) from None
    if pixels < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 pixel, not {text!r}")
    return pixels


def vulkan_device_from_env(backend: str) -> int | None:
    """``ESRFARM_VULKAN_DEVICE`` (the systemd unit sets it to the instance index) on the ncnn backend."""
    text = os.environ.get("ESRFARM_VULKAN_DEVICE", "").strip()
    if backend != "ncnn" or not text:
        return None
    if not text.isdigit():
        raise SettingsError(f"ESRFARM_VULKAN_DEVICE must be a device index (0, 1, ...), not {text!r}")
    return int(text)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    return WorkerSettings(
        shared_root=args.shared_root,
        model=args.model,
        backend=args.backend,
        host=args.host,
        port=args.port + args.port_offset if args.port else 0,
        gpu=args.gpu if args.gpu is not None else vulkan_device_from_env(args.backend),
        device=args.device,
        precision=args.precision,
        scale=args.scale,
        tile=args.tile,
        tile_pad=args.tile_pad,
        max_batch=args.max_batch,
        cpu_threads=args.cpu_threads,
        allow_download=not args.no_download,
        worker_id=args.worker_id,
        token=read_token(args.token_file),
        port_file=args.port_file,
        warmup=not args.no_warmup,
        warmup_size=args.warmup_size,
        simulate_latency_ms=args.simulate_latency_ms,
        max_request_bytes=args.max_request_bytes,
        max_manifest_bytes=args.max_manifest_bytes,
        max_output_pixels=args.max_output_pixels,
        pixel_budget=args.pixel_budget,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        io_threads=args.io_threads,
        fsync_frames=not args.no_fsync,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "models":
        from worker import models_cli

        return models_cli.main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = settings_from_args(args)
    except (SettingsError, TokenError) as exc:
        print(f"esrfarm worker: error: {exc}", file=sys.stderr)
        return 2
    if settings.backend == "ncnn" and settings.simulate_latency_ms is None:
        from worker.ncnn_runtime import VulkanUnavailableError, check_vulkan_device

        try:
            check_vulkan_device(settings.gpu or 0)
        except VulkanUnavailableError as exc:
            print(f"esrfarm worker: error: --backend ncnn: {exc}", file=sys.stderr)
            return 2
    from worker.service import serve

    def listening(url: str) -> None:
        print(f"listening on {url}", flush=True)

    return asyncio.run(serve(settings, on_listening=listening))
