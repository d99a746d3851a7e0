"""What both backends (torch: :mod:`worker.runtime`, ncnn: :mod:`worker.ncnn_runtime`) share, in
pure numpy: the limits of their frame settings and their check, the error of a batch that cannot
be upscaled, and the antialiased bicubic resize
of the model output to another scale, as weights. The torch runtime applies these taps per tile on
the device, the ncnn runtime to the frame on the host (:func:`resize_frame`), so both resize alike.
"""

from __future__ import annotations

import numpy as np

MIN_TILE = 32
MAX_SCALE = 16.0


class InferenceError(RuntimeError):
    """A batch could not be upscaled even after every fallback (either backend)."""


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
