"""The ncnn (Vulkan) backend, on Mesa's lavapipe: conversion, the runtime, a worker, a whole job.

lavapipe (Debian's ``mesa-vulkan-drivers``) is a Vulkan device on the CPU, so everything here runs
without a GPU; ``.ci/run`` installs it. It is slow, so frames are tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from manifests import plan_batches
from media.extract import decode_frames
from tests import clips
from tests.model_factory import compact_state_dict, rrdb_state_dict, write_official
from tests.videocheck import assert_faithful_upscale
from tests.workerutil import REPO, make_job, read_frame, start_worker
from worker.models import CATALOG, ModelLoadError, load_model_file, resolve_ncnn_model
from worker.ncnn_runtime import (
    NcnnSettings,
    NcnnUpscaler,
    _OutOfMemory,
    load_ncnn_upscaler,
    vulkan_devices,
)
from worker.ncnn_weights import official_state_dict
from worker.runtime import RuntimeSettings, load_upscaler
from worker.upscaling import InferenceError

pytestmark = pytest.mark.skipif(
    not vulkan_devices(), reason="no Vulkan device: install mesa-vulkan-drivers (lavapipe)"
)

#: ncnn in fp32 against torch in fp32: the same sums in another order, so a sample that lands
#: within a rounding error of .5 may round the other way: at most one level, almost never.
FP32_MAX, FP32_MEAN = 1, 0.01
#: The raw float output of a converted network in fp32 on both backends: a correct graph agrees to
#: about 1e-7; a residual coefficient off by a quarter differs by 8e-4 (tried).
FLOAT_TOLERANCE = 1e-5
#: ncnn in fp16 (storage and arithmetic: 11 significant bits, a relative error of 2^-11 per step,
#: compounded over the network) against torch in fp32: a few levels at most, well under one on average.
FP16_MAX, FP16_MEAN, FP16_PSNR = 24, 1.0, 40.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float]:
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return int(diff.max()), float(diff.mean()), psnr(a, b)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ncnn-cache")


@pytest.fixture(scope="module")
def tiny_ncnn(tiny_model: Path, cache: Path) -> NcnnUpscaler:
    return NcnnUpscaler(resolve_ncnn_model(str(tiny_model), cache_dir=cache), NcnnSettings(precision="fp32"))


def frames(count: int, height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


# -- .pth -> ncnn ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("compact-prelu", lambda: compact_state_dict(scale=4, num_feat=8, num_conv=3, seed=3)),
        ("compact-x2", lambda: compact_state_dict(scale=2, num_feat=8, num_conv=2, seed=4)),
        ("rrdb-x4", lambda: rrdb_state_dict(scale=4, num_feat=8, num_block=2, seed=5)),
    ],
)
def test_a_model_file_is_converted_once_and_runs_as_torch_does(
    name: str, state: object, tmp_path: Path, cache: Path
) -> None:
    path = write_official(tmp_path / f"{name}.pth", state())  # type: ignore[operator]
    files = resolve_ncnn_model(str(path), cache_dir=cache)
    assert files.source == "converted" and files.param.parent == cache / "ncnn"
    # The written .bin reads back to the very tensors of the file, in the official layout.
    arrays = official_state_dict(files.param, files.weights, architecture=files.architecture)
    official = torch.load(path, weights_only=True)["params_ema"]
    assert len(arrays) == len(official)
    for ours, theirs in zip(arrays.values(), official.values(), strict=True):
        np.testing.assert_array_equal(ours, theirs.numpy().reshape(ours.shape))
    # And the graph computes what torch computes: the raw float outputs (a tiny random network's
    # output may span only a few levels, so 8-bit frames alone would hide a wrong coefficient) ...
    upscaler = NcnnUpscaler(files, NcnnSettings(precision="fp32"))
    x = np.random.default_rng(1).random((3, 20, 24), dtype=np.float32)
    network = load_model_file(path).model.eval()  # type: ignore[attr-defined]
    with torch.inference_mode():
        expected = network(torch.from_numpy(x)[None])[0].numpy()
    assert np.abs(upscaler._native(x) - expected).max() < FLOAT_TOLERANCE
    # ... and the frames (fp32 both: within a rounding step).
    batch = frames(2, seed=6)
    ncnn_out = upscaler.upscale(batch)
    torch_out = load_upscaler(str(path), RuntimeSettings(device="cpu", cpu_threads=1)).upscale(batch)
    assert ncnn_out.shape == torch_out.shape
    worst, mean, _ = difference(ncnn_out, torch_out)
    assert worst <= FP32_MAX and mean <= FP32_MEAN, (worst, mean)
    again = resolve_ncnn_model(str(path), cache_dir=cache)
    assert (again.source, again.param, again.architecture, again.scale) == (
        "cache", files.param, files.architecture, files.scale,
    )  # fmt: skip


def test_an_architecture_without_an_ncnn_graph_is_refused(tmp_path: Path, cache: Path) -> None:
    path = write_official(tmp_path / "rrdb-x2.pth", rrdb_state_dict(scale=2, num_feat=8, num_block=1))
    with pytest.raises(ModelLoadError, match=r"RRDBNet models at x4 \(use --backend torch\)"):
        resolve_ncnn_model(str(path), cache_dir=cache)
    assert not list((cache / "ncnn").glob("rrdb-x2-*")), "nothing half-written is left in the cache"
    # A catalog model of that kind is refused before anything would be downloaded.
    with pytest.raises(ModelLoadError, match="model realesrgan-x2plus is an RRDBNet at x2; the ncnn backend"):
        resolve_ncnn_model("realesrgan-x2plus", cache_dir=tmp_path / "empty", allow_download=False)


# -- the runtime ----------------------------------------------------------------------------------


def test_tiles_and_other_scales_give_the_whole_frames_output(
    tiny_ncnn: NcnnUpscaler, tiny_model: Path
) -> None:
    batch = frames(2, height=40, width=72, seed=7)
    whole = tiny_ncnn.upscale(batch)
    assert whole.shape == (2, 160, 288, 3)
    files = tiny_ncnn.files
    tiled = NcnnUpscaler(files, NcnnSettings(precision="fp32", tile=32, tile_pad=8))
    # 8 pixels of context cover the tiny network's receptive field (4 convolutions: 4 pixels).
    worst, _, _ = difference(tiled.upscale(batch), whole)
    assert worst <= FP32_MAX
    budget = NcnnUpscaler(files, NcnnSettings(precision="fp32", max_pass_pixels=48 * 48, tile_pad=8))
    assert budget._tile_edge(40, 72) == 32
    assert difference(budget.upscale(batch), whole)[0] <= FP32_MAX
    # Another scale: the torch backend's resize, applied to the native output.
    reference = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1))
    for scale in (2.0, 3.0):
        ours, theirs = tiny_ncnn.upscale(batch, scale), reference.upscale(batch, scale)
        assert ours.shape == theirs.shape == (2, round(40 * scale), round(72 * scale), 3)
        assert difference(ours, theirs)[0] <= FP32_MAX


def test_16_bit_frames_stay_16_bit(tiny_ncnn: NcnnUpscaler) -> None:
    wide = frames(1, seed=8).astype(np.uint16) * 257
    out = tiny_ncnn.upscale(wide)
    assert out.dtype == np.uint16
    narrow = tiny_ncnn.upscale(frames(1, seed=8))
    assert np.abs(out.astype(np.int64) / 257 - narrow).max() <= 1


def test_out_of_vulkan_memory_shrinks_the_tiles_then_fails_clearly(
    tiny_ncnn: NcnnUpscaler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ncnn reports a failed allocation as a non-zero status of extract: the boundary faked here."""
    import worker.ncnn_runtime as runtime

    batch = frames(1, height=80, width=96, seed=9)
    expected = tiny_ncnn.upscale(batch)
    real = runtime._extract
    tiny_ncnn._tile, tiny_ncnn.settings = 0, NcnnSettings(precision="fp32", tile_pad=8)

    def small_pieces_only(net: object, chw: np.ndarray) -> np.ndarray:
        if chw.shape[1] * chw.shape[2] > 64 * 64:
            raise _OutOfMemory(-100)
        return real(net, chw)

    monkeypatch.setattr(runtime, "_extract", small_pieces_only)
    out = tiny_ncnn.upscale(batch)
    assert tiny_ncnn.tile == 48  # 96 -> 48: a 48-pixel tile with 8 pixels of context fits
    assert difference(out, expected)[0] <= FP32_MAX

    def never(net: object, chw: np.ndarray) -> np.ndarray:
        raise _OutOfMemory(-100)

    monkeypatch.setattr(runtime, "_extract", never)
    with pytest.raises(InferenceError, match=r"even with 32-pixel tiles \(ncnn status -100\)"):
        tiny_ncnn.upscale(batch)
    tiny_ncnn._tile = 0


