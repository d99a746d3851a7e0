"""Processing one manifest: a read → compute → write pipeline over its batches.

While batch ``i`` is being upscaled, batch ``i + 1`` is read (a reader thread) and batch
``i - 1`` is written (a writer task), so the device never waits on the disk. The status file is
replaced after every batch, and a batch is listed as done only once all its frames are on disk.

A batch with a missing or unreadable frame is recorded as failed (batch id, frame, reason) and the
run goes on with the others; the run then ends ``failed``, never ``completed``. A stop request
(``/reset``, SIGTERM) takes effect at the next batch boundary: the batch being upscaled is
finished and written, nothing further is started, and the run ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from manifests import BatchError, Manifest, Status, WorkerIdentity, WorkerState, write_json_atomic
from manifests.manifest import Batch
from worker.frames import FrameError, read_batch, write_batch
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
R = TypeVar("R")


class Upscaler(Protocol):
    """What the worker needs of :class:`worker.runtime.Upscaler`."""

    model_name: str
    architecture: str
    native_scale: int
    scale: float
    precision: str
    device: Any
    device_name: str

    def upscale(self, frames: np.ndarray, scale: float | None = None) -> np.ndarray: ...

    def warmup(self, height: int = 64, width: int = 64) -> None: ...

    def memory_info(self) -> dict[str, int] | None: ...


@dataclass(frozen=True)
class RunPaths:
    """The resolved (symlink-free, checked to be under the shared root) paths of one manifest."""

    shared_root: Path
    job_dir: Path
    input_dir: Path
    output_dir: Path
    status_file: Path


def in_daemon_thread(fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
    """Run ``fn(*args)`` on a new daemon thread; the future resolves on the running loop.

    Used for file I/O: a read blocked on stuck storage can be abandoned (on reset or SIGTERM)
    without keeping the process from exiting, which a thread pool would.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()

    def settle(result: R | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, daemon=True, name=f"io-{getattr(fn, '__name__', 'job')}").start()
    return future


