"""Batched and tiled inference on the CPU with small seeded networks in the official layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.model_factory import compact_state_dict, rrdb_state_dict, write_official, write_tiny_compact
from worker.runtime import InferenceError, RuntimeSettings, Upscaler, load_upscaler, resize_taps


def frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random frames: noise on gradients, like real content at a tiny size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx[None, :, :, None] * 7 + yy[None, :, :, None] * 3 + np.arange(3) * 40) % 256
    noise = rng.integers(-30, 30, size=(count, height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def compact_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_compact(tmp_path_factory.mktemp("models") / "tiny-compact.pth")


@pytest.fixture(scope="module")
def rrdb_x2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_official(tmp_path_factory.mktemp("models") / "tiny-rrdb-x2.pth", rrdb_state_dict(scale=2))


def cpu(**kwargs: object) -> RuntimeSettings:
    return RuntimeSettings(device="cpu", **kwargs)  # type: ignore[arg-type]


def test_batch_equals_single_frame_calls(compact_path: Path) -> None:
    batch = frames(5, 20, 28)
    whole = load_upscaler(str(compact_path), cpu(max_batch=5))
    assert whole.micro_batch == 5
    out = whole.upscale(batch)
    assert out.shape == (5, 80, 112, 3) and out.dtype == np.uint8
    singles = np.stack([whole.upscale(batch[i : i + 1])[0] for i in range(5)])
    np.testing.assert_array_equal(out, singles)
    # The frames really differ from each other and from a plain resize: the model did something.
    assert not np.array_equal(out[0], out[1])


def test_micro_batches_cover_every_frame_in_order(compact_path: Path) -> None:
    batch = frames(7, 12, 12, seed=3)
    by_three = load_upscaler(str(compact_path), cpu(max_batch=3)).upscale(batch)
    by_one = load_upscaler(str(compact_path), cpu(max_batch=1)).upscale(batch)
    np.testing.assert_array_equal(by_three, by_one)


@pytest.mark.parametrize(("height", "width", "tile"), [(70, 90, 32), (64, 64, 32), (45, 77, 40)])
def test_tiled_equals_untiled_compact(compact_path: Path, height: int, width: int, tile: int) -> None:
    # The tiny compact net has 4 3x3 convolutions: a receptive field of 4 pixels each side.
    batch = frames(2, height, width, seed=1)
    untiled = load_upscaler(str(compact_path), cpu()).upscale(batch)
    tiled_upscaler = load_upscaler(str(compact_path), cpu(tile=tile, tile_pad=4))
    tiled = tiled_upscaler.upscale(batch)
    assert tiled.shape == untiled.shape == (2, height * 4, width * 4, 3)
    np.testing.assert_array_equal(tiled, untiled)


def test_tiles_without_enough_context_differ(compact_path: Path) -> None:
    """The tiling test above can fail: with no context the seams show."""
    batch = frames(1, 70, 90, seed=1)
    untiled = load_upscaler(str(compact_path), cpu()).upscale(batch)
    seamy = load_upscaler(str(compact_path), cpu(tile=32, tile_pad=0)).upscale(batch)
    assert not np.array_equal(seamy, untiled)


def test_tiled_equals_untiled_pixel_unshuffle_odd_size(rrdb_x2_path: Path) -> None:
    # RRDBNet x2 works on pixel-unshuffled input: sizes must be even, so 45x77 is padded.
    # One RRDB block is 15 convolutions plus 5 around it; at half resolution that is 40 input pixels.
    batch = frames(2, 45, 77, seed=2)
    untiled_upscaler = load_upscaler(str(rrdb_x2_path), cpu())
    assert untiled_upscaler.native_scale == 2
    untiled = untiled_upscaler.upscale(batch)
    assert untiled.shape == (2, 90, 154, 3)
    tiled = load_upscaler(str(rrdb_x2_path), cpu(tile=32, tile_pad=48)).upscale(batch)
    np.testing.assert_allclose(tiled.astype(int), untiled.astype(int), atol=1)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (7, 3), (91, 161), (2, 2)])
def test_odd_and_tiny_sizes(rrdb_x2_path: Path, compact_path: Path, height: int, width: int) -> None:
    for path, scale in ((rrdb_x2_path, 2), (compact_path, 4)):
        out = load_upscaler(str(path), cpu()).upscale(frames(1, height, width))
        assert out.shape == (1, height * scale, width * scale, 3)


@pytest.mark.parametrize("scale", [2.0, 3.0, 1.5])
def test_output_scale_below_native_resizes_the_model_output(compact_path: Path, scale: float) -> None:
    batch = frames(2, 24, 30, seed=4)
    native = load_upscaler(str(compact_path), cpu()).upscale(batch)
    scaled_upscaler = load_upscaler(str(compact_path), cpu(scale=scale))
    assert scaled_upscaler.native_scale == 4 and scaled_upscaler.scale == scale
    scaled = scaled_upscaler.upscale(batch)
    out_h, out_w = round(24 * scale), round(30 * scale)
    assert scaled.shape == (2, out_h, out_w, 3)
    # An independent good filter (Pillow's antialiased bicubic) agrees closely.
    for i in range(2):
        ref = np.asarray(Image.fromarray(native[i]).resize((out_w, out_h), Image.Resampling.BICUBIC))
        assert np.abs(ref.astype(int) - scaled[i].astype(int)).mean() < 2.0


def test_output_scale_per_call_equals_a_fixed_output_scale(compact_path: Path) -> None:
    batch = frames(2, 20, 26, seed=7)
    default = load_upscaler(str(compact_path), cpu())
    for scale in (2.0, 3.0):
        fixed = load_upscaler(str(compact_path), cpu(scale=scale)).upscale(batch)
        np.testing.assert_array_equal(default.upscale(batch, scale), fixed)
    assert default.upscale(batch).shape == (2, 80, 104, 3)  # the default is untouched
    with pytest.raises(ValueError, match="scale must be above 0"):
        default.upscale(batch, 0.0)


def test_output_scale_above_native(rrdb_x2_path: Path) -> None:
    out = load_upscaler(str(rrdb_x2_path), cpu(scale=4)).upscale(frames(1, 10, 12))
    assert out.shape == (1, 40, 48, 3)


class _OutOfMemoryAbove(torch.nn.Module):
    """Stands in for a GPU with little memory: refuses passes above a pixel budget."""

    def __init__(self, inner: torch.nn.Module, max_pixels: int) -> None:
        super().__init__()
        self.inner = inner
        self.max_pixels = max_pixels
        self.refused = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2] * x.shape[3] > self.max_pixels:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_shrinks_batch_then_tiles(compact_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    batch = frames(4, 64, 64, seed=5)
    expected = load_upscaler(str(compact_path), cpu()).upscale(batch)
    upscaler = load_upscaler(str(compact_path), cpu(max_batch=4, tile_pad=8))
    limited = _OutOfMemoryAbove(upscaler._model, max_pixels=64 * 64 - 1)  # not even one whole frame
    upscaler._model = limited
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        out = upscaler.upscale(batch)
    np.testing.assert_array_equal(out, expected)  # every frame, each exactly right
    assert upscaler.micro_batch == 1 and upscaler.tile == 32
    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying with 2" in m for m in messages)
    assert any("retrying with 1" in m for m in messages)
    assert any("32-pixel tiles" in m for m in messages)
    assert limited.refused >= 3


def test_out_of_memory_at_the_smallest_tile_raises(compact_path: Path) -> None:
    upscaler = load_upscaler(str(compact_path), cpu(max_batch=1))
    upscaler._model = _OutOfMemoryAbove(upscaler._model, max_pixels=10)
    with pytest.raises(InferenceError, match="out of memory upscaling one 40x40 frame"):
        upscaler.upscale(frames(1, 40, 40))


class _NaNInHalf(torch.nn.Module):
    """Overflows like a real fp16 Real-ESRGAN pass sometimes does."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if x.dtype == torch.float16:
            out = out.clone()
            out[:, :, :4, :4] = float("nan")
            out[:, :, -1, -1] = float("inf")
        return out


