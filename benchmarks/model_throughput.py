"""Frames per second of inference alone: uint8 frames in memory -> upscaled uint8 frames in memory.

Includes what every batch pays in the worker (host<->device copies, uint8<->float conversion,
padding, resizing to the output scale) and nothing else (no decoding, no disk). Prints one JSON line.

    python benchmarks/model_throughput.py --model realesr-animevideov3 --width 640 --height 360 \
        --batch 1 --precision fp32 --frames 8
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import torch

from worker.runtime import RuntimeSettings, load_upscaler
from worker.upscaling import settings_from


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="realesr-animevideov3", help="catalog name or model file")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--batch", type=int, default=1, help="frames per upscale call and per forward pass")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=float, default=None, help="output scale (default: the model's)")
    parser.add_argument("--frames", type=int, default=16, help="frames to time (rounded up to whole batches)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--channels-last", choices=["on", "off"], default=None)
    parser.add_argument("--tile", type=int, default=0)
    args = parser.parse_args(argv)

    channels_last = None if args.channels_last is None else args.channels_last == "on"
    settings = settings_from(RuntimeSettings, args, max_batch=args.batch, channels_last=channels_last)
    upscaler = load_upscaler(args.model, settings)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(args.batch, args.height, args.width, 3), dtype=np.uint8)
    for _ in range(args.warmup):
        upscaler.upscale(batch)
    calls = -(-args.frames // args.batch)
    start = time.perf_counter()
    for _ in range(calls):
        out = upscaler.upscale(batch)
    seconds = time.perf_counter() - start
    frames = calls * args.batch
    record = {
        "benchmark": "model_throughput",
        "model": upscaler.model_name,
        "architecture": upscaler.architecture,
        "input": f"{args.width}x{args.height}",
        "output": f"{out.shape[2]}x{out.shape[1]}",
        "batch": args.batch,
        "precision": upscaler.precision,
        "device": upscaler.device_name,
        "cpu_threads": torch.get_num_threads() if upscaler.device.type == "cpu" else None,
        "channels_last": upscaler._channels_last,
        "frames": frames,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 3),
        "torch": torch.__version__,
        "host": platform.node(),
        "commit": commit(),
    }
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
