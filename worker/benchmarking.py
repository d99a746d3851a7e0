"""A stand-in model for benchmarks: a fixed latency per frame, no torch, no GPU.

``esrfarm worker --simulate-latency-ms 100`` serves like a real worker, but each frame "takes"
100 ms (the compute thread sleeps, as it would wait on a GPU) and is upscaled by repeating pixels.
It shows whether the coordinator and the shared storage keep N workers busy, on any machine.
It is a benchmark setting, never a default: it does not upscale anything worth keeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from manifests.colour import YuvSpec, i420_shape, i420_size


@dataclass
class SimulatedDevice:
    type: str = "cpu"


@dataclass
class SimulatedUpscaler:
    """Meets :class:`worker.processing.Upscaler`; ``latency_s`` per frame, nearest-neighbour output."""

    model_name: str
    latency_s: float
    native_scale: int = 4
    scale: float = 4.0
    precision: str = "simulated"
    architecture: str = "simulated"
    device: SimulatedDevice = field(default_factory=SimulatedDevice)
    device_name: str = "simulated"
    backend: str = "torch"  # the backend it stands in for

    def upscale(self, frames: np.ndarray, scale: float | None = None) -> np.ndarray:
        factor = self.scale if scale is None else scale
        time.sleep(self.latency_s * len(frames))
        return _nearest(frames, factor)

    def upscale_yuv(self, frames: np.ndarray, scale: float | None, spec: YuvSpec) -> np.ndarray:
        """Planar 4:2:0 in and out: each plane repeated (no colour conversion: a stand-in's output)."""
        factor = self.scale if scale is None else scale
        time.sleep(self.latency_s * len(frames))
        count, (width, height) = len(frames), i420_size(frames.shape[1], frames.shape[2])
        out_h, out_w = round(height * factor), round(width * factor)
        i420_shape(out_h, out_w)  # an odd side: ValueError
        flat = frames.reshape(count, -1)
        luma, chroma = height * width, height * width // 4
        planes = (
            _nearest(flat[:, :luma].reshape(count, height, width), factor, (out_h, out_w)),
            *(
                _nearest(plane.reshape(count, height // 2, width // 2), factor, (out_h // 2, out_w // 2))
                for plane in (flat[:, luma : luma + chroma], flat[:, luma + chroma :])
            ),
        )
        return np.concatenate([plane.reshape(count, -1) for plane in planes], axis=1).reshape(
            count, -1, out_w
        )

    def warmup(self, height: int = 64, width: int = 64) -> None:
        return None

    def memory_info(self) -> dict[str, int] | None:
        return None


def _nearest(frames: np.ndarray, factor: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """(N, H, W, ...) -> (N, round(H * factor), round(W * factor), ...) (or ``size``), each pixel repeated."""
    height, width = frames.shape[1:3]
    out_h, out_w = size or (round(height * factor), round(width * factor))
    whole = round(factor)
    if whole == factor and (out_h, out_w) == (height * whole, width * whole):
        # Each pixel repeated by a broadcast view and one copy: a few ms where indexing takes tens.
        count, rest = frames.shape[0], frames.shape[3:]
        view = frames.reshape(count, height, 1, width, 1, *rest)
        grown = np.broadcast_to(view, (count, height, whole, width, whole, *rest))
        return np.ascontiguousarray(grown).reshape(count, out_h, out_w, *rest)
    rows = np.minimum((np.arange(out_h) / factor).astype(int), height - 1)
    cols = np.minimum((np.arange(out_w) / factor).astype(int), width - 1)
    return np.ascontiguousarray(frames[:, rows][:, :, cols])
