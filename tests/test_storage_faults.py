"""A worker whose view of the shared root turns read-only mid-job (issue 23, item 6).

The worker runs in a mount namespace of its own in which the shared root is bind-mounted onto
itself; remounting that bind read-only (``nsenter -m``) makes every write of that one worker fail
with ``Read-only file system`` while the coordinator and the other worker write as before: what a
host whose NFS mount went read-only sees. Needs root (or CAP_SYS_ADMIN) and util-linux's nsenter.

The workers simulate a model of a fixed latency per frame (``--simulate-latency-ms``): what is tested
is the storage, and a manifest that takes a while is one the test can catch mid-way.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from manifests import JobLayout
from media.extract import decode_frames
from tests import clips
from tests.workerutil import REPO, WorkerProcess, start_worker

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "gbrp"]


def _own_view_of(root: Path) -> Callable[[], None]:
    """In the child before the worker starts: a private mount namespace, ``root`` bound onto itself."""
    path = str(root).encode()

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        if libc.mount(path, path, None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --bind")

    return enter


def _remount(worker: WorkerProcess, root: Path, mode: str, *, unless_busy: bool = False) -> bool:
    """Remount the worker's bind of ``root`` ``ro`` or ``rw``, in its namespace only. A file open
    for writing there makes a read-only remount fail (busy): False then if ``unless_busy``."""
    done = subprocess.run(
        ["nsenter", "-t", str(worker.pid), "-m", "mount", "-o", f"remount,bind,{mode}", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if unless_busy and "busy" in done.stderr:
        return False
    assert done.returncode == 0, f"remounting {mode} failed: {done.stderr}"
    return True


def _can_make_mount_namespaces(tmp_path: Path) -> bool:
    if shutil.which("nsenter") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "--bind", str(tmp_path), str(tmp_path)],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.fixture
def farm(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[Path, WorkerProcess, WorkerProcess]]:
    if not _can_make_mount_namespaces(tmp_path):
        pytest.skip("needs root, unshare and nsenter to give a worker its own read-only mount")
    root = tmp_path / "root"
    root.mkdir()
    logs = tmp_path / "logs"
    slow = ["--simulate-latency-ms", "40"]
    steady = start_worker(root, tiny_model, logs, args=slow)
    fragile = start_worker(root, tiny_model, logs, args=slow, preexec_fn=_own_view_of(root))
    yield root, steady, fragile
    for worker in (steady, fragile):
        if worker.process.poll() is None:
            worker.stop()


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.02)


def _make_read_only_mid_manifest(worker: WorkerProcess, root: Path, job: subprocess.Popen[str]) -> None:
    """Remount ``worker``'s view of ``root`` read-only while it holds a manifest whose final status
    it has not written yet: stopped (SIGSTOP) for the remount, so that it cannot finish meanwhile
    (tried again when it was stopped with a file open for writing)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        status = worker.status()
        if status["state"] == "processing" and status.get("manifest_id"):
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                on_disk = JobLayout(root, status["job_id"]).status_path(status["manifest_id"])
                # No status file yet: its first write is still to come.
                not_final = (
                    not on_disk.exists() or orjson.loads(on_disk.read_bytes())["state"] == "processing"
                )
                if not_final and _remount(worker, root, "ro", unless_busy=True):
                    return
            finally:
                os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker never held a manifest of the job")


@pytest.mark.parametrize("when", ["mid-manifest", "before-its-first-manifest"])
def test_a_worker_that_cannot_write_the_shared_root_loses_its_batches_at_once(
    farm: tuple[Path, WorkerProcess, WorkerProcess], tiny_model: Path, tmp_path: Path, when: str
) -> None:
    """Its frames and status fail to be written (a status never written at all, for a manifest taken
    after the remount): its batches go to the other worker within seconds, not the stale timeout."""
    root, steady, fragile = farm
    source = clips.video(tmp_path / "in.mp4", size="32x18", frames=60)
    output = tmp_path / "out.mkv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The stale timeout is far beyond the test's deadline: only the worker's own word can end the wait.
    command = [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output),
        "--model", str(tiny_model), "--workers", f"{steady.url},{fragile.url}", "--shared-root", str(root),
        "--scale", "2", "--batch-size", "2", "--stale-timeout", "3600", *LOSSLESS,
    ]  # fmt: skip
    if when == "before-its-first-manifest":
        _remount(fragile, root, "ro")  # it wrote its probe file at start: it does not know yet
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        if when == "mid-manifest":
            _make_read_only_mid_manifest(fragile, root, process)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert len(list(decode_frames(output))) == 60
    assert "cannot write the shared storage" in stderr, stderr
    assert "did not change for" not in stderr

    health = fragile.get("/health").json()
    assert health["storage_writable"] is False
    assert "Read-only file system" in health["storage_error"]
    status = fragile.status()
    assert "Read-only file system" in (status.get("message") or ""), status
    refusals = fragile.log().count(" 503 ")
    assert refusals <= 2, f"the unwritable worker was dealt to {refusals} times"

    _remount(fragile, root, "rw")
    _wait_for(lambda: fragile.get("/health").json()["storage_writable"], "the worker seeing it can write")
    assert fragile.get("/health").json()["storage_error"] is None
    assert not list(root.glob(".esrfarm-write-probe-*"))
