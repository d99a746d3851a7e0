"""The service killed (SIGKILL) in the middle of a job and started again: the queued job is still
queued, the running one continues from its finished work, and its output equals an uninterrupted
run's frame for frame (lossless FFV1)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.extract import decode_frames
from tests import clips
from tests.serviceutil import start_service
from tests.workerutil import WorkerProcess, start_worker

pytestmark = pytest.mark.timeout(900)
LOADED = 400.0  # seconds a job of these tests may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def farm(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[Path, list[WorkerProcess]]]:
    root = tmp_path_factory.mktemp("restart-root")
    logs = tmp_path_factory.mktemp("restart-logs")
    workers = [start_worker(root, tiny_model, logs) for _ in range(2)]
    yield root, workers
    for worker in workers:
        worker.stop()


def test_killed_service_resumes_its_jobs(
    farm: tuple[Path, list[WorkerProcess]], tiny_model: Path, tmp_path: Path
) -> None:
    root, workers = farm
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    long = clips.video(inputs / "long.mp4", size="320x180", frames=90)
    small = clips.video(inputs / "small.mp4", frames=8)
    args = ["--workers", ",".join(w.url for w in workers), "--input-root", inputs, "--max-running", "1"]
    job = {"models": [str(tiny_model)], "scales": [2], "codec": "ffv1", "preset": None}
    service = start_service(root, tmp_path / "logs", args)
    try:
        first = service.submit(inputs=[str(long)], **job)["jobs"][0]
        waiting = service.submit(inputs=[str(small)], **job)["jobs"][0]
        seen = service.wait_job(
            first["id"], lambda j: j["stage"] == "upscaling" and 16 <= j["frames_done"] < j["frames_total"]
        )
        assert service.job(waiting["id"])["state"] == "queued"
    finally:
        service.stop(signal.SIGKILL)
    assert not Path(first["output"]).exists()
    service = start_service(root, tmp_path / "logs", args)
    try:
        assert service.job(waiting["id"])["state"] == "queued", "a queued job stays queued"
        resumed = service.wait_state(first["id"], "done", "failed", timeout=240)
        assert resumed["state"] == "done", resumed
        assert resumed["frames_done"] == resumed["frames_total"] == 90
        assert service.wait_state(waiting["id"], "done", "failed")["state"] == "done"
        log = service.log_path.read_text()
        assert "resuming job" in log and "queued again the job(s) a stopped service left running" in log
        assert seen["frames_done"] > 0
        again = service.submit(inputs=[str(long)], **job)["jobs"][0]
        uninterrupted = service.wait_state(again["id"], "done", "failed", timeout=240)
        assert uninterrupted["state"] == "done", uninterrupted
    finally:
        service.stop()
    frames = list(decode_frames(Path(resumed["output"])))
    expected = list(decode_frames(Path(uninterrupted["output"])))
    assert len(frames) == len(expected) == 90
    for index, (got, want) in enumerate(zip(frames, expected, strict=True)):
        assert np.array_equal(got, want), f"frame {index + 1} differs from the uninterrupted run's"


def test_sigterm_leaves_the_running_job_queued(
    farm: tuple[Path, list[WorkerProcess]], tiny_model: Path, tmp_path: Path
) -> None:
    root, workers = farm
    long = clips.video(tmp_path / "long.mp4", size="320x180", frames=90)
    args = [
        "--workers",
        ",".join(w.url for w in workers),
        "--input-root",
        tmp_path,
        "--db",
        tmp_path / "j.db",
    ]
    service = start_service(root, tmp_path / "logs", args)
    job = service.submit(inputs=[str(long)], models=[str(tiny_model)], scales=[2])["jobs"][0]
    service.wait_job(job["id"], lambda j: j["stage"] == "upscaling" and j["frames_done"] > 0)
    started = time.monotonic()
    assert service.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 15
    assert not Path(job["output"]).exists()
    for worker in workers:  # their manifests were reset: nothing holds them
        worker.wait_status(lambda s: s["state"] != "processing", timeout=30)
    service = start_service(root, tmp_path / "logs", args)
    try:
        assert service.wait_state(job["id"], "done", "failed")["state"] == "done"
    finally:
        service.stop()


def test_a_dying_worker_costs_its_batches_not_the_job(
    farm: tuple[Path, list[WorkerProcess]], tiny_model: Path, tmp_path: Path
) -> None:
    root, workers = farm
    long = clips.video(tmp_path / "long.mp4", size="320x180", frames=90)
    args = [
        "--workers", ",".join(w.url for w in workers), "--input-root", tmp_path, "--db", tmp_path / "j.db",
        "--unreachable-timeout", "1",
    ]  # fmt: skip
    service = start_service(root, tmp_path / "logs", args)
    try:
        job = service.submit(inputs=[str(long)], models=[str(tiny_model)], scales=[2])["jobs"][0]
        service.wait_job(
            job["id"], lambda j: j["stage"] == "upscaling" and j["frames_done"] >= 8, timeout=LOADED
        )
        on_batch: list[dict[str, object]] = []
        while not on_batch and service.job(job["id"])["state"] == "running":
            on_batch = [w for w in service.get("/api/workers").json() if isinstance(w["batch"], int)]
            time.sleep(0.01)
        assert on_batch, "/api/workers shows the batch a worker is on while the job upscales"
        dying = workers[1]
        dying.stop(signal.SIGKILL)
        done = service.wait_state(job["id"], "done", "failed", timeout=LOADED)
        assert done["state"] == "done", done
        assert [w["state"] for w in service.get("/api/workers").json()][1] == "lost"
        port = dying.url.rsplit(":", 1)[1]
        workers[1] = start_worker(root, tiny_model, tmp_path / "logs", args=["--port", port])
        nxt = service.submit(inputs=[str(long)], models=[str(tiny_model)], scales=[3])["jobs"][0]
        assert service.wait_state(nxt["id"], "done", "failed", timeout=LOADED)["state"] == "done"
        assert "409" not in workers[1].log()
        assert " done (frames " in workers[1].log(), "the restarted worker is used again"
    finally:
        service.stop()
