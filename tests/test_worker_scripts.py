"""scripts/start_workers.sh and scripts/stop_workers.sh, for hosts without systemd, with real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.workerutil import request, running

REPO = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ESRFARM_PYTHON": sys.executable}
    return subprocess.run(
        [str(REPO / "scripts" / name), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_start_n_workers_wait_for_health_record_pids_and_stop_cleanly(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    worker_flags = ["--shared-root", str(shared_root), "--model", str(tiny_model), "--cpu-threads", "1"]
    started = run_script(
        "start_workers.sh", "2", "--cpu", "--base-port", "0", "--run-dir", str(run_dir), *worker_flags
    )
    assert started.returncode == 0, started.stderr
    workers = json.loads((run_dir / "workers.json").read_text())["workers"]
    try:
        assert [w["index"] for w in workers] == [0, 1]
        assert len({w["url"] for w in workers}) == 2
        for record in workers:
            assert running(record["pid"])
            health = request(record["url"] + "/health")
            assert health.status == 200 and health.json()["pid"] == record["pid"]
            assert health.json()["device"] == "cpu"
        assert "2 worker(s) healthy" in started.stdout

        again = run_script(
            "start_workers.sh", "1", "--cpu", "--base-port", "0", "--run-dir", str(run_dir), *worker_flags
        )
        assert again.returncode == 1 and "still running; stop them first" in again.stderr
    finally:
        stopped = run_script("stop_workers.sh", "--run-dir", str(run_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count("stopped cleanly") == 2
    assert not any(running(w["pid"]) for w in workers)
    assert not (run_dir / "workers.json").exists()
    for index in (0, 1):
        assert "worker.service: stopped" in (run_dir / f"worker-{index}.log").read_text()


def test_a_worker_that_cannot_start_fails_the_script_and_stops_the_others(
    shared_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_script(
        "start_workers.sh", "1", "--cpu", "--base-port", "0", "--run-dir", str(run_dir),
        "--shared-root", str(shared_root), "--model", str(tmp_path / "no-such-model.pth"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "worker 0 exited with status 3" in result.stderr and "no-such-model.pth" in result.stderr
    assert not (run_dir / "workers.json").exists()


def test_arguments_are_checked_before_anything_starts() -> None:
    for args in ([], ["zero"], ["0"]):
        result = run_script("start_workers.sh", *args)
        assert result.returncode == 2 and "start_workers.sh N" in result.stderr
