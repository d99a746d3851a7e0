"""The ncnn (Vulkan) backend against the torch backend: agreement on real frames, and speed.

Takes ``--frames`` frames of a real clip (evenly spread), downscaled to ``--width`` pixels wide,
and upscales them with each model on both backends: torch on its device (the CPU here: fp32) and
ncnn on Vulkan device ``--gpu`` (fp16 where the device has it, and fp32 for reference), whole
frames unless ``--tiled`` (then its default pixel budget, which tiles with 10 pixels of context:
less than the networks' receptive fields, so seams add to the difference). Prints one
JSON line per model and ncnn precision: the max and mean absolute difference (in 8-bit levels) and
the PSNR between the two outputs, and each backend's frames per second and their ratio (the first
frame of each, which builds pipelines, is not timed).

    python benchmarks/ncnn_backend.py ../shared/media/bigbuckbunny.mp4 --width 160 --frames 3
"""

from __future__ import annotations

import argparse
import sys
import time

import av
import numpy as np
import orjson
from PIL import Image

from worker.ncnn_runtime import NcnnSettings, load_ncnn_upscaler
from worker.runtime import RuntimeSettings, load_upscaler

MODELS = ["realesr-animevideov3", "realesrgan-x4plus-anime", "realesrgan-x4plus"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def read_frames(path: str, count: int, width: int) -> np.ndarray:
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    picked = [frames[round(i * (len(frames) - 1) / max(1, count - 1))] for i in range(count)]
    height = round(picked[0].shape[0] * width / picked[0].shape[1]) // 2 * 2
    resized = [Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC) for f in picked]
    return np.stack([np.asarray(image) for image in resized])


def timed(upscale: object, frames: np.ndarray) -> tuple[np.ndarray, float]:
    """All frames' outputs, and frames per second over all but the first (warm-up) frame."""
    assert callable(upscale)
    first = upscale(frames[:1])
    started = time.perf_counter()
    rest = upscale(frames[1:]) if len(frames) > 1 else first[:0]
    elapsed = time.perf_counter() - started
    return np.concatenate([first, rest]), (len(frames) - 1) / elapsed if len(frames) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("video")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--gpu", type=int, default=0, help="Vulkan device index")
    parser.add_argument("--torch-device", default="cpu", help="cpu, or cuda for torch fp16 on a GPU")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp32"], help="ncnn precisions")
    parser.add_argument(
        "--tiled",
        action="store_true",
        help="ncnn with its default pixel budget (tiles) instead of whole frames",
    )
    args = parser.parse_args(argv)

    frames = read_frames(args.video, args.frames, args.width)
    size = f"{frames.shape[2]}x{frames.shape[1]}"
    for name in args.models:
        reference = load_upscaler(name, RuntimeSettings(device=args.torch_device), allow_download=False)
        torch_out, torch_fps = timed(reference.upscale, frames)
        for precision in args.precisions:
            budget = None if args.tiled else frames.shape[1] * frames.shape[2]
            settings = NcnnSettings(gpu=args.gpu, precision=precision, max_pass_pixels=budget)
            upscaler = load_ncnn_upscaler(name, settings, allow_download=False)
            ncnn_out, ncnn_fps = timed(upscaler.upscale, frames)
            diff = np.abs(ncnn_out.astype(np.int32) - torch_out.astype(np.int32))
            row = {
                "model": name, "input": size, "frames": len(frames),
                "torch": f"{reference.device_name} {reference.precision}",
                "ncnn": f"{upscaler.device_name} {upscaler.precision}", "tiled": args.tiled,
                "max_abs": int(diff.max()), "mean_abs": round(float(diff.mean()), 4),
                "psnr_db": round(psnr(ncnn_out, torch_out), 2),
                "torch_fps": round(torch_fps, 3), "ncnn_fps": round(ncnn_fps, 3),
                "ncnn_over_torch": round(ncnn_fps / torch_fps, 3),
            }  # fmt: skip
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
