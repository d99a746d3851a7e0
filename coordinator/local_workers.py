"""Worker processes started on this host: the one way esrfarm spawns a worker and waits for it.

A local worker is a ``python -m worker`` process with ``--port-file``: once it listens, it writes
its URL there. :func:`spawn_worker` starts one; :func:`read_port_file` reads the URL it reported;
:func:`take_listening` looks whether workers listen yet, for :func:`wait_all_listening` and
:func:`wait_listening` (scripts and tests) and the pool; :class:`LocalWorkerPool` starts, watches
and stops the workers of a :class:`coordinator.fleet.WorkerFleet`. The same functions serve
``esrfarm upscale`` without ``--workers``, ``scripts/start_workers.sh`` (:mod:`coordinator.launcher`),
the benchmarks and the tests.

On Linux a worker started with ``die_with_parent`` is told to die with the process that started it
(``PR_SET_PDEATHSIG``), so a coordinator killed even by SIGKILL leaves no orphan holding GPU
memory. Workers run by systemd are never started or touched here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from coordinator.errors import ModelError, WorkerStartError
from media.ffmpeg import die_with_parent

log = logging.getLogger(__name__)


MODEL_CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ModelCheck:
    """What the worker side says of a ``--model`` value: its name and native scale (None for a file)."""

    name: str
    native_scale: int | None


async def check_model(model: str) -> ModelCheck:
    """Ask the worker side (``python -m worker models check``: the catalog is the worker's) whether
    ``model`` is a model name or an existing model file, without loading it. Raises
    :class:`ModelError` with its one-line reason, before any worker is started for it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "models", "check", model,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(MODEL_CHECK_TIMEOUT_S):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ModelError(model, f"checking model {model!r} took over {MODEL_CHECK_TIMEOUT_S:g} s") from None
    if process.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise ModelError(model, lines[-1] if lines else f"model {model!r} cannot be used")
    record = orjson.loads(out)
    return ModelCheck(str(record["name"]), record["native_scale"])


def visible_gpu_count() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else NVML's count, else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e for e in visible.split(",") if e.strip() and e.strip() != "-1"]
        return len(entries)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0


def spawn_worker(
    worker_args: Sequence[str],
    *,
    port_file: Path,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent_process: bool = True,
    new_session: bool = False,
    also_in_child: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m worker <worker_args> --port-file PORT_FILE``, its output appended to ``log_file``.

    Call it from a thread that outlives the worker (the event loop's): the death signal follows
    the thread that started the process. ``also_in_child`` runs in the child before the worker
    starts (e.g. to lower a resource limit).
    """
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "worker", *worker_args, "--port-file", str(port_file)]
    dies = die_with_parent_process and sys.platform == "linux"

    def preexec() -> None:
        if dies:
            die_with_parent()
        if also_in_child is not None:
            also_in_child()

    with log_file.open("ab") as handle:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=preexec if dies or also_in_child is not None else None,
            start_new_session=new_session,
        )


def read_port_file(port_file: Path) -> str | None:
    """The URL a worker reported in its port file, or None while there is none (or it is being
    written). A wildcard bind address is reported as the loopback address, which answers for it."""
    try:
        url = str(orjson.loads(port_file.read_bytes())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def log_tail(log_file: Path, lines: int = 5, sep: str = " | ") -> str:
    """The last ``lines`` lines of a worker's log, joined with ``sep`` (empty if unreadable)."""
    try:
        text = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return sep.join(text[-lines:])


def exit_reason(what: str, process: subprocess.Popen[bytes], log_file: Path) -> str:
    """``<what> exited with code N``, and the end of its log if there is one."""
    tail = log_tail(log_file)
    return f"{what} exited with code {process.returncode}" + (f"; its log ends: {tail}" if tail else "")


def answers_health(url: str, timeout_s: float = 5.0) -> bool:
    """Whether ``url/health`` answers 200 (blocking: for scripts and benchmarks, not the event loop)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class LocalWorkerProcess:
    """One worker process this host started."""

    index: int
    process: subprocess.Popen[bytes]
    port_file: Path
    log_file: Path
    url: str | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_reason(self) -> str:
        return exit_reason(f"local worker {self.index}", self.process, self.log_file)


def take_listening(
    pending: list[LocalWorkerProcess],
    *,
    deadline: float,
    timeout_s: float,
    ready: Callable[[str], bool] | None = None,
) -> list[LocalWorkerProcess]:
    """One look at workers starting up: each that reported its URL gets it (``url``); those that
    listen (and for which ``ready(url)`` holds) are taken out of ``pending`` and returned.

    Raises :class:`WorkerStartError` for one that exited, or, once ``time.monotonic()`` is past
    ``deadline``, for the first one still pending (``pending`` then holds those left).
    """
    taken = []
    for worker in list(pending):
        if worker.url is None:
            worker.url = read_port_file(worker.port_file)
        if worker.url is not None and (ready is None or ready(worker.url)):
            pending.remove(worker)
            taken.append(worker)
        elif not worker.alive:
            reason = f"exited with code {worker.process.returncode}"
            raise WorkerStartError(worker.index, reason, log_tail(worker.log_file))
    if pending and time.monotonic() > deadline:
        first = pending[0]
        reason = f"was not listening after {timeout_s:g} s"
        raise WorkerStartError(first.index, reason, log_tail(first.log_file))
    return taken


def wait_all_listening(
    workers: Sequence[LocalWorkerProcess],
    *,
    timeout_s: float,
    poll_s: float = 0.05,
    ready: Callable[[str], bool] | None = None,
    on_ready: Callable[[LocalWorkerProcess], None] = lambda worker: None,
) -> None:
    """Block until every worker listens (see :func:`take_listening`), calling ``on_ready`` for each as
    it does; :class:`WorkerStartError` if one exits or ``timeout_s`` passes first."""
    pending, deadline = list(workers), time.monotonic() + timeout_s
    while True:
        for worker in take_listening(pending, deadline=deadline, timeout_s=timeout_s, ready=ready):
            on_ready(worker)
        if not pending:
            return
        time.sleep(poll_s)


def wait_listening(
    process: subprocess.Popen[bytes],
    port_file: Path,
    log_file: Path,
    *,
    index: int = 0,
    timeout_s: float,
    poll_s: float = 0.05,
) -> str:
    """Block until the process (a worker, or anything that reports its URL in a port file the same
    way) reports its URL; :class:`WorkerStartError` if it exits or times out."""
    worker = LocalWorkerProcess(index, process, port_file, log_file)
    wait_all_listening([worker], timeout_s=timeout_s, poll_s=poll_s)
    assert worker.url is not None
    return worker.url


@dataclass
class LocalWorkerPool:
    """Start, watch and stop this host's workers: one per GPU while there are GPUs, then on the CPU
    (torch); on the ncnn backend, all on Vulkan device 0 (see README, "AMD, Intel and Apple hosts")."""

    run_dir: Path
    worker_args: Sequence[str]  # common flags: --shared-root, --model, --scale, ...
    workers: list[LocalWorkerProcess] = field(default_factory=list)
    backend: str = "torch"

    async def start(self, count: int, gpus: int, startup_timeout_s: float) -> list[str]:
        """Start ``count`` workers and wait until each listens; returns their URLs.

        Raises :class:`WorkerStartError` if any exits or does not listen in time.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            if self.backend == "ncnn":
                device = ["--gpu", "0"]
            else:
                device = ["--gpu", str(index)] if index < gpus else ["--device", "cpu"]
            args = [
                *self.worker_args, *device, "--host", "127.0.0.1", "--port", "0",
                "--worker-id", f"local-{index}",
            ]  # fmt: skip
            port_file = self.run_dir / f"worker-{index}.port.json"
            log_file = self.run_dir / f"worker-{index}.log"
            # A session of its own: Ctrl-C at the terminal reaches the coordinator only, which stops
            # its workers itself (they would otherwise stop at once, mid-reset, with warnings).
            process = spawn_worker(args, port_file=port_file, log_file=log_file, new_session=True)
            log.info("started local worker %d (pid %d, %s)", index, process.pid, " ".join(device))
            self.workers.append(LocalWorkerProcess(index, process, port_file, log_file))
        pending, deadline = list(self.workers), time.monotonic() + startup_timeout_s
        while True:
            take_listening(pending, deadline=deadline, timeout_s=startup_timeout_s)
            if not pending:
                return [w.url for w in self.workers if w.url]
            await asyncio.sleep(0.05)

    def worker_at(self, url: str) -> LocalWorkerProcess | None:
        return next((w for w in self.workers if w.url == url), None)

    def exited(self) -> dict[str, str]:
        """URL -> why, for every worker whose process has exited."""
        return {w.url: w.exit_reason() for w in self.workers if w.url and not w.alive}

    def joined(self) -> list[str]:
        """A local worker that exited is not restarted: none ever joins later."""
        return []

    def replacing(self) -> list[str]:
        return []

    def kill(self, url: str) -> None:
        """SIGKILL a worker the fleet gave up on: a stopped or hung process cannot act on SIGTERM."""
        worker = self.worker_at(url)
        if worker is not None and worker.alive:
            log.info("killing local worker %d (pid %d)", worker.index, worker.process.pid)
            worker.process.kill()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker (each finishes its batch and exits), SIGKILL what outlives ``timeout_s``."""
        for worker in self.workers:
            if worker.alive:
                worker.process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for worker in self.workers:
            while worker.alive and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if worker.alive:
                log.warning("local worker %d ignored SIGTERM for %g s; killing it", worker.index, timeout_s)
                worker.process.kill()
            await asyncio.to_thread(worker.process.wait)
