"""Batched, tiled Real-ESRGAN inference: N uint8 RGB frames in, N upscaled uint8 frames out (or
uint16 in, uint16 out, for sources of more than 8 bits per sample).

This module owns torch. One :class:`Upscaler` holds one model on one device, loaded once.

On CUDA: fp16 by default (bf16 and fp32 selectable), channels_last, pinned host memory, and the
uint8 <-> float conversion done on the GPU. On the CPU: fp32, with a thread-count setting.

Frames whose size the network cannot take directly (odd sizes for a pixel-unshuffle model, say)
are padded by reflection and the output cropped. An output scale other than the model's own is
reached by resizing the model output on the device (antialiased bicubic).

Failure handling, none of which ever drops a frame:

- out of GPU memory: the micro-batch is halved down to 1, then the frame is tiled with ever
  smaller tiles; each fallback is logged and kept for later batches;
- memory bounded by a pixel budget (``max_pass_pixels``, by default 2 Mi px on the CPU, none on
  CUDA where the fallback above applies): a forward pass takes at most that many input pixels, so
  batches are split into smaller passes and a larger frame is tiled. Tiles are finished to uint8
  one by one (resized, when the output scale is not the model's, with the very weights of the
  whole-frame resize), so no float copy of the whole output ever exists;
- a half-precision output with NaN or inf (the cause of Real-ESRGAN's black frames) is
  recomputed in fp32 from the original fp32 weights, and that is logged.

16-bit frames (:func:`to_unit_range`): uint16 samples become ``x / 65535`` in fp32 and then the
model's precision, the output is rounded to uint16, never to 8 bits. fp16 has 11 significant bits,
so every 10-bit code value survives the conversion exactly; 12-bit codes above 2048 may move by one
step (bf16, 8 significant bits, keeps neither: run such sources in fp32 for every code exact).
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor

from manifests.colour import YuvSpec, i420_shape, i420_size
from worker.colour import i420_to_rgb, rgb_to_i420
from worker.models import ModelLoadError, load_model_file, resolve_model
from worker.upscaling import (
    InferenceError,
    Tiling,
    check_frame_settings,
    check_frames,
    check_scale,
    resize_taps,
    round_up,
)

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_CPU_PASS_PIXELS = 2 << 20  # 2 Mi px: a 1080p frame (2.07 Mpx) in one pass, a 4K frame in tiles
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

__all__ = [
    "SAMPLE_PEAKS",
    "InferenceError",
    "ModelLoadError",
    "RuntimeSettings",
    "Upscaler",
    "from_unit_range",
    "load_upscaler",
    "resize_taps",
    "select_device",
    "to_unit_range",
]


#: The largest sample of each frame dtype the runtime takes: uint8 and uint16.
SAMPLE_PEAKS: dict[torch.dtype, float] = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_unit_range(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 or uint16 NHWC frames -> NCHW floats of ``dtype`` in [0, 1], on the frames' device.

    uint8 divides in ``dtype`` itself (as it always did); uint16 goes through fp32 first, since
    65535 is beyond fp16's largest finite value (65504).
    """
    nchw = frames.permute(0, 3, 1, 2)
    if frames.dtype == torch.uint8:
        return nchw.to(dtype).div_(255.0)
    return nchw.to(torch.float32).div_(SAMPLE_PEAKS[frames.dtype]).to(dtype)


