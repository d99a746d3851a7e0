"""What both backends (torch: :mod:`worker.runtime`, ncnn: :mod:`worker.ncnn_runtime`) share, in
pure numpy: the limits of their frame settings and their check, the error of a batch that cannot
be upscaled, the output size and the tile choice (:class:`Tiling`), and the antialiased bicubic resize
of the model output to another scale, as weights. The torch runtime applies these taps per tile on
the device, the ncnn runtime to the frame on the host (:func:`resize_frame`), so both resize alike.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, TypeVar

import numpy as np

from worker.errors import WorkerError

S = TypeVar("S")

MIN_TILE = 32
MAX_SCALE = 16.0


class InferenceError(WorkerError, RuntimeError):
    """A batch could not be upscaled even after every fallback (either backend)."""


def settings_from(cls: type[S], source: object, **given: Any) -> S:
    """A runtime's settings (``cls``, a dataclass: ``RuntimeSettings``, ``NcnnSettings``) from any
    record with fields of the same names (the worker's settings, a comparison's spec, parsed
    arguments), then ``given`` for the fields named otherwise there: settings pass from one record to
    another in one place, not field by field at every caller."""
    names = (field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]
    values = {name: getattr(source, name) for name in names if hasattr(source, name)}
    return cls(**{**values, **given})


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``value``."""
    return -(-value // multiple) * multiple


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The output (height, width) of a frame of that size at ``scale``: both backends round alike."""
    return round(height * scale), round(width * scale)


def check_frames(frames: object, scale: float | None) -> None:
    """Raise TypeError or ValueError unless ``frames`` is ``(N, H, W, 3)`` uint8 or uint16 and ``scale``
    (an output scale for one call) is in range: what ``upscale`` of either backend takes."""
    if not isinstance(frames, np.ndarray) or frames.dtype not in (np.uint8, np.uint16):
        raise TypeError("frames must be a uint8 or uint16 numpy array")
    if frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must have shape (N, H, W, 3) with N, H, W >= 1, not {frames.shape}")
    check_scale(scale)


def check_scale(scale: float | None) -> None:
    """Raise ValueError unless ``scale`` (an output scale for one call, or None) is in range."""
    if scale is not None and not 0 < scale <= MAX_SCALE:
        raise ValueError(f"scale must be above 0 and at most {MAX_SCALE:g}, not {scale!r}")


def check_frame_settings(scale: float | None, tile: int, tile_pad: int, max_pass_pixels: int | None) -> None:
    """Raise ValueError naming the first of these settings (as both backends take them) out of range."""
    check_scale(scale)
    if tile != 0 and tile < MIN_TILE:
        raise ValueError(f"tile must be 0 (off) or at least {MIN_TILE} pixels, not {tile}")
    if tile_pad < 0:
        raise ValueError(f"tile_pad must be 0 or more, not {tile_pad}")
    if max_pass_pixels is not None and max_pass_pixels < 1:
        raise ValueError(f"max_pass_pixels must be at least 1, not {max_pass_pixels}")


class Tiling:
    """What both backends' upscalers share (a base class): the output size at a scale, and the
    tile edge a frame is upscaled with, configured, lowered after running out of memory, or
    chosen to fit the pixel budget. Each upscaler sets the attributes below."""

    scale: float  # the default output scale
    _tile: int  # the tile edge now; 0: whole frames, or tiles by the pixel budget
    _pass_pixels: int  # input pixels one pass may take (a tile's pad included); 0: no bound
    _tile_pad: int  # context each tile carries on every side, in input pixels
    _multiple: int = 1  # tile edges and pads are multiples of this (the network's size multiple)

    @property
    def tile(self) -> int:
        """Tile edge now (0 = whole frames, or by the pixel budget); set by out-of-memory fallbacks
        if not configured."""
        return self._tile

    def output_size(self, height: int, width: int, scale: float | None = None) -> tuple[int, int]:
        """(height, width) of the output for an input of that size, at ``scale`` or the default."""
        return scaled_size(height, width, self.scale if scale is None else scale)

    def _tile_edge(self, height: int, width: int) -> int:
        """The tile edge (input pixels) a frame of that size is upscaled with; 0 for the whole frame.

        The configured or out-of-memory tile; else, for a frame above the pixel budget, the largest
        tile whose padded piece fits in the budget.
        """
        if self._tile:
            return 0 if self._tile >= height and self._tile >= width else self._tile
        if not self._pass_pixels or height * width <= self._pass_pixels:
            return 0
        pad = round_up(self._tile_pad, self._multiple)
        edge = math.isqrt(self._pass_pixels) - 2 * pad
        return max(MIN_TILE, edge // self._multiple * self._multiple)

    def _halve_tile(self, height: int, width: int, memory: str = "memory", detail: str = "") -> None:
        """After running out of ``memory`` on one frame of that size: tile frames with tiles half as
        large from now on. Raises :class:`InferenceError` (``detail`` appended) if tiles are as small
        as they get."""
        current = self._tile_edge(height, width) or max(height, width)
        smaller = max(MIN_TILE, round_up(current // 2, self._multiple))
        if smaller >= current:
            frame = f"one {width}x{height} frame"
            raise InferenceError(f"out of {memory} upscaling {frame} even with {current}-pixel tiles{detail}")
        self._tile = smaller
        logging.getLogger(type(self).__module__).warning(
            "out of %s on one frame; tiling it with %d-pixel tiles", memory, smaller
        )


def resize_taps(native: int, out: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """The antialiased bicubic resize of one axis from ``native`` to ``out`` pixels, as
    ``F.interpolate(mode="bicubic", antialias=True)`` computes it, for output pixels ``start`` to
    ``end - 1``: each one's first source pixel, and the weights of its taps ``(end - start, taps)``
    (Keys' cubic, a = -0.5, its support widened by the scale when shrinking; zero past the edge)."""
    scale = native / out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(start, end, dtype=np.float64) + 0.5)
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centre + support + 0.5).astype(np.int64), native)
    source = first[:, None] + np.arange(int((last - first).max()))[None, :]
    x = np.abs((source - centre[:, None] + 0.5) * inverse)
    a = -0.5
    weights = np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )
    weights = np.where(source < last[:, None], weights, 0.0)
    return first, weights / weights.sum(axis=1, keepdims=True)


def resize_frame(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize float ``(C, H, W)`` to ``(C, out_h, out_w)`` with :func:`resize_taps` (rows, then columns)."""
    for axis, out in ((1, out_h), (2, out_w)):
        native = x.shape[axis]
        if native == out:
            continue
        first, weights = resize_taps(native, out, 0, out)
        index = np.minimum(first[:, None] + np.arange(weights.shape[1]), native - 1)
        moved = np.moveaxis(x, axis, 0)  # (native, ...)
        resized = np.zeros((out, *moved.shape[1:]), dtype=np.float32)
        for k in range(weights.shape[1]):
            resized += moved[index[:, k]] * weights[:, k].astype(np.float32).reshape(
                -1, *[1] * (moved.ndim - 1)
            )
        x = np.moveaxis(resized, 0, axis)
    return x
