"""PSNR of each offline model against plain bicubic on a real frame (information, not a test).

Takes one frame of a real clip, downscales it x4 (antialiased bicubic), upscales it back with each
model and with bicubic, and prints the PSNR of each against the original frame, one JSON line each.

    python benchmarks/model_psnr.py ../shared/media/bigbuckbunny.mp4 --frame 60
"""

from __future__ import annotations

import argparse
import sys

import av
import numpy as np
import orjson
from PIL import Image

from worker.runtime import RuntimeSettings, load_upscaler

MODELS = ["realesr-animevideov3", "realesrgan-x4plus-anime", "realesrgan-x4plus"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / mse))


def read_frame(path: str, index: int) -> np.ndarray:
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return np.asarray(frame.to_ndarray(format="rgb24"))
    raise SystemExit(f"{path} has fewer than {index + 1} frames")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("video")
    parser.add_argument("--frame", type=int, default=60)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args(argv)

    original = read_frame(args.video, args.frame)
    height, width = original.shape[0] // 4 * 4, original.shape[1] // 4 * 4
    original = original[:height, :width]
    small = np.asarray(Image.fromarray(original).resize((width // 4, height // 4), Image.Resampling.BICUBIC))
    bicubic = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    rows = [{"method": "bicubic", "psnr_db": round(psnr(bicubic, original), 2)}]
    for name in args.models:
        upscaler = load_upscaler(name, RuntimeSettings(device="cpu"), allow_download=False)
        out = upscaler.upscale(small[None])[0]
        rows.append({"method": name, "psnr_db": round(psnr(out, original), 2)})
    for row in rows:
        row |= {"video": args.video, "frame": args.frame, "size": f"{width}x{height}", "downscale": 4}
        sys.stdout.write(orjson.dumps(row).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