def from_unit_range(out: torch.Tensor, frame_dtype: torch.dtype) -> torch.Tensor:
    """float NCHW in [0, 1] -> NHWC samples of ``frame_dtype`` (uint8 or uint16), rounded."""
    peak = SAMPLE_PEAKS[frame_dtype]
    return out.clamp_(0.0, 1.0).mul_(peak).round_().to(frame_dtype).permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class RuntimeSettings:
    """How a model runs. Validated on construction; ``None`` means "the device's default"."""

    device: str = "auto"  # "auto" (first CUDA device, else the CPU) | "cpu" | "cuda" | "cuda:N"
    precision: str | None = None  # "fp16" | "bf16" | "fp32"; default fp16 on CUDA, fp32 on the CPU
    scale: float | None = None  # output scale; default the model's own
    tile: int = 0  # tile edge in input pixels; 0 = whole frames
    tile_pad: int = 10  # context each tile carries on every side, in input pixels
    max_batch: int | None = None  # frames per forward pass; default 1 on the CPU, the whole batch on CUDA
    cpu_threads: int | None = None  # torch intra-op threads on the CPU; default torch's own
    channels_last: bool | None = None  # default on for CUDA, off for the CPU (measured slower there)
    max_pass_pixels: int | None = None  # input pixels per forward pass; default DEFAULT_CPU_PASS_PIXELS
    # on the CPU, no bound on CUDA (the out-of-memory fallback applies there)

    def __post_init__(self) -> None:
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        check_frame_settings(self.scale, self.tile, self.tile_pad, self.max_pass_pixels)
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, not {self.cpu_threads}")