class ManifestRun:
    """One manifest being processed. ``start()`` writes the first status, ``run()`` does the rest."""

    def __init__(
        self,
        manifest: Manifest,
        paths: RunPaths,
        upscaler: Upscaler,
        identity: WorkerIdentity,
        compute: Executor,
        metrics: WorkerMetrics,
        *,
        io_threads: int = 4,
        fsync_frames: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manifest = manifest
        self.paths = paths
        self._upscaler = upscaler
        self._compute = compute
        self._metrics = metrics
        self._io_threads = io_threads
        self._fsync = fsync_frames
        self._clock = clock
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._lock = asyncio.Lock()
        self._done: list[int] = []
        self._errors: list[BatchError] = []
        self._frames_done = 0
        self._computing: int | None = None
        self.status = Status(
            state=WorkerState.PROCESSING,
            worker=identity,
            updated_at=clock(),
            job_id=manifest.job_id,
            manifest_id=manifest.manifest_id,
            batches_total=len(manifest.batches),
            frames_total=manifest.frame_count,
            started_at=clock(),
        )
        self.status_bytes = self.status.to_json()
        self._label_in = manifest.input_dir.rstrip("/")
        self._label_out = manifest.output_dir.rstrip("/")

    # -- control ------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop at the next batch boundary; the run then ends ``cancelled`` (unless it was done)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
            log.info("%s: stop requested (%s)", self._name, reason)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def _name(self) -> str:
        return f"{self.manifest.job_id}/{self.manifest.manifest_id}"

    # -- the pipeline -------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the initial ``processing`` status. Raises OSError if the status file cannot be written."""
        await in_daemon_thread(write_json_atomic, self.paths.status_file, self.status_bytes)
        log.info(
            "%s: started, %d batch(es), %d frame(s)",
            self._name,
            len(self.manifest.batches),
            self.manifest.frame_count,
        )

    async def run(self) -> Status:
        """Process every batch (or until stopped) and write the final status. Never raises on batch errors."""
        batches = self.manifest.batches
        write_task: asyncio.Task[None] | None = None
        reading: asyncio.Future[np.ndarray] | None = self._read(batches[0])
        try:
            for position, batch in enumerate(batches):
                assert reading is not None
                if not await self._ready_or_stopped(reading):
                    _discard(reading)
                    break
                current = reading
                reading = self._read(batches[position + 1]) if position + 1 < len(batches) else None
                try:
                    frames = current.result()
                except FrameError as exc:
                    await self._fail(batch, exc.frame, exc.reason, "read")
                    continue
                except Exception as exc:
                    await self._fail(batch, None, f"reading failed: {exc}", "read")
                    continue
                upscaled = await self._upscale(batch, frames)
                del frames
                if upscaled is None:
                    continue
                if write_task is not None:
                    await write_task  # at most one batch in the writer: bounds memory
                write_task = asyncio.create_task(self._write_and_claim(batch, upscaled))
                if self._stop.is_set():
                    if reading is not None:
                        _discard(reading)
                    break
            if write_task is not None:
                await write_task
        except asyncio.CancelledError:
            # Cancelled past the shutdown timeout: claim nothing more, but leave a valid final status.
            log.error("%s: cancelled while a batch was in flight; it is not claimed", self._name)
            self._stop_reason = self._stop_reason or "cancelled"
            self._stop.set()
            await self._finish(cancelled=True)
            raise
        handled = len(self._done) + len(self.status.failed_batches)
        await self._finish(cancelled=handled < len(batches))
        return self.status

    def _read(self, batch: Batch) -> asyncio.Future[np.ndarray]:
        started = time.perf_counter()

        def read() -> np.ndarray:
            frames = read_batch(
                self.paths.shared_root,
                self.paths.input_dir,
                batch.frames,
                self.manifest.frame_format,
                threads=self._io_threads,
                label=self._label_in,
            )
            self._metrics.batch_seconds.labels(stage="read").observe(time.perf_counter() - started)
            return frames

        return in_daemon_thread(read)

    async def _ready_or_stopped(self, reading: asyncio.Future[np.ndarray]) -> bool:
        """Wait for the next batch's frames; False if a stop came first (the boundary is here)."""
        if self._stop.is_set():
            return False
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([reading, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        return not self._stop.is_set()

    async def _upscale(self, batch: Batch, frames: np.ndarray) -> np.ndarray | None:
        self._computing = batch.id
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            upscaled = await loop.run_in_executor(
                self._compute, self._upscaler.upscale, frames, self.manifest.scale
            )
        except Exception as exc:
            self._computing = None
            await self._fail(batch, None, f"upscaling failed: {type(exc).__name__}: {exc}", "compute")
            return None
        self._computing = None
        self._metrics.batch_seconds.labels(stage="compute").observe(time.perf_counter() - started)
        return upscaled

    async def _write_and_claim(self, batch: Batch, upscaled: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            await in_daemon_thread(
                functools.partial(
                    write_batch,
                    self.paths.output_dir,
                    batch.frames,
                    upscaled,
                    self.manifest.frame_format,
                    self.manifest.png_compression,
                    threads=self._io_threads,
                    fsync=self._fsync,
                    label=self._label_out,
                )
            )
        except FrameError as exc:
            await self._fail(batch, exc.frame, exc.reason, "write")
            return
        except Exception as exc:
            await self._fail(batch, None, f"writing failed: {exc}", "write")
            return
        self._metrics.batch_seconds.labels(stage="write").observe(time.perf_counter() - started)
        self._metrics.frames.inc(len(batch))
        self._metrics.batches.inc()
        self._done.append(batch.id)
        self._frames_done += len(batch)
        log.info(
            "%s: batch %d done (frames %d-%d), %d/%d",
            self._name,
            batch.id,
            batch.frames[0],
            batch.frames[-1],
            len(self._done),
            len(self.manifest.batches),
        )
        await self._publish()

    async def _fail(self, batch: Batch, frame: int | None, reason: str, stage: str) -> None:
        error = BatchError(batch.id, frame, reason)
        log.warning("%s: batch %d failed: %s", self._name, batch.id, error)
        self._metrics.batch_failures.labels(stage=stage).inc()
        self._errors.append(error)
        await self._publish()

    async def _publish(self, **final: Any) -> None:
        """Replace the status file with the current state. Serialised; a write error is logged."""
        async with self._lock:
            status = self.status.evolve(
                done_batches=tuple(self._done),
                frames_done=self._frames_done,
                errors=tuple(self._errors),
                current_batch=self._computing,
                updated_at=self._clock(),
                **final,
            )
            data = status.to_json()
            try:
                await asyncio.shield(in_daemon_thread(write_json_atomic, self.paths.status_file, data))
            except OSError as exc:
                log.error("%s: cannot write status file %s: %s", self._name, self.paths.status_file, exc)
            self.status, self.status_bytes = status, data

    async def _finish(self, *, cancelled: bool) -> None:
        if cancelled:
            state, message = WorkerState.CANCELLED, self._stop_reason or "cancelled"
        elif self._errors:
            failed = len(self.status.evolve(errors=tuple(self._errors)).failed_batches)
            state, message = WorkerState.FAILED, f"{failed} batch(es) failed"
        else:
            state, message = WorkerState.COMPLETED, None
        self._computing = None
        await self._publish(state=state, finished_at=self._clock(), message=message)
        self._metrics.manifests.labels(state=state.value).inc()
        log.info(
            "%s: %s, %d/%d batch(es) done%s",
            self._name,
            state.value,
            len(self._done),
            len(self.manifest.batches),
            f" ({message})" if message else "",
        )


def _discard(future: asyncio.Future[Any]) -> None:
    """Abandon a read whose result is no longer wanted, without an 'exception never retrieved' warning."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
