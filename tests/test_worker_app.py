"""The worker app in-process: /health is 503 until the model is loaded, then 200.

The model loader is the app factory's public ``load_model`` parameter; here it waits on an event so
the test controls when loading ends.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from manifests.tokens import TokenError, read_token
from worker.cli import pixel_count
from worker.service import create_app
from worker.settings import SettingsError, WorkerSettings


class NearestUpscaler:
    """A stand-in for the runtime's Upscaler: nearest-neighbour x2 on the CPU."""

    backend = "torch"
    model_name = "nearest"
    architecture = "nearest"
    native_scale = 2
    scale = 2.0
    precision = "fp32"
    device_name = "cpu"

    class device:  # mimics torch.device
        type = "cpu"

    def upscale(self, frames: np.ndarray) -> np.ndarray:
        return np.asarray(frames.repeat(2, axis=1).repeat(2, axis=2))

    def warmup(self, height: int = 64, width: int = 64) -> None:
        self.upscale(np.zeros((1, height, width, 3), dtype=np.uint8))

    def memory_info(self) -> dict[str, int] | None:
        return None


def test_health_is_503_until_the_model_is_ready(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_loader(settings: WorkerSettings) -> Any:
        assert release.wait(30)
        return NearestUpscaler()

    async def scenario() -> None:
        app = create_app(
            WorkerSettings(shared_root=tmp_path, model="nearest", port=0), load_model=slow_loader
        )
        async with TestClient(TestServer(app)) as client:
            loading = await client.get("/health")
            assert loading.status == 503
            body = await loading.json()
            assert (body["state"], body["ready"]) == ("loading", False)
            refused = await client.post("/process_manifest", json={"manifest_path": "m.json"})
            assert refused.status == 503 and "not ready" in (await refused.json())["error"]

            release.set()
            for _ in range(500):
                ready = await client.get("/health")
                if ready.status == 200:
                    break
                await asyncio.sleep(0.01)
            assert ready.status == 200
            assert (await ready.json())["model"] == "nearest"

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_a_failed_load_stays_503_and_says_why(tmp_path: Path) -> None:
    def broken_loader(settings: WorkerSettings) -> Any:
        raise RuntimeError("weights file is truncated")

    async def scenario() -> None:
        app = create_app(
            WorkerSettings(shared_root=tmp_path, model="broken", port=0), load_model=broken_loader
        )
        async with TestClient(TestServer(app)) as client:
            for _ in range(500):
                body = await (await client.get("/health")).json()
                if body["state"] != "loading":
                    break
                await asyncio.sleep(0.01)
            response = await client.get("/health")
            assert response.status == 503
            assert (await response.json())["error"] == "RuntimeError: weights file is truncated"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"host": "0.0.0.0"},
            "--host 0.0.0.0 exposes the worker beyond this machine, so it needs a bearer token",
        ),
        (
            {"host": "10.1.2.3", "token": "  "},
            "--token-file (or ESRFARM_WORKER_TOKEN) gives an empty bearer token",
        ),
        ({"gpu": 1, "device": "cpu"}, "--gpu 1 and --device cpu cannot both be given"),
        ({"backend": "ncnn", "device": "cpu"}, "--device is for the torch backend"),
        # limits declared on the fields
        ({"port": 70000}, "--port must be at most 65535, not 70000"),
        ({"gpu": -1}, "--gpu must be at least 0, not -1"),
        ({"shutdown_timeout_s": 0}, "--shutdown-timeout must be above 0.0, not 0"),
        ({"header_timeout_s": 0}, "--header-timeout must be above 0.0, not 0"),
        ({"body_timeout_s": -1}, "--body-timeout must be above 0.0, not -1"),
        ({"max_output_pixels": 0}, "--max-output-pixels must be at least 1, not 0"),
        ({"max_connections": 0}, "--max-connections must be at least 1, not 0"),
        ({"pixel_budget": 0}, "--pixel-budget must be at least 1, not 0"),
        ({"tile_pad": 2000}, "--tile-pad must be at most 1024, not 2000"),
        ({"simulate_latency_ms": -1.0}, "--simulate-latency-ms must be at least 0.0, not -1.0"),
    ],
)
def test_settings_are_validated_once(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        WorkerSettings(shared_root=tmp_path, model="m", **changes)
    assert message in str(info.value)


def test_settings_accept_loopback_without_a_token(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert WorkerSettings(shared_root=tmp_path, model="m", host=host).token is None
    assert "token='x'" not in repr(WorkerSettings(shared_root=tmp_path, model="m", token="x"))
    assert WorkerSettings(shared_root=tmp_path, model="m", gpu=2).device_spec == "cuda:2"


def test_token_comes_from_the_file_before_the_environment(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("file-token\n")
    assert read_token(tmp_path / "t", {"ESRFARM_WORKER_TOKEN": "env-token"}) == "file-token"
    assert read_token(None, {"ESRFARM_WORKER_TOKEN": " env-token "}) == "env-token"
    assert read_token(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="is empty"):
        read_token(tmp_path / "empty", {})
    with pytest.raises(TokenError, match="cannot read the token file"):
        read_token(tmp_path / "absent", {})


@pytest.mark.parametrize(
    ("text", "pixels"), [("8192x8192", 67_108_864), ("2048X1024", 2_097_152), ("500", 500)]
)
def test_pixel_flags_take_a_count_or_a_size(text: str, pixels: int) -> None:
    assert pixel_count(text) == pixels


@pytest.mark.parametrize("text", ["0", "12x", "big", "-4x4"])
def test_pixel_flags_refuse_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="pixel"):
        pixel_count(text)
