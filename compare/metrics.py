"""Image and video metrics, in numpy: luma, PSNR, SSIM, temporal energy, sub-pixel shifts, detail.

Pure functions of arrays (no I/O). Conventions follow the public super-resolution benchmarks
(BasicSR's ``calculate_psnr``/``calculate_ssim`` with ``test_y_channel``):

- **luma** is BT.601 studio-range Y computed in floating point from 8-bit RGB, as MATLAB's
  ``rgb2ycbcr``: ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``, 16..235;
- **PSNR** is ``10 log10(255^2 / MSE)`` per frame (infinite for identical frames);
- **SSIM** is Wang et al. (2004): an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03,
  L = 255, statistics over the window positions that fit entirely inside the image ("valid").

Shifts are applied in the Fourier domain (a phase ramp: all-pass, so a half-pixel shift does not
blur, and a search over shifts cannot win by smoothing a noisy output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PEAK = 255.0
LUMA_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
LUMA_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * PEAK) ** 2
SSIM_C2 = (0.03 * PEAK) ** 2
#: Reflection padding (pixels) around a plane before a Fourier shift, so that the shift does not
#: wrap the opposite edge in.
SHIFT_PAD = 16


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 studio-range luma (float64) of ``(..., 3)`` uint8 RGB: shape ``(...)``."""
    if frames.shape[-1] != 3:
        raise ValueError(f"RGB frames must end in 3 channels, not shape {frames.shape}")
    return frames.astype(np.float64) @ LUMA_WEIGHTS + LUMA_OFFSET


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference of two arrays of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = PEAK) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` when the arrays are equal."""
    return psnr_of_mse(mse(a, b), peak)


def psnr_of_mse(error: float, peak: float = PEAK) -> float:
    """The PSNR (dB) of a mean squared error; ``inf`` for 0."""
    return math.inf if error == 0.0 else 10.0 * math.log10(peak * peak / error)


def _gaussian_kernel(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x * x) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def _filter_valid(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D filter over the positions where the window fits entirely ("valid")."""
    size = len(kernel)
    rows = np.lib.stride_tricks.sliding_window_view(plane, size, axis=0) @ kernel
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=1) @ kernel


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two 2-D planes on a 0..255 scale (see the module docstring)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM takes two 2-D planes of one shape, not {a.shape} and {b.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs planes of at least {SSIM_WINDOW}x{SSIM_WINDOW}, not {a.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    kernel = _gaussian_kernel()
    mu_x, mu_y = _filter_valid(x, kernel), _filter_valid(y, kernel)
    var_x = _filter_valid(x * x, kernel) - mu_x * mu_x
    var_y = _filter_valid(y * y, kernel) - mu_y * mu_y
    cov = _filter_valid(x * y, kernel) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return float(np.mean(numerator / denominator))


def temporal_energy(frames: np.ndarray) -> float:
    """Mean squared frame-to-frame difference of the luma of ``(N, H, W, 3)`` uint8 RGB frames, or of
    ``(N, H, W)`` planes as they are (N >= 2): the mean over the N-1 transitions of each one's mean
    squared difference. One frame's luma is held at a time besides the previous one."""
    if frames.ndim not in (3, 4) or len(frames) < 2:
        raise ValueError(f"temporal energy needs at least 2 frames, (N, H, W[, 3]), not {frames.shape}")
    total = 0.0
    previous: np.ndarray | None = None
    for frame in frames:
        current = luma(frame) if frames.ndim == 4 else frame.astype(np.float64)
        if previous is not None:
            total += mse(current, previous)
        previous = current
    return total / (len(frames) - 1)


def flicker_ratio(energy: float, reference_energy: float) -> float:
    """``energy / reference_energy``; 1 when both are 0 (nothing moves), ``inf`` when only the
    reference is still."""
    if reference_energy == 0.0:
        return 1.0 if energy == 0.0 else math.inf
    return energy / reference_energy


def fourier_shift(plane: np.ndarray, dy: float, dx: float, pad: int = SHIFT_PAD) -> np.ndarray:
    """``plane`` moved by (``dy``, ``dx``) pixels (down, right), by a phase ramp on a reflection-padded
    copy; float64, same shape. A zero shift returns the plane unchanged (as float64)."""
    source = plane.astype(np.float64)
    if dy == 0.0 and dx == 0.0:
        return source
    pad = min(pad, source.shape[0] - 1, source.shape[1] - 1)
    padded = np.pad(source, pad, mode="reflect")
    height, width = padded.shape
    ky = np.fft.fftfreq(height)[:, None]
    kx = np.fft.rfftfreq(width)[None, :]
    spectrum = np.fft.rfft2(padded) * np.exp(-2j * np.pi * (ky * dy + kx * dx))
    moved = np.fft.irfft2(spectrum, s=(height, width))
    return moved[pad : pad + source.shape[0], pad : pad + source.shape[1]]


def shift_frames(frames: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 frames moved by (``dy``, ``dx``), rounded back to uint8."""
    if dy == 0.0 and dx == 0.0:
        return frames
    out = np.empty_like(frames)
    for index, frame in enumerate(frames):
        for channel in range(frame.shape[2]):
            moved = fourier_shift(frame[:, :, channel], dy, dx)
            out[index, :, :, channel] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Box:
    """A rectangle of a frame, in pixels: ``top``, ``left``, ``height``, ``width``."""

    top: int
    left: int
    height: int
    width: int

    def scaled(self, factor: int) -> Box:
        return Box(self.top * factor, self.left * factor, self.height * factor, self.width * factor)

    def cut(self, array: np.ndarray) -> np.ndarray:
        """The box of a ``(H, W, ...)`` array."""
        return array[self.top : self.top + self.height, self.left : self.left + self.width]

    def cut_frames(self, frames: np.ndarray) -> np.ndarray:
        """The box of each frame of ``(N, H, W, ...)`` frames."""
        return frames[:, self.top : self.top + self.height, self.left : self.left + self.width]


def most_detailed_box(plane: np.ndarray, height: int, width: int, *, within: Box | None = None) -> Box:
    """The ``height`` x ``width`` window of a 2-D plane with the highest variance (the most detail).

    Windows are tried on a grid of a quarter window; ties go to the first (top-left) one.
    ``within`` limits the search to a part of the plane.
    """
    area = within or Box(0, 0, plane.shape[0], plane.shape[1])
    height, width = min(height, area.height), min(width, area.width)
    values = area.cut(plane.astype(np.float64))
    # Integral images of the values and their squares give every window's variance at once.
    s1 = np.pad(values.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s2 = np.pad((values * values).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tops = np.arange(0, area.height - height + 1, max(1, height // 4))
    lefts = np.arange(0, area.width - width + 1, max(1, width // 4))
    t, left = np.meshgrid(tops, lefts, indexing="ij")

    def window_sum(table: np.ndarray) -> np.ndarray:
        return (
            table[t + height, left + width]
            - table[t, left + width]
            - table[t + height, left]
            + table[t, left]
        )

    count = height * width
    mean = window_sum(s1) / count
    variance = window_sum(s2) / count - mean * mean
    row, col = np.unravel_index(int(np.argmax(variance)), variance.shape)
    return Box(area.top + int(tops[row]), area.left + int(lefts[col]), height, width)


@dataclass(frozen=True)
class ShiftSearch:
    """The result of :func:`search_shift`: the shift (pixels) that best aligns the output with the
    reference, and the mean squared error at that shift and at no shift."""

    dy: float
    dx: float
    mse: float
    mse_unshifted: float


def shift_candidates(max_shift: float, step: float) -> list[tuple[float, float]]:
    """Every (dy, dx) on a ``step`` grid within ``max_shift``, the smallest shifts first."""
    if step <= 0 or max_shift < 0:
        raise ValueError(f"shift search needs step > 0 and max_shift >= 0, not {step} and {max_shift}")
    count = round(max_shift / step)
    values = [i * step for i in range(-count, count + 1)]
    grid = [(dy, dx) for dy in values for dx in values]
    return sorted(grid, key=lambda s: (abs(s[0]) + abs(s[1]), abs(s[0]), s))


def search_shift(
    references: Sequence[np.ndarray],
    outputs: Sequence[np.ndarray],
    box: Box,
    *,
    max_shift: float = 1.0,
    step: float = 0.25,
) -> ShiftSearch:
    """The shift of ``outputs`` (2-D planes) that minimises the squared error against ``references``
    inside ``box``, summed over all pairs; ties go to the smaller shift.

    Each output is shifted with the context around ``box`` (up to :data:`SHIFT_PAD` pixels of it),
    so the box should keep ``max_shift`` and a few pixels clear of the frame's edge.
    """
    if len(references) != len(outputs) or not references:
        raise ValueError("search_shift needs as many outputs as references, at least one")
    pieces = []
    for ref, out in zip(references, outputs, strict=True):
        top, left = max(0, box.top - SHIFT_PAD), max(0, box.left - SHIFT_PAD)
        bottom = min(out.shape[0], box.top + box.height + SHIFT_PAD)
        right = min(out.shape[1], box.left + box.width + SHIFT_PAD)
        inner = Box(box.top - top, box.left - left, box.height, box.width)
        pieces.append((box.cut(ref).astype(np.float64), out[top:bottom, left:right], inner))

    def error(dy: float, dx: float) -> float:
        return sum(mse(ref, inner.cut(fourier_shift(context, dy, dx))) for ref, context, inner in pieces)

    unshifted = error(0.0, 0.0)
    best = (0.0, 0.0, unshifted)
    for dy, dx in shift_candidates(max_shift, step):
        if dy == 0.0 and dx == 0.0:
            continue
        value = error(dy, dx)
        if value < best[2]:
            best = (dy, dx, value)
    count = len(pieces)
    return ShiftSearch(dy=best[0], dx=best[1], mse=best[2] / count, mse_unshifted=unshifted / count)