def test_half_precision_nan_is_recomputed_in_fp32(
    compact_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch = frames(2, 16, 16, seed=6)
    expected = load_upscaler(str(compact_path), cpu()).upscale(batch)
    half = load_upscaler(str(compact_path), cpu(precision="fp16"))
    assert half.precision == "fp16"
    half._model = _NaNInHalf(half._model)
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        out = half.upscale(batch)
    np.testing.assert_array_equal(out, expected)
    assert any("recomputing them in fp32" in r.getMessage() for r in caplog.records)


def test_half_precision_without_nan_is_not_recomputed(
    compact_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch = frames(1, 16, 16, seed=6)
    reference = load_upscaler(str(compact_path), cpu()).upscale(batch)
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        out = load_upscaler(str(compact_path), cpu(precision="bf16")).upscale(batch)
    assert not any("recomputing" in r.getMessage() for r in caplog.records)
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 8  # bf16 is close, not exact


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "gpu"}, "device must be"),
        ({"precision": "fp8"}, "precision must be"),
        ({"scale": 0}, "scale must be"),
        ({"tile": 8}, "tile must be 0"),
        ({"tile_pad": -1}, "tile_pad must be"),
        ({"max_batch": 0}, "max_batch must be"),
        ({"cpu_threads": 0}, "cpu_threads must be"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeSettings(**kwargs)  # type: ignore[arg-type]


def test_frames_are_validated(compact_path: Path) -> None:
    upscaler = load_upscaler(str(compact_path), cpu())
    with pytest.raises(TypeError, match="uint8"):
        upscaler.upscale(np.zeros((1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, H, W, 3\)"):
        upscaler.upscale(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, H, W, 3\)"):
        upscaler.upscale(np.zeros((0, 4, 4, 3), dtype=np.uint8))


def test_cuda_requested_without_cuda_is_a_clear_error(compact_path: Path) -> None:
    if torch.cuda.is_available():
        assert load_upscaler(str(compact_path), RuntimeSettings(device="cuda")).device.type == "cuda"
        return
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_upscaler(str(compact_path), RuntimeSettings(device="cuda"))


def test_auto_device_defaults(compact_path: Path) -> None:
    upscaler = load_upscaler(str(compact_path), RuntimeSettings())
    if torch.cuda.is_available():
        assert (upscaler.device.type, upscaler.precision, upscaler.micro_batch) == ("cuda", "fp16", 0)
    else:
        assert (upscaler.device.type, upscaler.precision, upscaler.micro_batch) == ("cpu", "fp32", 1)
        assert upscaler.memory_info() is None


def test_compact_scales_from_state_dict(tmp_path: Path) -> None:
    for scale in (1, 2, 3, 4):
        path = write_official(tmp_path / f"c{scale}.pth", compact_state_dict(scale=scale), key="params")
        upscaler: Upscaler = load_upscaler(str(path), cpu())
        assert upscaler.native_scale == scale
        assert upscaler.upscale(frames(1, 6, 5)).shape == (1, 6 * scale, 5 * scale, 3)


# -- the pixel budget: passes split, large frames tiled, each tile finished on its own --------------------


@pytest.mark.parametrize(("native", "out"), [(64, 32), (64, 48), (67, 23), (16, 40), (90, 90), (360, 213)])
def test_resize_taps_are_the_weights_of_the_whole_frame_resize(native: int, out: int) -> None:
    x = torch.rand(1, 3, native, 7, dtype=torch.float64)
    whole = F.interpolate(x, size=(out, 7), mode="bicubic", antialias=True, align_corners=False)
    first, weights = resize_taps(native, out, 0, out)
    index = np.minimum(first[:, None] + np.arange(weights.shape[1]), native - 1)
    mine = (x[0, :, index, :] * torch.from_numpy(weights)[None, :, :, None]).sum(dim=2)
    np.testing.assert_allclose(mine.numpy(), whole[0].numpy(), atol=1e-6)
    part_first, part_weights = resize_taps(native, out, out // 3, out // 2)  # any span: the same taps
    np.testing.assert_array_equal(part_first, first[out // 3 : out // 2])
    np.testing.assert_allclose(part_weights, weights[out // 3 : out // 2, : part_weights.shape[1]])


@pytest.mark.parametrize("scale", [4.0, 2.0, 3.0, 1.5, 2.37, 5.0])
def test_a_frame_above_the_pixel_budget_is_tiled_and_matches_the_whole_frame(
    compact_path: Path, scale: float
) -> None:
    batch = frames(2, 90, 130, seed=8)
    whole = load_upscaler(str(compact_path), cpu(scale=scale)).upscale(batch)
    budget = load_upscaler(str(compact_path), cpu(scale=scale, max_pass_pixels=48 * 48, tile_pad=12))
    assert budget._tile_edge(90, 130) == 32 and budget._tile_edge(40, 40) == 0
    tiled = budget.upscale(batch)
    assert tiled.shape == whole.shape == (2, round(90 * scale), round(130 * scale), 3)
    difference = np.abs(tiled.astype(int) - whole.astype(int))
    assert difference.max() <= 1 and difference.mean() < 1e-3  # float rounding only, no seams


class _CountingPasses(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.frames: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.frames.append(x.shape[0])
        return self.inner(x)


def test_the_pixel_budget_splits_batches_into_passes(compact_path: Path) -> None:
    batch = frames(5, 16, 16, seed=9)
    whole = load_upscaler(str(compact_path), cpu(max_batch=5)).upscale(batch)
    upscaler = load_upscaler(str(compact_path), cpu(max_batch=5, max_pass_pixels=2 * 16 * 16))
    counting = _CountingPasses(upscaler._model)
    upscaler._model = counting
    np.testing.assert_array_equal(upscaler.upscale(batch), whole)
    assert counting.frames == [2, 2, 1]


def test_runtime_settings_are_taken_from_a_record_with_fields_of_the_same_names() -> None:
    """The worker's settings and a comparison's spec become a runtime's settings in one place
    (worker.upscaling.settings_from), fields named otherwise given by the caller."""
    from types import SimpleNamespace

    from worker.upscaling import settings_from

    source = SimpleNamespace(device="cpu", precision="fp32", scale=3.0, tile=64, tile_pad=4, port=8090)
    got = settings_from(RuntimeSettings, source, max_pass_pixels=4096)
    assert got == RuntimeSettings(
        device="cpu", precision="fp32", scale=3.0, tile=64, tile_pad=4, max_pass_pixels=4096
    )
    with pytest.raises(ValueError, match="device"):  # what comes in is checked as any settings are
        settings_from(RuntimeSettings, SimpleNamespace(device="tpu"))