# -- agreement with the torch backend on real frames ----------------------------------------------

OFFICIAL = ["realesr-animevideov3", "realesrgan-x4plus-anime", "realesrgan-x4plus"]


@pytest.fixture(scope="module")
def clip_frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    source = clips.video(tmp_path_factory.mktemp("agree") / "agree.mp4", size="32x24", frames=2)
    return np.stack(list(decode_frames(source)))


@pytest.mark.parametrize("model", OFFICIAL)
def test_the_official_models_agree_with_the_torch_backend(model: str, clip_frames: np.ndarray) -> None:
    """fp16 on the device against torch's fp32 on the CPU, within the tolerance stated above (and
    README's "Backends"); Big Buck Bunny's figures are in benchmarks/RESULTS.md."""
    assert CATALOG[model].ncnn is not None
    ncnn_out = load_ncnn_upscaler(model, NcnnSettings(), allow_download=False).upscale(clip_frames)
    torch_out = load_upscaler(model, RuntimeSettings(device="cpu"), allow_download=False).upscale(clip_frames)
    worst, mean, ratio = difference(ncnn_out, torch_out)
    assert worst <= FP16_MAX and mean <= FP16_MEAN and ratio >= FP16_PSNR, (worst, mean, ratio)
    # The tolerance is tight enough to catch a wrong model: another model's output is far off.
    other = load_ncnn_upscaler(
        OFFICIAL[(OFFICIAL.index(model) + 1) % 3], NcnnSettings(), allow_download=False
    )
    assert psnr(other.upscale(clip_frames), torch_out) < FP16_PSNR


