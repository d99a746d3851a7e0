"""A real job service process for tests: ``python -m service serve`` on 127.0.0.1, port 0, over real
worker processes; helpers to submit jobs and wait for their states over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from coordinator.errors import WorkerStartError
from coordinator.local_workers import wait_listening
from tests.workerutil import REPO, Response, WorkerProcess, request

START_TIMEOUT_S = 60.0
FAST = {"preset": "ultrafast"}


class ServiceProcess(WorkerProcess):
    """A service process: a child process with a URL, like a worker (get, post, log and stop are
    the worker's), plus the job API."""

    what = "the service"

    def delete(self, path: str) -> Response:
        return request(self.url + path, "DELETE", token=self.token)

    def submit(self, **body: Any) -> dict[str, Any]:
        response = self.post("/api/jobs", {**FAST, **body})
        assert response.status == 201, (response.status, response.body, self.log())
        result: dict[str, Any] = response.json()
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.get(f"/api/jobs/{job_id}")
        assert response.status == 200, response.body
        result: dict[str, Any] = response.json()
        return result

    def wait_job(
        self, job_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0
    ) -> dict[str, Any]:
        return self.wait_for("job", lambda: self.job(job_id), predicate, timeout)

    def wait_state(self, job_id: str, *states: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_job(job_id, lambda j: j["state"] in states, timeout)


def service_command(shared_root: Path, args: Sequence[str | Path]) -> list[str]:
    return [sys.executable, "-m", "service", "serve", "--shared-root", str(shared_root), *map(str, args)]


def start_service(
    shared_root: Path, log_dir: Path, args: Sequence[str | Path], *, token: str | None = None
) -> ServiceProcess:
    """Start the service on a free port and wait until ``/healthz`` answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / f"service-{time.monotonic_ns()}.json"
    log_path = port_file.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = service_command(shared_root, ["--port", "0", "--port-file", port_file, "-v", *args])
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        url = wait_listening(process, port_file, log_path, timeout_s=START_TIMEOUT_S)
    except WorkerStartError:
        process.kill()
        raise AssertionError(f"the service never listened:\n{log_path.read_text(errors='replace')}") from None
    service = ServiceProcess(process, url, log_path, token)
    assert service.get("/healthz").status == 200
    return service


def sse_events(
    url: str, headers: dict[str, str], stop: Callable[[list[dict[str, Any]]], bool], timeout: float = 90.0
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read ``event: job`` events from an SSE stream until ``stop(jobs so far)``: (id, job JSON).
    Fails if ``stop`` is not reached within ``timeout`` seconds (the service sends a comment line
    every 15 s, so a quiet stream is noticed)."""
    req = urllib.request.Request(url, headers=headers)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(req, timeout=60) as stream:
        event_id, kind, data = None, None, None
        for raw in stream:
            if time.monotonic() > deadline:
                raise AssertionError(f"the stream did not reach its end within {timeout}s; got {seen}")
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and event_id is not None:
                assert kind == "job" and data is not None
                seen.append(data)
                yield event_id, data
                event_id, kind, data = None, None, None
                if stop(seen):
                    return
