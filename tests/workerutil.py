"""Real worker processes for tests: start ``python -m worker`` on 127.0.0.1, talk to it over HTTP.

Also builds job directories (input frames, manifests) under a shared root, and a FIFO gate:
an input frame that is a named pipe blocks the worker's reader until the test releases it, so a
test can hold a manifest mid-way (like storage that stalls) without sleeping.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from PIL import Image

from coordinator.errors import WorkerStartError
from coordinator.local_workers import spawn_worker, wait_listening
from manifests import Batch, FrameFormat, JobLayout, Manifest, frame_filename, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
POLL_S = 0.02
T = TypeVar("T")


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str, method: str = "GET", body: bytes | dict[str, Any] | None = None, token: str | None = None
) -> Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return Response(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), dict(exc.headers))


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    token: str | None = None
    what: ClassVar[str] = "worker"  # what the process is, in failures

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str, **kwargs: Any) -> Response:
        return request(self.url + path, token=kwargs.pop("token", self.token), **kwargs)

    def post(self, path: str, body: bytes | dict[str, Any] | None = None, **kwargs: Any) -> Response:
        return request(
            self.url + path, "POST", body if body is not None else b"", token=kwargs.pop("token", self.token)
        )

    def status(self) -> dict[str, Any]:
        response = self.get("/status")
        assert response.status == 200, response.body
        return response.json()

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        return self.wait_for("status", self.status, predicate, timeout)

    def wait_for(self, name: str, read: Callable[[], T], predicate: Callable[[T], bool], timeout: float) -> T:
        """``read()`` once it satisfies ``predicate``; fails if the process exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            current = read()
            if predicate(current):
                return current
            if self.process.poll() is not None:
                raise AssertionError(f"{self.what} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never matched within {timeout}s; last: {current}\n{self.log()}")
            time.sleep(POLL_S)

    def wait_final(
        self, manifest_id: str, job_id: str | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        return self.wait_status(
            lambda s: (
                s["manifest_id"] == manifest_id
                and (job_id is None or s["job_id"] == job_id)
                and s["state"] in {"completed", "failed", "cancelled"}
            ),
            timeout,
        )

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-6000:]
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"worker did not exit within {timeout}s after signal {sig}:\n{self.log()}"
            ) from None


