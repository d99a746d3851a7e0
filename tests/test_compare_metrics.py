"""The comparison's metrics against known values; VMAF computed by the bundled ffmpeg's libvmaf."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from compare.frames import choose_run, degrade, resize_frames
from compare.metrics import (
    LUMA_WEIGHTS,
    SSIM_C1,
    Box,
    flicker_ratio,
    fourier_shift,
    luma,
    most_detailed_box,
    psnr,
    search_shift,
    shift_candidates,
    shift_frames,
    ssim,
    temporal_energy,
)
from compare.spec import CompareSpec, Region, parse_time
from compare.vmaf import vmaf_scores


def textured(height: int = 96, width: int = 128, seed: int = 0, count: int = 1) -> np.ndarray:
    """Smooth content with detail: blurred noise plus gradients, (count, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        noise = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC)).astype(
            int
        )
        yy, xx = np.mgrid[0:height, 0:width]
        out.append(np.clip(base // 2 + (xx[..., None] + yy[..., None]) % 96, 0, 255).astype(np.uint8))
    return np.stack(out)


# --- PSNR -------------------------------------------------------------------------------------


def test_psnr_of_identical_frames_is_infinite() -> None:
    frame = textured()[0]
    assert psnr(frame, frame) == math.inf
    assert psnr(luma(frame), luma(frame)) == math.inf


@pytest.mark.parametrize("step", [1, 5, 20])
def test_psnr_of_a_known_noise_level(step: int) -> None:
    """Mid-grey plus +-step on every pixel: MSE is exactly step^2 (no clipping)."""
    rng = np.random.default_rng(step)
    grey = np.full((64, 80, 3), 128, dtype=np.uint8)
    signs = rng.choice([-1, 1], size=grey.shape[:2])[..., None]
    noisy = (grey.astype(int) + step * signs).astype(np.uint8)
    assert psnr(grey, noisy) == pytest.approx(10 * math.log10(255**2 / step**2), abs=0.01)
    # The same noise on R, G and B moves luma by step times the sum of the luma weights.
    expected = 10 * math.log10(255**2 / (step * LUMA_WEIGHTS.sum()) ** 2)
    assert psnr(luma(grey), luma(noisy)) == pytest.approx(expected, abs=0.01)


def test_psnr_of_gaussian_noise_of_known_sigma() -> None:
    rng = np.random.default_rng(7)
    reference = np.full((1000, 2000), 128.0)
    noisy = reference + rng.normal(0.0, 10.0, reference.shape)
    assert psnr(reference, noisy) == pytest.approx(10 * math.log10(255**2 / 100.0), abs=0.01)


def test_luma_is_bt601_studio_range() -> None:
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    black, white, red = luma(colours)[0]
    assert black == pytest.approx(16.0) and white == pytest.approx(235.0)
    assert red == pytest.approx(16 + 65.481)


# --- SSIM -------------------------------------------------------------------------------------


def test_ssim_of_identical_frames_is_one() -> None:
    plane = luma(textured()[0])
    assert ssim(plane, plane) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_two_flat_planes_has_its_closed_form() -> None:
    """No variance anywhere: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = np.full((40, 40), 100.0), np.full((40, 40), 110.0)
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + SSIM_C1) / (100**2 + 110**2 + SSIM_C1), rel=1e-12)


def test_ssim_falls_with_noise_and_is_symmetric() -> None:
    plane = luma(textured()[0])
    rng = np.random.default_rng(1)
    light, heavy = plane + rng.normal(0, 2, plane.shape), plane + rng.normal(0, 20, plane.shape)
    assert 1.0 > ssim(plane, light) > ssim(plane, heavy) > 0.0
    assert ssim(plane, heavy) == pytest.approx(ssim(heavy, plane), abs=1e-12)


# --- flicker ----------------------------------------------------------------------------------


def test_flicker_ratio_of_a_clip_against_itself_is_one() -> None:
    frames = textured(count=4, seed=3)
    assert flicker_ratio(temporal_energy(frames), temporal_energy(frames)) == 1.0


def test_temporal_energy_of_a_known_flicker() -> None:
    """A ramp moving by c per frame plus an alternating +-d: each transition changes by c +- 2d, so the
    energy is c^2 + 4 d^2 against the clean ramp's c^2."""
    c, d = 6.0, 2.0
    clean = np.stack([np.full((8, 8), 50.0 + c * t) for t in range(5)])
    flickering = clean + np.array([d, -d, d, -d, d])[:, None, None]
    assert temporal_energy(clean) == pytest.approx(c * c)
    assert flicker_ratio(temporal_energy(flickering), temporal_energy(clean)) == pytest.approx(
        (c * c + 4 * d * d) / (c * c)
    )


def test_flicker_ratio_when_the_reference_stands_still() -> None:
    assert flicker_ratio(0.0, 0.0) == 1.0
    assert flicker_ratio(3.0, 0.0) == math.inf


# --- shifts -----------------------------------------------------------------------------------


def test_fourier_shift_by_whole_pixels_moves_the_content() -> None:
    plane = luma(textured()[0])
    moved = fourier_shift(plane, 2.0, -3.0)
    # Away from the edges (where reflection padding stands in for what is outside) it is a plain move.
    assert np.allclose(moved[12:-12, 12:-12], plane[10:-14, 15:-9], atol=1e-6)


def test_shift_search_finds_a_sub_pixel_shift_and_undoes_it() -> None:
    frames = textured(count=3, seed=5)
    reference = [luma(f) for f in frames]
    shifted = shift_frames(frames, 0.5, -0.25)  # the "model" output sits half a pixel low, a quarter left
    box = Box(16, 16, 64, 96)
    found = search_shift(reference, [luma(f) for f in shifted], box)
    assert (found.dy, found.dx) == (-0.5, 0.25)
    assert found.mse < found.mse_unshifted / 20
    aligned = shift_frames(shifted, found.dy, found.dx)
    assert psnr(box.cut(aligned[0]), box.cut(frames[0])) > 45


def test_shift_search_keeps_no_shift_for_aligned_output() -> None:
    """A blurred (aligned) output must not be 'improved' by a shift: the shift is all-pass."""
    frames = textured(count=2, seed=6)
    blurred = resize_frames(degrade(frames, 2), 96, 128)
    found = search_shift([luma(f) for f in frames], [luma(f) for f in blurred], Box(16, 16, 64, 96))
    assert (found.dy, found.dx) == (0.0, 0.0)
    assert found.mse == found.mse_unshifted


def test_shift_candidates_try_small_shifts_first() -> None:
    grid = shift_candidates(1.0, 0.5)
    assert (
        len(grid) == 25 and grid[0] == (0.0, 0.0) and set(grid[-4:]) == {(-1, -1), (-1, 1), (1, -1), (1, 1)}
    )


# --- detail, frame choice, parsing ------------------------------------------------------------


def test_most_detailed_box_finds_the_textured_patch() -> None:
    plane = np.full((90, 160), 80.0)
    rng = np.random.default_rng(2)
    plane[40:72, 96:128] += rng.normal(0, 30, (32, 32))  # on the quarter-window grid
    box = most_detailed_box(plane, 32, 32)
    assert (box.top, box.left, box.height, box.width) == (40, 96, 32, 32)


def test_the_run_is_drawn_with_the_seed() -> None:
    window = range(10, 110)
    runs = {seed: choose_run(window, 12, seed) for seed in range(5)}
    assert runs[0] == choose_run(window, 12, 0)
    assert len(set(runs.values())) > 1
    assert all(r.start >= 10 and r.stop <= 110 and len(r) == 12 for r in runs.values())
    with pytest.raises(ValueError, match="does not fit"):
        choose_run(range(5), 6, 0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("12.5", 12.5), ("01:30", 90.0), ("1:02:03.5", 3723.5), ("0", 0.0)]
)
def test_parse_time(text: str, seconds: float) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "-1", "1:75", "1:60:00", "ten"])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_region_parses_both_forms() -> None:
    assert Region.parse("320x180") == Region(320, 180)
    assert Region.parse("320x180+480+270") == Region(320, 180, 480, 270)
    for bad in ("320", "320x180+5", "10x10"):
        with pytest.raises(ValueError):
            Region.parse(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 5}, "scale must be one of 2, 3, 4"),
        ({"frames": 1}, "frames must be at least 2"),
        ({"models": ("no-such-model",)}, "unknown model 'no-such-model'"),
        ({"models": ("./missing.pth",)}, "model file ./missing.pth does not exist"),
        ({"models": ("bicubic", "bicubic")}, "named twice"),
        ({"duration": 0.0}, "duration must be above 0"),
    ],
)
def test_spec_refuses(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompareSpec(input=Path("in.mp4"), **kwargs)  # type: ignore[arg-type]


# --- VMAF (libvmaf in the bundled ffmpeg) -----------------------------------------------------


def test_vmaf_is_computed_and_neg_does_not_reward_sharpening() -> None:
    reference = textured(count=4, seed=9)
    sharpened = np.stack(
        [np.asarray(Image.fromarray(f).filter(ImageFilter.UnsharpMask(2, 150, 0))) for f in reference]
    )
    blurred = resize_frames(degrade(reference, 2), 96, 128)
    same, sharp, blur = (vmaf_scores(reference, d) for d in (reference, sharpened, blurred))
    assert len(same.vmaf_frames) == 4 and len(same.vmaf_neg_frames) == 4
    assert same.vmaf > 95 and same.vmaf > blur.vmaf and same.vmaf_neg > blur.vmaf_neg
    # Sharpening: plain VMAF forgives much of it, VMAF NEG does not; blur costs both about the same.
    assert sharp.vmaf - sharp.vmaf_neg > 10
    assert abs(blur.vmaf - blur.vmaf_neg) < 3


def test_vmaf_refuses_frames_libvmaf_cannot_take() -> None:
    tiny = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="at least 32x32"):
        vmaf_scores(tiny, tiny)