# -- the worker and a whole job -------------------------------------------------------------------


def test_a_worker_on_the_ncnn_backend_completes_a_manifest(
    shared_root: Path, tiny_model: Path, tiny_ncnn: NcnnUpscaler, tmp_path: Path
) -> None:
    env = {"ESRFARM_MODEL_DIR": str(tmp_path / "models")}
    worker = start_worker(
        shared_root, tiny_model, tmp_path, backend="ncnn", args=["--precision", "fp32"], env=env
    )
    try:
        health = worker.get("/health").json()
        assert (health["backend"], health["precision"], health["gpu"]) == ("ncnn", "fp32", "0")
        assert health["device"] == vulkan_devices()[0]
        memory = health["gpu_memory"]
        assert (memory["source"], memory["used"]) == ("vulkan", None) and memory["total"] > 0
        job = make_job(shared_root, "ncnn-job", 7, height=16, width=24, seed=10)
        planned = plan_batches(7, 3, ["w"], first_frame=1).batches
        manifest = job.manifest("n0", tiny_model.stem, planned, scale=4.0)
        assert worker.post("/process_manifest", {"manifest_path": job.write_manifest(manifest)}).status == 202
        final = worker.wait_final("n0", job.layout.job_id)
        assert final["state"] == "completed", final
        assert (final["batches_done"], final["frames_done"], final["errors"]) == (3, 7, [])
        for index, frame in job.frames.items():
            np.testing.assert_array_equal(
                read_frame(job.output_path(index)), tiny_ncnn.upscale(frame[None])[0]
            )
    finally:
        worker.stop()


def test_a_worker_without_a_vulkan_device_exits_with_one_line(shared_root: Path, tiny_model: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VK_ICD_FILENAMES": "/nonexistent/icd.json"}
    env["VK_DRIVER_FILES"] = env["VK_ICD_FILENAMES"]
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--backend", "ncnn", "--shared-root", str(shared_root),
         "--model", str(tiny_model), "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    ours = [line for line in result.stderr.splitlines() if line.startswith("esrfarm worker:")]
    assert ours == [
        "esrfarm worker: error: --backend ncnn: no Vulkan device found: install the GPU's Vulkan driver "
        "(on the CPU: Mesa's lavapipe, Debian's mesa-vulkan-drivers) or run --backend torch"
    ]


def test_upscale_with_the_ncnn_backend_is_frame_exact(tiny_model: Path, tmp_path: Path) -> None:
    source = clips.video_with_audio(tmp_path / "in.mp4", rate="30000/1001", seconds=1.0, size="32x24")
    output = tmp_path / "out.mp4"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ESRFARM_MODEL_DIR": str(tmp_path / "models")}
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output), "--scale", "2",
         "--model", str(tiny_model), "--backend", "ncnn", "--shared-root", str(tmp_path / "root"),
         "--batch-size", "8", "--preset", "ultrafast", "-v"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "started local worker 0" in result.stderr and "--gpu 0" in result.stderr
    assert_faithful_upscale(source, output, 2)
