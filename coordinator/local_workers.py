"""Workers the coordinator starts itself on this host (``esrfarm upscale`` without ``--workers``).

Each is a ``python -m worker`` process on 127.0.0.1 with a free port, reported through a port file.
On Linux each worker is told to die with the coordinator (``PR_SET_PDEATHSIG``), so a coordinator
killed even by SIGKILL leaves no orphan holding GPU memory. Workers run by systemd are not started
here and are never touched.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class WorkerStartError(Exception):
    """A local worker exited or did not get ready; carries the tail of its log."""

    def __init__(self, index: int, reason: str, log_tail: str) -> None:
        self.index, self.reason, self.log_tail = index, reason, log_tail
        tail = f"; its log ends: {log_tail}" if log_tail else ""
        super().__init__(f"local worker {index} {reason}{tail}")


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


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class LocalWorker:
    index: int
    process: asyncio.subprocess.Process
    port_file: Path
    log_file: Path
    url: str | None = None

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


@dataclass
class LocalWorkerPool:
    """Start, watch and stop this host's workers for one job."""

    run_dir: Path
    worker_args: Sequence[str]  # common flags: --shared-root, --model, --scale, ...
    workers: list[LocalWorker] = field(default_factory=list)

    async def start(self, count: int, gpus: int, startup_timeout_s: float) -> list[str]:
        """Start ``count`` workers (one per GPU while there are GPUs, else on the CPU); wait for them.

        Returns their URLs. Raises :class:`WorkerStartError` if any exits or stays unready.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            port_file = self.run_dir / f"worker-{index}.port.json"
            log_file = self.run_dir / f"worker-{index}.log"
            port_file.unlink(missing_ok=True)
            device = ["--gpu", str(index)] if index < gpus else ["--device", "cpu"]
            argv = [
                sys.executable, "-m", "worker", *self.worker_args, *device,
                "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                "--worker-id", f"local-{index}",
            ]  # fmt: skip
            with log_file.open("ab") as log_handle:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_handle,
                    stderr=log_handle,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            log.info("started local worker %d (pid %d, %s)", index, process.pid, " ".join(device))
            self.workers.append(LocalWorker(index, process, port_file, log_file))
        await asyncio.gather(*(self._wait_ready(w, startup_timeout_s) for w in self.workers))
        return [w.url for w in self.workers if w.url]

    async def _wait_ready(self, worker: LocalWorker, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if not worker.alive:
                raise WorkerStartError(
                    worker.index, f"exited with code {worker.process.returncode}", worker.log_tail()
                )
            if worker.port_file.is_file():
                try:
                    worker.url = str(orjson.loads(worker.port_file.read_bytes())["url"])
                    return
                except (ValueError, KeyError, OSError):
                    pass  # being written; the next poll reads it whole
            await asyncio.sleep(0.1)
        raise WorkerStartError(worker.index, f"was not listening after {timeout_s:g} s", worker.log_tail())

    def exit_reason(self, url: str) -> str | None:
        """Why the worker at ``url`` is gone (exit code and log tail), or None while it runs."""
        for worker in self.workers:
            if worker.url == url and not worker.alive:
                tail = worker.log_tail()
                return f"local worker {worker.index} exited with code {worker.process.returncode}" + (
                    f"; its log ends: {tail}" if tail else ""
                )
        return None

    def exited(self) -> dict[str, int]:
        """URL -> exit code of workers that have exited."""
        return {
            w.url: w.process.returncode for w in self.workers if w.url and w.process.returncode is not None
        }

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker (each finishes its batch and exits), SIGKILL what outlives ``timeout_s``."""
        for worker in self.workers:
            if worker.alive:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.process.wait(), timeout_s)
            except TimeoutError:
                log.warning("local worker %d ignored SIGTERM for %g s; killing it", worker.index, timeout_s)
                worker.process.kill()
                await worker.process.wait()
