"""Processing one manifest: a read → compute → write pipeline over its batches.

While batch ``i`` is being upscaled, batch ``i + 1`` is read (a reader thread) and batch
``i - 1`` is written (a writer task), so the device never waits on the disk. The status file is
replaced after every batch, and a batch is listed as done only once all its frames are on disk.

What is held at once is bounded by frame size, not by what a manifest asks: a batch whose upscaled
frames would exceed ``part_pixels`` output pixels is read, upscaled and written in parts of as many
frames as fit (at least one), and the batch is claimed once its last part is on disk.

A batch with a missing or unreadable frame is recorded as failed (batch id, frame, reason) and the
run goes on with the others; the run then ends ``failed``, never ``completed``. A stop request
(``/reset``, SIGTERM) takes effect at the next batch boundary: the part being upscaled is finished
and written (the batch is claimed if that was its last part), the read in progress is abandoned
within 100 ms (its threads stop taking frames), nothing further is started, and the run ends
``cancelled``. Frames written for a batch that is not claimed are removed.

Everything is read and written through the manifest's directories opened once at submit
(:class:`RunDirs`), so a directory replaced by a symlink afterwards is never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from manifests import BatchError, Manifest, Status, WorkerIdentity, WorkerState
from manifests.atomic import Directory
from manifests.layout import HIGH_BIT_DEPTH
from manifests.manifest import Batch
from worker.colour import upscale_i420
from worker.frames import FrameError, FrameLimits, ReadCancelled, read_batch, remove_frames, write_batch
from worker.logsafe import loggable
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
R = TypeVar("R")


class Upscaler(Protocol):
    """What the worker needs of a backend: :class:`worker.runtime.Upscaler` (torch) or
    :class:`worker.ncnn_runtime.NcnnUpscaler` (ncnn, Vulkan)."""

    backend: str  # "torch" | "ncnn": a job runs on workers of one backend only
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


class RunDirs:
    """The directories of one manifest, opened at submit by walking from the shared root without
    following a symlink (:meth:`manifests.atomic.Directory.open_below`).

    Counted references: the run holds one, and so does every I/O thread while it runs, so the
    descriptors are closed only once nothing can use them any more (an abandoned read on stuck
    storage keeps them, never a reused descriptor number).
    """

    def __init__(self, input: Directory, output: Directory, status: Directory, status_name: str) -> None:
        self.input = input
        self.output = output
        self.status = status
        self.status_name = status_name
        self._users = 1
        self._lock = threading.Lock()

    @property
    def status_file(self) -> Path:
        return self.status.path / self.status_name

    def acquire(self) -> None:
        with self._lock:
            if self._users <= 0:
                raise RuntimeError("the directories of this manifest are closed")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
        for directory in (self.input, self.output, self.status):
            directory.close()


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
    """One manifest being processed. ``start()`` writes the first status, ``run()`` does the rest.

    The frames transport's I/O is :meth:`_read_part`, :meth:`_write_part` and
    :meth:`_discard_unclaimed`; the segment transport (:class:`worker.segments.SegmentRun`)
    replaces those three and keeps the rest: the pipeline, the claims and the status file.
    """

    #: Whether one failed batch ends the run (``failed``) instead of letting the others go on.
    stops_at_first_failure = False

    def __init__(
        self,
        manifest: Manifest,
        dirs: RunDirs,
        upscaler: Upscaler,
        identity: WorkerIdentity,
        compute: Executor,
        metrics: WorkerMetrics,
        *,
        limits: FrameLimits,
        part_pixels: int,
        io_threads: int = 4,
        fsync_frames: bool = True,
        clock: Callable[[], float] = time.time,
        on_status_unwritable: Callable[[OSError], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self.dirs = dirs
        self._limits = limits
        self._part_pixels = part_pixels
        self._upscaler = upscaler
        self._compute = compute
        self._metrics = metrics
        self._io_threads = io_threads
        self._fsync = fsync_frames
        self._clock = clock
        self._on_status_unwritable = on_status_unwritable
        self._stop = asyncio.Event()
        self._cancel_reads = threading.Event()  # seen by the reader threads, between frames and in pipes
        self._stop_reason = ""
        self._lock = asyncio.Lock()
        self._done: list[int] = []
        self._failed: set[int] = set()
        self._partial: dict[int, list[int]] = {}  # frames written of batches not claimed (yet)
        self._status_replaced_logged = False
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
            self._cancel_reads.set()
            log.info("%s: stop requested (%s)", self._name, reason)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _io(self, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """``fn(*args)`` on a daemon thread that holds the manifest's directories while it runs."""
        dirs = self.dirs
        dirs.acquire()

        def holding() -> R:
            try:
                return fn(*args)
            finally:
                dirs.release()

        holding.__name__ = getattr(fn, "__name__", "job")
        return in_daemon_thread(holding)

    @property
    def _name(self) -> str:
        return f"{self.manifest.job_id}/{self.manifest.manifest_id}"

    # -- the pipeline -------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the initial ``processing`` status. Raises OSError if the status file cannot be written
        (the run is then ``failed`` as /status shows it)."""
        try:
            await self._io(self.dirs.status.write_bytes_atomic, self.dirs.status_name, self.status_bytes)
        except OSError as exc:
            message = f"cannot write the status file: {exc.strerror or exc}"
            self.status = self.status.evolve(
                state=WorkerState.FAILED, finished_at=self._clock(), message=message
            )
            self.status_bytes = self.status.to_json()
            if self._on_status_unwritable is not None:
                self._on_status_unwritable(exc)
            raise
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
        reading = self._read_at(0, 0)
        try:
            while reading is not None:
                position, offset, future = reading
                batch = batches[position]
                if not await self._ready_or_stopped(future):
                    _discard(future)
                    break
                try:
                    frames = future.result()
                except ReadCancelled:
                    break
                except FrameError as exc:
                    await self._fail(batch, exc.frame, exc.reason, "read")
                    reading = self._read_at(position + 1, 0)
                    continue
                except Exception as exc:
                    await self._fail(batch, None, f"reading failed: {exc}", "read")
                    reading = self._read_at(position + 1, 0)
                    continue
                end = offset + len(frames)
                last = end >= len(batch)
                reading = self._read_at(position + 1, 0) if last else self._read_at(position, end)
                upscaled = await self._upscale(batch, frames)
                del frames
                if upscaled is None:
                    if not last and reading is not None:  # the rest of a failed batch is not read
                        _discard(reading[2])
                        reading = self._read_at(position + 1, 0)
                    continue
                if write_task is not None:
                    await write_task  # at most one part in the writer: bounds memory
                part = batch.frames[offset:end]
                write_task = asyncio.create_task(self._write_and_claim(batch, part, upscaled, last))
                if self._stop.is_set() and reading is not None:
                    _discard(reading[2])
                    reading = None
            if write_task is not None:
                await write_task
        except asyncio.CancelledError:
            # Cancelled past the shutdown timeout: claim nothing more, but leave a valid final status.
            log.error("%s: cancelled while a batch was in flight; it is not claimed", self._name)
            self._stop_reason = self._stop_reason or "cancelled"
            self._stop.set()
            self._cancel_reads.set()
            await self._finish(cancelled=True)
            raise
        handled = len(self._done) + len(self.status.failed_batches)
        gave_up = self.stops_at_first_failure and bool(self._errors)
        await self._finish(cancelled=handled < len(batches) and not gave_up)
        return self.status

    def _read_at(self, position: int, offset: int) -> tuple[int, int, asyncio.Future[np.ndarray]] | None:
        """Start reading batch ``position`` from its frame ``offset`` (one part); None past the end."""
        batches = self.manifest.batches
        if position >= len(batches) or self._stop.is_set():
            return None
        started = time.perf_counter()
        frames = batches[position].frames[offset:]

        def read() -> np.ndarray:
            array = self._read_part(frames)
            self._metrics.batch_seconds.labels(stage="read").observe(time.perf_counter() - started)
            return array

        return position, offset, self._io(read)

    def _read_part(self, frames: tuple[int, ...]) -> np.ndarray:
        """The first of ``frames`` (as many as the part budget holds, at least one) as one array.
        Blocking, on a daemon thread; raises :class:`FrameError` or :class:`ReadCancelled`."""
        return read_batch(
            self.dirs.input,
            frames,
            self.manifest.frame_format,
            threads=self._io_threads,
            label=self._label_in,
            limits=self._limits,
            budget_pixels=self._budget_pixels,
            cancel=self._cancel_reads,
            bit_depth=self.manifest.bit_depth,
            on_cpu=self._metrics.cpu_seconds.labels(stage="read").inc,
        )

    @property
    def _budget_pixels(self) -> int:
        """Output pixels one part may hold: 16-bit frames hold 2 bytes per sample, so half as many."""
        return self._part_pixels // (2 if self.manifest.bit_depth == HIGH_BIT_DEPTH else 1)

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
            upscaled = await loop.run_in_executor(self._compute, self._upscale_now, frames)
        except Exception as exc:
            self._computing = None
            await self._fail(batch, None, f"upscaling failed: {type(exc).__name__}: {exc}", "compute")
            return None
        self._computing = None
        self._metrics.batch_seconds.labels(stage="compute").observe(time.perf_counter() - started)
        return upscaled

    def _upscale_now(self, frames: np.ndarray) -> np.ndarray:
        """Upscale on the compute thread: RGB frames as they are, YUV frames through the device's
        conversion (:func:`worker.colour.upscale_i420`); its CPU time is the compute stage's."""
        started = time.thread_time()
        try:
            if self.manifest.yuv is not None:
                return upscale_i420(self._upscaler, frames, self.manifest.scale, self.manifest.yuv)
            return self._upscaler.upscale(frames, self.manifest.scale)
        finally:
            self._metrics.cpu_seconds.labels(stage="compute").inc(time.thread_time() - started)

    async def _write_and_claim(
        self, batch: Batch, part: tuple[int, ...], upscaled: np.ndarray, last: bool
    ) -> None:
        """Write one part of a batch; claim the batch once its last part is written and none failed."""
        started = time.perf_counter()
        final = last and batch is self.manifest.batches[-1]
        try:
            await self._io(self._write_part, part, upscaled, final)
        except FrameError as exc:
            await self._fail(batch, exc.frame, exc.reason, "write")
            return
        except Exception as exc:
            await self._fail(batch, None, f"writing failed: {exc}", "write")
            return
        self._metrics.batch_seconds.labels(stage="write").observe(time.perf_counter() - started)
        self._metrics.frames.inc(len(part))
        written = self._partial.setdefault(batch.id, [])
        written.extend(part)
        if not last or batch.id in self._failed:
            return
        del self._partial[batch.id]
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

    def _write_part(self, part: tuple[int, ...], upscaled: np.ndarray, final: bool) -> None:
        """Write one part's upscaled frames (``final``: the manifest's last). Blocking, on a daemon
        thread; raises :class:`FrameError` (or any exception: the batch fails)."""
        write_batch(
            self.dirs.output,
            part,
            upscaled,
            self.manifest.frame_format,
            self.manifest.png_compression,
            threads=self._io_threads,
            fsync=self._fsync,
            label=self._label_out,
            on_cpu=self._metrics.cpu_seconds.labels(stage="write").inc,
        )

    async def _fail(self, batch: Batch, frame: int | None, reason: str, stage: str) -> None:
        error = BatchError(batch.id, frame, reason)
        log.warning("%s: batch %d failed: %s", self._name, batch.id, loggable(error))
        self._failed.add(batch.id)
        self._metrics.batch_failures.labels(stage=stage).inc()
        self._errors.append(error)
        if self.stops_at_first_failure:
            self._stop.set()  # no stop reason: the run ends failed, not cancelled
            self._cancel_reads.set()
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
            directory = self.dirs.status
            try:
                await asyncio.shield(self._io(directory.write_bytes_atomic, self.dirs.status_name, data))
            except OSError as exc:
                log.error(
                    "%s: cannot write status file %s: %s", self._name, loggable(self.dirs.status_file), exc
                )
                if self._on_status_unwritable is not None:
                    # Nobody can see what this run claims: the service says so over HTTP and stops it.
                    self._on_status_unwritable(exc)
            if not self._status_replaced_logged and directory.replaced():
                self._status_replaced_logged = True
                log.error(
                    "%s: the status directory %s was replaced after the manifest was accepted; the status "
                    "is still written into the directory opened then, never through what replaced it",
                    self._name,
                    loggable(directory.path),
                )
            self.status, self.status_bytes = status, data

    async def _discard_unclaimed(self) -> None:
        """Remove what was written for batches that were never claimed: no half batch stays on disk."""
        if self._partial:
            partial, self._partial = self._partial, {}
            for frames in partial.values():
                await asyncio.shield(
                    self._io(remove_frames, self.dirs.output, frames, self.manifest.frame_format)
                )

    async def _finish(self, *, cancelled: bool) -> None:
        await self._discard_unclaimed()
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
            f" ({loggable(message)})" if message else "",
        )


def _discard(future: asyncio.Future[Any]) -> None:
    """Abandon a read whose result is no longer wanted, without an 'exception never retrieved' warning."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
