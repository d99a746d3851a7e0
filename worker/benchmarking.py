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
        height, width = frames.shape[1:3]
        rows = (np.arange(round(height * factor)) / factor).astype(int)
        cols = (np.arange(round(width * factor)) / factor).astype(int)
        return np.ascontiguousarray(frames[:, rows][:, :, cols])

    def warmup(self, height: int = 64, width: int = 64) -> None:
        return None

    def memory_info(self) -> dict[str, int] | None:
        return None