def select_device(spec: str) -> torch.device:
    """Turn a device setting into a torch device, with a clear error if it is not there."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec} was asked for but CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
            )
        device = torch.device("cuda", index)
    return device


class Upscaler(Tiling):
    """One model on one device. ``upscale`` is thread-safe (one batch runs at a time)."""

    backend = "torch"

    def __init__(
        self, descriptor: ImageModelDescriptor[Any], settings: RuntimeSettings, model_name: str
    ) -> None:
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ModelLoadError(
                f"model {model_name} maps {descriptor.input_channels} to {descriptor.output_channels} "
                "channels; esrfarm upscales RGB frames (3 to 3)"
            )
        self.settings = settings
        self.model_name = model_name
        self.architecture = descriptor.architecture.name
        self.native_scale = descriptor.scale
        self.scale = float(settings.scale) if settings.scale is not None else float(descriptor.scale)
        self.device = select_device(settings.device)
        on_cuda = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if on_cuda else "cpu"

        precision = settings.precision or ("fp16" if on_cuda else "fp32")
        supported = {"fp16": descriptor.supports_half, "bf16": descriptor.supports_bfloat16, "fp32": True}
        if not supported[precision]:
            log.warning("%s does not support %s; running in fp32", self.architecture, precision)
            precision = "fp32"
        if not on_cuda and precision != "fp32":
            log.warning(
                "%s on the CPU is slow and only useful for testing; fp32 is the CPU default", precision
            )
        self.precision = precision
        self._dtype = PRECISIONS[precision]
        if not on_cuda and settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        if on_cuda:
            torch.backends.cudnn.benchmark = True  # frame sizes repeat for a whole job

        self._size = descriptor.size_requirements  # spandrel's: minimum, multiple_of, square
        self._multiple = self._size.multiple_of
        self._channels_last = settings.channels_last if settings.channels_last is not None else on_cuda

        model = descriptor.model.eval()
        # An fp32 copy kept on the CPU, so a NaN in half precision is recomputed from the exact weights.
        self._fp32_source = None if self._dtype == torch.float32 else copy.deepcopy(model).float()
        self._fp32_model: torch.nn.Module | None = None
        self._model = self._place(model, self._dtype)

        self._micro_batch = settings.max_batch or (1 if not on_cuda else 0)  # 0: the whole batch
        self._tile = settings.tile
        self._tile_pad = settings.tile_pad
        default_budget = 0 if on_cuda else DEFAULT_CPU_PASS_PIXELS
        self._pass_pixels = settings.max_pass_pixels or default_budget  # 0: no bound
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------------

    @property
    def micro_batch(self) -> int:
        """Frames per forward pass now (0 = the whole batch); lowered by out-of-memory fallbacks."""
        return self._micro_batch

    def upscale(self, frames: np.ndarray, scale: float | None = None) -> np.ndarray:
        """Upscale ``(N, H, W, 3)`` uint8 RGB frames to ``(N, H*scale, W*scale, 3)`` uint8, or uint16
        frames to uint16 (16-bit samples all the way).

        ``scale`` overrides the output scale for this call (the model's own output is resized).
        """
        check_frames(frames, scale)
        with self._lock, torch.inference_mode():
            result = self._upscale_rgb(self._to_device(frames), scale, on_device=False)
        return result.numpy()

    def upscale_yuv(self, frames: np.ndarray, scale: float | None, spec: YuvSpec) -> np.ndarray:
        """Upscale ``(N, H * 3 / 2, W)`` planar YUV 4:2:0 frames (:mod:`manifests.colour`) to planar
        frames of the output size: converted to RGB and back on the device (:mod:`worker.colour`),
        so only YUV samples cross between the host and the device."""
        if not isinstance(frames, np.ndarray) or frames.dtype not in (np.uint8, np.uint16):
            raise TypeError("frames must be a uint8 or uint16 numpy array")
        if frames.ndim != 3 or 0 in frames.shape:
            raise ValueError(f"YUV frames must have shape (N, H * 3 / 2, W), not {frames.shape}")
        check_scale(scale)
        width, height = i420_size(frames.shape[1], frames.shape[2])
        i420_shape(*self.output_size(height, width, scale))  # an odd output side: ValueError, up front
        with self._lock, torch.inference_mode():
            rgb = i420_to_rgb(self._to_device(frames), spec)
            upscaled = rgb_to_i420(self._upscale_rgb(rgb, scale, on_device=True), spec)
            if self.device.type != "cuda":
                return upscaled.numpy()
            host = torch.empty(upscaled.shape, dtype=upscaled.dtype, pin_memory=True)
            host.copy_(upscaled, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()

    def _upscale_rgb(self, batch: torch.Tensor, scale: float | None, *, on_device: bool) -> torch.Tensor:
        """NHWC uint8/uint16 frames on the device -> upscaled NHWC, on the device (``on_device``) or
        on the host (pinned for CUDA, synchronised), pass by pass under the pixel budget."""
        count, height, width, _ = batch.shape
        out_h, out_w = self.output_size(height, width, scale)
        on_cuda = self.device.type == "cuda"
        if on_device:
            result = torch.empty((count, out_h, out_w, 3), dtype=batch.dtype, device=batch.device)
        else:
            result = torch.empty((count, out_h, out_w, 3), dtype=batch.dtype, pin_memory=on_cuda)
        start = 0
        while start < count:
            size = min(self._micro_batch or count, self._frames_per_pass(height, width))
            chunk = batch[start : start + size]
            try:
                out: torch.Tensor | None = self._upscale_chunk(chunk, (out_h, out_w))
            except torch.OutOfMemoryError:
                out = None  # handled outside the except block, once its tensors are released
            if out is None:
                del chunk
                self._after_oom(size, count, height, width)
                continue
            result[start : start + len(out)].copy_(out, non_blocking=on_cuda)
            start += len(out)
        if on_cuda and not on_device:
            torch.cuda.current_stream(self.device).synchronize()
        return result

    def warmup(self, height: int = 64, width: int = 64) -> None:
        """Run one batch so lazy initialisation (cuDNN, allocator) happens before real work."""
        self.upscale(np.zeros((max(1, self._micro_batch), height, width, 3), dtype=np.uint8))

    def memory_info(self) -> dict[str, int] | None:
        """GPU memory ``{"used", "total"}`` in bytes for this device, or None on the CPU."""
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return {"used": total - free, "total": total}

    # -- internals ------------------------------------------------------------------------------

    def _place(self, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        model = model.to(self.device, dtype=dtype)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _to_device(self, frames: np.ndarray) -> torch.Tensor:
        if not frames.flags.writeable:  # torch warns on read-only arrays; the copy is cheap next to inference
            frames = frames.copy()
        host = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type != "cuda":
            return host
        staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staging.copy_(host)
        return staging.to(self.device, non_blocking=True)

    def _upscale_chunk(self, chunk: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """uint8 (uint16) NHWC on the device -> upscaled uint8 (uint16) NHWC of ``out_size`` (h, w)."""
        tile = self._tile_edge(*chunk.shape[1:3])
        if tile:
            return self._upscale_tiled(chunk, out_size, tile)
        out = self._native_output(chunk)
        if out_size != tuple(out.shape[2:]):
            out = F.interpolate(out, size=out_size, mode="bicubic", antialias=True, align_corners=False)
        return from_unit_range(out, chunk.dtype)

    def _native_output(self, chunk: torch.Tensor) -> torch.Tensor:
        """uint8/uint16 NHWC on the device -> the model's float NCHW output at its native scale (NaN
        guarded)."""
        height, width = chunk.shape[1:3]
        out = self._forward(self._normalise(chunk, self._dtype), self._model)
        if self._fp32_source is not None and not bool(torch.isfinite(out).all()):
            log.warning(
                "%s output of %d frame(s) holds NaN or inf; recomputing them in fp32",
                self.precision,
                len(chunk),
            )
            out = self._forward(self._normalise(chunk, torch.float32), self._fp32_network())
        return out[:, :, : height * self.native_scale, : width * self.native_scale].float()

    def _normalise(self, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8/uint16 NHWC -> padded NCHW in [0, 1], converted on the chunk's device."""
        return self._pad(to_unit_range(chunk, dtype))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad NCHW at the bottom and right to a size the network takes (``SizeRequirements``)."""
        height, width = x.shape[2:]
        right, bottom = self._size.get_padding(width, height)
        if not (right or bottom):
            return x
        mode = "reflect" if bottom < height and right < width else "replicate"
        return F.pad(x, (0, right, 0, bottom), mode=mode)

    def _forward(self, x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x)

    # -- the pixel budget and tiling ------------------------------------------------------------

    def _frames_per_pass(self, height: int, width: int) -> int:
        """Whole frames one forward pass may take under the pixel budget (at least one)."""
        if not self._pass_pixels:
            return 1 << 30
        return max(1, self._pass_pixels // (height * width))

    def _upscale_tiled(self, chunk: torch.Tensor, out_size: tuple[int, int], tile: int) -> torch.Tensor:
        """Upscale tile by tile, each finished to samples at once: memory follows the tile, not the frame.

        Output tiles cover ``tile`` input pixels each. A tile's model input carries ``tile_pad``
        pixels of real context on each side beyond the native pixels its output needs (with
        ``tile_pad`` at least the network's receptive field it equals the untiled result). Tile
        edges and pads are multiples of the network's size multiple, so each piece is a valid input.
        At another scale than the native one, each tile is resized from the native pixels it
        needs with the whole-frame resize's own weights (antialiased bicubic), so the seams match.
        """
        count, height, width = chunk.shape[:3]
        scale = self.native_scale
        tile += self._size.get_padding(tile, tile)[0]  # a size the network takes
        pad = round_up(self._tile_pad, self._multiple)
        out_h, out_w = out_size
        result = torch.empty((count, out_h, out_w, 3), dtype=chunk.dtype, device=chunk.device)
        rows = _tile_spans(height * scale, out_h, tile * scale, chunk.device)
        cols = _tile_spans(width * scale, out_w, tile * scale, chunk.device)
        for oy0, oy1, ny0, ny1, y_taps in rows:
            iy0, iy1 = max(ny0 // scale - pad, 0), min(-(-ny1 // scale) + pad, height)
            for ox0, ox1, nx0, nx1, x_taps in cols:
                ix0, ix1 = max(nx0 // scale - pad, 0), min(-(-nx1 // scale) + pad, width)
                native = self._native_output(chunk[:, iy0:iy1, ix0:ix1])
                native = native[
                    :, :, ny0 - iy0 * scale : ny1 - iy0 * scale, nx0 - ix0 * scale : nx1 - ix0 * scale
                ]
                if y_taps is not None:
                    native = _resize_along(native, 2, *y_taps)
                if x_taps is not None:
                    native = _resize_along(native, 3, *x_taps)
                result[:, oy0:oy1, ox0:ox1] = from_unit_range(native, chunk.dtype)
                del native
        return result

    def _fp32_network(self) -> torch.nn.Module:
        if self._fp32_model is None:
            assert self._fp32_source is not None
            self._fp32_model = self._place(copy.deepcopy(self._fp32_source), torch.float32)
        return self._fp32_model

    def _after_oom(self, size: int, count: int, height: int, width: int) -> None:
        """Shrink the work after an out-of-memory error: first the batch, then the tiles."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        effective = min(size or count, count)
        if effective > 1:
            self._micro_batch = effective // 2
            log.warning(
                "out of memory at %d frame(s) per pass; retrying with %d", effective, self._micro_batch
            )
            return
        self._halve_tile(height, width)


def load_upscaler(
    model: str, settings: RuntimeSettings | None = None, *, allow_download: bool = True
) -> Upscaler:
    """Resolve ``model`` (catalog name or path), load it once through spandrel, place it on its device."""
    resolved = resolve_model(model, allow_download=allow_download)
    descriptor = load_model_file(resolved.path)
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelLoadError(f"model file {resolved.path} is not an image-to-image model")
    upscaler = Upscaler(descriptor, settings or RuntimeSettings(), resolved.name)
    log.info(
        "loaded %s (%s, x%d) from %s on %s in %s",
        resolved.name,
        upscaler.architecture,
        upscaler.native_scale,
        resolved.path,
        upscaler.device_name,
        upscaler.precision,
    )
    return upscaler


# -- tiles and their resize (module level: pure index and weight arithmetic) -----------------------

_Taps = tuple[torch.Tensor, torch.Tensor]  # (output positions, taps) local source indices and weights


def _tile_spans(
    native: int, out: int, native_tile: int, device: torch.device
) -> list[tuple[int, int, int, int, _Taps | None]]:
    """Cut one axis into tiles: ``(out_start, out_end, native_start, native_end, taps)`` each, where
    the native span holds every native pixel the tile's output is computed from, and ``taps`` the
    resize from it (None when the output is at native scale: then the two spans are the same)."""
    if out == native:
        return [(start, min(start + native_tile, native), start, min(start + native_tile, native), None)
                for start in range(0, native, native_tile)]  # fmt: skip
    step = max(1, round(native_tile * out / native))
    spans: list[tuple[int, int, int, int, _Taps | None]] = []
    for start in range(0, out, step):
        end = min(start + step, out)
        first, weights = resize_taps(native, out, start, end)
        low = int(first.min())
        high = int(min(native, (first + weights.shape[1]).max()))
        index = torch.from_numpy(np.minimum(first[:, None] + np.arange(weights.shape[1]), native - 1) - low)
        taps = (index.to(device), torch.from_numpy(weights).float().to(device))
        spans.append((start, end, low, high, taps))
    return spans


def _resize_along(x: torch.Tensor, dim: int, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Resize NCHW ``x`` along ``dim`` (2 or 3): output ``o`` is ``sum_k weights[o, k] * x[index[o, k]]``.

    Rows are gathered whole (fast); for columns ``x`` is transposed once so that they are rows too.
    """
    if dim == 3:
        return _resize_along(x.transpose(2, 3).contiguous(), 2, index, weights).transpose(2, 3)
    column = weights.view(1, 1, -1, 1, weights.shape[1])
    out: torch.Tensor | None = None
    for k in range(index.shape[1]):
        term = x.index_select(2, index[:, k]).mul_(column[..., k])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out
