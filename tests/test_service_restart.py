"""The service killed (SIGKILL) in the middle of a job and started again: the queued job is still
queued, the running one continues from its finished work, and its output equals an uninterrupted
run's frame for frame (lossless FFV1)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from media.extract import decode_frames
from service.cli import EXIT_DATABASE
from tests import clips
from tests.serviceutil import service_command, start_service
from tests.test_service_store import HeldLock
from tests.workerutil import REPO, WorkerProcess, cpu_workers, start_worker

pytestmark = pytest.mark.timeout(900)
LOADED = 400.0  # seconds a job of these tests may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def farm(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[Path, list[WorkerProcess]]]:
    root = tmp_path_factory.mktemp("restart-root")
    with cpu_workers(root, tiny_model, tmp_path_factory.mktemp("restart-logs")) as workers:
        yield root, workers


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
        # The job may end on the other worker before the health rounds give this one up (a loaded
        # machine): wait for it, as long as a loaded machine may need (--unreachable-timeout 1).
        deadline = time.monotonic() + 120
        while [w["state"] for w in service.get("/api/workers").json()][1] != "lost":
            assert time.monotonic() < deadline, "the killed worker is never given up"
            time.sleep(0.1)
        port = dying.url.rsplit(":", 1)[1]
        workers[1] = start_worker(root, tiny_model, tmp_path / "logs", args=["--port", port])
        nxt = service.submit(inputs=[str(long)], models=[str(tiny_model)], scales=[3])["jobs"][0]
        assert service.wait_state(nxt["id"], "done", "failed", timeout=LOADED)["state"] == "done"
        assert "409" not in workers[1].log()
        assert " done (frames " in workers[1].log(), "the restarted worker is used again"
    finally:
        service.stop()


def test_partial_uploads_go_a_locked_database_answers_503_a_broken_one_stops_the_service(
    tmp_path: Path, tiny_model: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = str(clips.video(inputs / "clip.mp4", frames=4))
    root = tmp_path / "root"
    args = [
        "--local-workers",
        "1",
        "--worker-arg=--device=cpu",
        "--input-root",
        inputs,
        "--db-lock-timeout",
        "0.3",
    ]
    uploads = root / "service" / "uploads"
    uploads.mkdir(parents=True)
    (uploads / f".{'a' * 32}.part").write_bytes(b"the start of an upload a SIGKILL interrupted")
    (uploads / ("b" * 32)).write_bytes(b"a whole upload")
    service = start_service(root, tmp_path / "logs", args)
    try:
        assert sorted(p.name for p in uploads.iterdir()) == ["b" * 32], "partial uploads are removed at start"
        lock = HeldLock(root / "service" / "jobs.db")
        try:
            refused = service.post(
                "/api/jobs", {"inputs": [source], "models": [str(tiny_model)], "priority": 1}
            )
            assert refused.status == 503, (refused.status, refused.body)
            assert "database is locked" in refused.json()["error"] and refused.headers["Retry-After"]
            assert service.get("/api/jobs").json() == [], "reads go on meanwhile"
        finally:
            lock.release()
        job = service.submit(inputs=[source], models=[str(tiny_model)], priority=1)["jobs"][
            0
        ]  # the lock is gone: it works again
        assert service.job(job["id"])["priority"] == 1
    finally:
        assert service.stop() == 0
    assert "Traceback" not in service.log_path.read_text()

    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database at all " * 300)
    run = subprocess.run(
        service_command(root, ["--db", broken, "--port", "0", "--local-workers", "1"]),
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == EXIT_DATABASE, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == [f"esrfarm serve: error: the database {broken} cannot be used: "
                                       "file is not a database"], run.stderr  # fmt: skip


def test_serve_says_where_it_listens_and_that_it_stopped(tmp_path: Path) -> None:
    process = subprocess.Popen(
        service_command(tmp_path / "root", ["--port", "0", "--local-workers", "1"]),
        stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # without -v
        assert first.startswith("esrfarm serve: listening on http://127.0.0.1:"), first
        url = first.split()[4]
        with urllib.request.urlopen(f"{url}/healthz", timeout=30) as answer:
            assert answer.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        rest = process.stderr.read().splitlines()
        assert len(rest) == 1 and rest[0].startswith("esrfarm serve: stopped"), rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(60)