def start_worker(
    shared_root: Path,
    model: Path,
    log_dir: Path,
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    token: str | None = None,
    wait_healthy: bool = True,
    preexec_fn: Callable[[], None] | None = None,
    backend: str = "torch",
) -> WorkerProcess:
    """Start ``python -m worker`` on a free port (``--port 0``) and wait until ``/health`` is 200.

    ``preexec_fn`` runs in the child before it starts (e.g. to lower a resource limit). The torch
    backend runs on the CPU with one thread; ``backend="ncnn"`` on Vulkan device 0 (lavapipe here)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / f"port-{time.monotonic_ns()}.json"
    log_path = port_file.with_suffix(".log")
    device = ["--device", "cpu", "--cpu-threads", "1"] if backend == "torch" else ["--backend", backend]
    worker_args = [
        "--shared-root", str(shared_root), "--model", str(model), *device,
        "--port", "0", "--warmup-size", "16", *args,
    ]  # fmt: skip
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    process = spawn_worker(
        worker_args, port_file=port_file, log_file=log_path, env=environ, cwd=REPO, also_in_child=preexec_fn
    )
    worker = WorkerProcess(process, "", log_path, token)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        worker.url = wait_listening(process, port_file, log_path, timeout_s=START_TIMEOUT_S, poll_s=POLL_S)
    except WorkerStartError as exc:
        process.kill()
        raise AssertionError(f"{exc}:\n{worker.log()}") from None
    while wait_healthy and worker.get("/health").status != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"worker never became healthy:\n{worker.log()}")
        time.sleep(POLL_S)
    return worker


@contextlib.contextmanager
def cpu_workers(
    shared_root: Path, model: Path, log_dir: Path, count: int = 2
) -> Iterator[list[WorkerProcess]]:
    """``count`` real CPU worker processes on ``shared_root``, stopped on the way out."""
    started: list[WorkerProcess] = []
    try:
        for _ in range(count):
            started.append(start_worker(shared_root, model, log_dir))
        yield started
    finally:
        for worker in started:
            worker.stop()


# -- jobs on the shared root ---------------------------------------------------------------------


def random_frames(count: int, height: int = 16, width: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def encode_frame(frame: np.ndarray, frame_format: FrameFormat) -> bytes:
    buffer = io.BytesIO()
    if frame_format is FrameFormat.NPY:
        np.save(buffer, frame, allow_pickle=False)
    else:
        Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def read_frame(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@dataclass
class Job:
    layout: JobLayout
    frames: dict[int, np.ndarray]
    frame_format: FrameFormat

    @property
    def input_dir(self) -> Path:
        return self.layout.input_dir

    @property
    def output_dir(self) -> Path:
        return self.layout.output_dir

    def input_path(self, index: int) -> Path:
        return self.input_dir / frame_filename(index, self.frame_format)

    def output_path(self, index: int) -> Path:
        return self.output_dir / frame_filename(index, self.frame_format)

    def manifest(self, manifest_id: str, model: str, batches: Iterable[Batch], **options: Any) -> Manifest:
        return Manifest(
            job_id=self.layout.job_id,
            manifest_id=manifest_id,
            worker_id="test-worker",
            model=model,
            batches=tuple(batches),
            frame_format=self.frame_format,
            **options,
        )

    def write_manifest(self, manifest: Manifest) -> str:
        """Write the manifest into the job's manifests/ and return its path relative to the shared root."""
        path = self.layout.manifest_path(manifest.manifest_id)
        write_json_atomic(path, manifest.to_json())
        return str(path.relative_to(self.layout.shared_root))

    def read_status(self, manifest_id: str) -> dict[str, Any]:
        return json.loads(self.layout.status_path(manifest_id).read_bytes())

    def outputs(self) -> set[int]:
        """Indices of the finished output frames on disk; fails if a temporary file is left."""
        names = os.listdir(self.output_dir) if self.output_dir.exists() else []
        leftovers = [name for name in names if name.startswith(".")]
        assert not leftovers, f"temporary files left in output/: {leftovers}"
        return {int(name.split(".")[0]) for name in names}


def make_job(
    shared_root: Path,
    job_id: str,
    count: int,
    *,
    frame_format: FrameFormat = FrameFormat.PNG,
    first_frame: int = 1,
    seed: int = 0,
    height: int = 16,
    width: int = 24,
) -> Job:
    layout = JobLayout(shared_root, job_id)
    layout.create()
    arrays = random_frames(count, height, width, seed)
    frames = {first_frame + i: arrays[i] for i in range(count)}
    job = Job(layout, frames, frame_format)
    for index, frame in frames.items():
        job.input_path(index).write_bytes(encode_frame(frame, frame_format))
    return job


class FifoGate:
    """Replace an input frame by a named pipe: the worker's read of it blocks until ``release()``."""

    def __init__(self, path: Path, payload: bytes) -> None:
        self.path = path
        self.payload = payload
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        self._released = False

    def release(self, timeout: float = 30.0) -> None:
        """Feed the frame's bytes to the (waiting or future) reader, then put the real file back."""
        if self._released:
            return
        self._released = True
        done = threading.Event()

        def feed() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                        raise
                    time.sleep(POLL_S)
                    continue
                os.set_blocking(fd, True)
                try:
                    os.write(fd, self.payload)
                finally:
                    os.close(fd)
                break
            done.set()

        threading.Thread(target=feed, daemon=True).start()
        done.wait(timeout + 1)
        self.path.unlink(missing_ok=True)
        self.path.write_bytes(self.payload)

    def __enter__(self) -> FifoGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has exited; its parent has not reaped it).

    The state is the field after the command name in /proc/PID/stat; the name may hold spaces and
    parentheses, so it is read after the last ``)``. A process that goes while we look is not running.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def part_way(root: Path, pid: int) -> bool:
    """Whether a status file under ``root`` shows worker ``pid`` part way through its manifest (at
    least one batch done, more to go): the moment a fault test kills it."""
    for path in sorted(root.glob("jobs/*/status/*.json")):
        try:
            status = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if status["worker"]["pid"] == pid and 0 < status["batches_done"] < status["batches_total"]:
            return True
    return False
