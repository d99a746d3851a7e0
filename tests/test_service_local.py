"""The service with local workers: it starts them with the model the next jobs need, runs the queued
jobs of that model together, and switches model once they are done; a model that cannot load fails
its job with the reason and the next job still runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import clips
from tests.model_factory import write_tiny_compact
from tests.serviceutil import start_service

pytestmark = pytest.mark.timeout(300)


def test_local_workers_switch_model_between_groups(tiny_model: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    small = str(clips.video(inputs / "small.mp4", frames=6))
    other = str(clips.video(inputs / "other.mp4", frames=4))
    second_model = str(write_tiny_compact(tmp_path / "tiny-b-x4.pth", seed=1))
    first_model = str(tiny_model)
    args = [
        "--local-workers", "1", "--worker-arg=--device=cpu", "--worker-arg=--cpu-threads=1",
        "--worker-arg=--warmup-size=16", "--input-root", inputs, "--max-running", "2",
    ]  # fmt: skip
    service = start_service(tmp_path / "root", tmp_path / "logs", args)
    try:
        batch = service.submit(inputs=[small], models=[first_model, second_model], scales=[2])["jobs"]
        later = service.submit(inputs=[other], models=[first_model], scales=[2])["jobs"][0]
        jobs = [*batch, later]
        finished = {job["id"]: service.wait_state(job["id"], "done", "failed") for job in jobs}
        assert all(job["state"] == "done" for job in finished.values()), finished
        b_started = finished[batch[1]["id"]]["started_at"]
        assert finished[later["id"]]["finished_at"] <= b_started, "the first model's jobs ran together"
        log = service.log_path.read_text()
        switches = [line for line in log.splitlines() if "starting local workers with model" in line]
        assert [line.rsplit(" ", 1)[1] for line in switches] == [first_model, second_model]
        broken = service.submit(inputs=[small], models=[str(tmp_path / "missing.pth")], scales=[2])["jobs"][0]
        after = service.submit(inputs=[other], models=[second_model], scales=[2])["jobs"][0]
        failed = service.wait_state(broken["id"], "done", "failed", timeout=200)
        assert failed["state"] == "failed" and "missing.pth" in failed["error"], failed
        assert service.wait_state(after["id"], "done", "failed", timeout=200)["state"] == "done"
        workers = service.get("/api/workers").json()
        assert [w["model"] for w in workers] == ["tiny-b-x4"]
    finally:
        service.stop()


def test_local_workers_switch_backend_between_jobs(tiny_model: Path, tmp_path: Path) -> None:
    """A job of the ncnn backend gets local workers of that backend (Vulkan: lavapipe here), the
    torch job before it torch workers: jobs are grouped by model and backend, like by model alone."""
    from worker.ncnn_runtime import vulkan_devices

    if not vulkan_devices():
        pytest.skip("no Vulkan device: install mesa-vulkan-drivers (lavapipe)")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    small = str(clips.video(inputs / "small.mp4", size="32x24", frames=4))
    args = ["--local-workers", "1", "--worker-arg=--warmup-size=16", "--input-root", inputs]
    service = start_service(tmp_path / "root", tmp_path / "logs", args)
    try:
        model = str(tiny_model)
        first = service.submit(inputs=[small], models=[model], scales=[2])["jobs"][0]
        second = service.submit(inputs=[small], models=[model], scales=[2], backend="ncnn")["jobs"][0]
        for job in (first, second):
            assert service.wait_state(job["id"], "done", "failed", timeout=240)["state"] == "done"
        log = service.log_path.read_text()
        switches = [line for line in log.splitlines() if "starting local workers with model" in line]
        assert [line.split("with model ", 1)[1] for line in switches] == [model, f"{model} [ncnn]"]
        refused = service.post("/api/jobs", {"inputs": [small], "backend": "vulkan"})
        assert refused.status == 400 and "backend" in refused.json()["error"], refused.body
    finally:
        service.stop()
