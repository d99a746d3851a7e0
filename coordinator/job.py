"""One upscaling job, end to end, streamed through a bounded window of frames: the :class:`Job` handle.

The handle probes the input, names the job, takes its directory and lock, decides the run's plan
once (:class:`coordinator.plan.RunPlan`: the scale, the frame files' format) and hands it to a
runner that produces the output's parts, which it then joins into the output. The frames runner
(:mod:`coordinator.frame_runner`) cuts the input's frames into chunks (``manifests.chunks``), and
each chunk moves through the chunk book (``manifests.chunkbook``): extraction of chunk k+1 (the
extraction bridge, :mod:`coordinator.extraction`), upscaling of chunk k (the dispatcher,
:mod:`coordinator.dispatch`) and encoding of chunk k-1 overlap, and frame data on disk stays under
``max_disk``. Each chunk becomes a video-only segment; the segments are joined without re-encoding
and the audio, subtitles and chapters are muxed once from the source. Progress events come from
one meter (:mod:`coordinator.progress`).

The coordinator trusts files, not promises: a batch is done when a status file claims it and its
output frames are on disk. A worker that fails or vanishes (lost by the fleet, or its status file
unchanged for ``stale_after_s``, or whose /health says it cannot write the shared root) loses its
batches to the others. The job fails when no worker is
left, or when one batch has failed on two workers.

A job is named by what determines its frames: the input's content, the model, the scale, the tile
size and the precision. Started again after a crash (even SIGKILL) or a cancel, it finds its job
directory and continues: finished segments are kept, batches whose output frames are on disk (and
sound) are not upscaled again. Changing only encoder settings re-encodes the segments, from the
upscaled frames when they were kept (``keep_frames``).

Driving it::

    async with WorkerFleet(farm, local=...) as fleet:
        job = Job(spec, fleet).start()
        async for event in job.events():   # Progress, WorkerLost, ..., then Finished/Failed/Cancelled
            ...
        result = await job.wait()           # JobResult, or raises JobError / one of EXPECTED_ERRORS
    # job.cancel(): stop dealing, reset the workers' manifests, kill the job's ffmpeg processes,
    # keep the job directory (the same job resumes from it)

:func:`upscale` does all of that for one job on a fleet of its own (what ``esrfarm upscale`` runs).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO

import orjson

from coordinator.errors import EXPECTED_ERRORS, FleetError, JobCancelledError, JobError, WorkersLostError
from coordinator.events import Cancelled, Failed, Finished, JobEvent, JobResult, Stage, Started
from coordinator.fleet import LocalWorkerConfig, WorkerFleet, WorkerHandle
from coordinator.frame_runner import run_frames
from coordinator.images import is_image_job, probe_images
from coordinator.media import ImageMedia, JobMedia, VideoMedia, file_sha256
from coordinator.plan import Runner, RunPlan, RunTools
from coordinator.progress import ProgressMeter
from coordinator.segment_run import run_segments
from coordinator.spec import FarmSettings, JobSpec
from coordinator.threads import JobThreads
from manifests.chunks import Chunk
from manifests.colour import YuvSpec
from manifests.dedup import dedup_level
from manifests.errors import DocumentError
from manifests.jobrecord import JobRecord
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout
from manifests.segment import FRAMES_TRANSPORT, SEGMENTS_TRANSPORT
from media.cputime import METER, grown
from media.ffmpeg import ProcessGroup, process_group
from media.probe import check_output_path, probe

log = logging.getLogger(__name__)

# -- what names a job ------------------------------------------------------------------------------


def job_identity(spec: JobSpec, media: JobMedia, yuv_frames: bool = False) -> dict[str, object]:
    """What determines the upscaled frames: a changed value means another job. Reads the input.

    YUV frames (converted on the workers' device) are named: their upscaled frames differ in the last
    bits from RGB frames' (the ids of RGB jobs are what they were before YUV frames existed).
    """
    model_path = Path(spec.model)
    model = {"file_sha256": file_sha256(model_path)} if model_path.is_file() else {"name": spec.model}
    identity = {
        **media.content_identity(),
        **({"frames": "yuv"} if yuv_frames else {}),
        "model": model,
        "scale": spec.scale,
        "tile": spec.tile,
        "precision": spec.precision,
    }
    if spec.backend != "torch":  # torch jobs keep the identity (and directory) they had before backends
        identity["backend"] = spec.backend
    if spec.dedup:  # named only when on: other jobs keep their ids
        identity["dedup"] = dedup_level(spec.dedup_level).identity()
    if spec.transport != FRAMES_TRANSPORT:  # named only when not frames: other jobs keep their ids
        identity["transport"] = spec.transport
    return identity


def job_id_for(input_path: Path, identity: dict[str, object]) -> str:
    """``<readable stem>-<16 hex digits of the identity>``, a safe directory name for any file name
    (accents folded, other letters and leading dots or dashes dropped: ``.vidéo`` -> ``video``)."""
    folded = unicodedata.normalize("NFKD", input_path.stem).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", folded).strip("._-")[:40].rstrip("._-") or "job"
    digest = hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{stem}-{digest[:16]}"


class JobLock:
    """One coordinator per job: ``jobs/.<id>.lock`` held with ``flock``; a second one is refused."""

    def __init__(self, layout: JobLayout) -> None:
        self.path = layout.shared_root / "jobs" / f".{layout.job_id}.lock"
        self.job_id = layout.job_id
        self._handle: IO[str] | None = None

    def acquire(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JobError(f"job {self.job_id} is being run by {holder} right now") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"esrfarm pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            self._handle.close()
            self._handle = None


def open_job_dir(layout: JobLayout, identity: dict[str, object], spec: JobSpec, frames: int) -> int:
    """Create the job directory, or take up the one a stopped run left. Returns this run's number."""
    runs = 0
    if layout.job_file.is_file():
        try:
            previous = JobRecord.from_json(layout.job_file.read_bytes(), source=layout.job_file)
            runs = previous.runs if previous.identity == identity else 0
        except (DocumentError, OSError):
            pass
        if runs:
            log.info("resuming job %s (run %d) from %s", layout.job_id, runs + 1, layout.job_dir)
        else:
            log.warning("job directory %s is not readable as this job's; starting it afresh", layout.job_dir)
            shutil.rmtree(layout.job_dir, ignore_errors=True)
    layout.create()
    record = JobRecord(
        identity=identity,
        input=str(spec.input.resolve()),
        output=str(spec.output.resolve()),
        frames=frames,
        runs=runs + 1,
        updated_at=time.time(),
    )
    write_json_atomic(layout.job_file, record.to_json())
    return runs + 1


# -- the job -------------------------------------------------------------------------------------


class Job:
    """One video through the farm, a handle: it decides the run's plan and hands it to a runner
    (:func:`coordinator.frame_runner.run_frames`); see the module docstring."""

    def __init__(self, spec: JobSpec, fleet: WorkerFleet, *, progress_interval_s: float = 0.25) -> None:
        self.spec = spec
        self.fleet = fleet
        self.farm: FarmSettings = fleet.farm
        self.layout: JobLayout | None = None
        self.media: JobMedia | None = None
        self.plan: RunPlan | None = None  # decided once the scale is known, before the run starts
        self.run_number = 0
        self.stats: dict[str, float] = {"segment_encode_s": 0.0, "worker_idle_s": 0.0}
        self._cpu_at_start = METER.snapshot()
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._meter = ProgressMeter(self._emit, progress_interval_s)
        self._task: asyncio.Task[JobResult] | None = None
        self._cancel_requested = False
        self._body_started = False  # _run's body began (a task cancelled before that never runs it)
        self._processes = ProcessGroup()
        self._threads = JobThreads()
        self._begun = time.monotonic()
        self._frame_format: FrameFormat | None = None  # decided once the input is probed

    # -- the handle -------------------------------------------------------------------------------

    def start(self) -> Job:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="esrfarm-job")
        return self

    async def events(self) -> AsyncIterator[JobEvent]:
        """Every event of the job, in order; ends after Finished, Failed or Cancelled."""
        self.start()
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed | Cancelled):
                return

    async def wait(self) -> JobResult:
        """The result; raises :class:`JobError` (or another of :data:`EXPECTED_ERRORS`) if it failed."""
        task = self.start()._task
        assert task is not None
        return await asyncio.shield(task)

    async def cancel(self) -> None:
        """Stop the job and wait until it has stopped: no batch goes out any more, the workers'
        manifests are reset, its ffmpeg processes are killed, the job directory is kept. Works at
        every instant: a job not started yet ends ``Cancelled`` as soon as it starts."""
        self._cancel_requested = True
        task = self._task
        if task is None or task.done():
            return
        if self._body_started:  # else the body sees the request first thing (a task cancelled
            self._processes.kill_all()  # before its first step would end without a last event)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    @property
    def job_dir(self) -> Path | None:
        return self.layout.job_dir if self.layout is not None else None

    @property
    def frame_format(self) -> FrameFormat:
        """The format of the job's frame files, decided once the input is probed."""
        assert self._frame_format is not None, "the frame format is decided once the input is probed"
        return self._frame_format

    def _emit(self, event: JobEvent) -> None:
        self._events.put_nowait(event)

    # -- the run ----------------------------------------------------------------------------------

    async def _run(self) -> JobResult:
        with process_group(self._processes):
            try:
                self._body_started = True
                if self._cancel_requested:
                    raise asyncio.CancelledError
                result = await self._upscale()
            except asyncio.CancelledError:
                if not self._cancel_requested:
                    raise
                self._emit(Cancelled(self.job_dir))
                raise JobCancelledError("the job was cancelled", self.job_dir) from None
            except JobError as exc:
                self._emit(
                    Failed(str(exc), exc.job_dir, exc.resumable, exc.batch_id, exc.frames, exc.reasons)
                )
                raise
            except EXPECTED_ERRORS as exc:
                self._emit(Failed(str(exc), self.job_dir, self.job_dir is not None))
                raise
            except Exception as exc:  # a defect: whoever drives the job still gets a last event
                log.exception("job failed unexpectedly")
                self._emit(Failed(f"internal error: {type(exc).__name__}: {exc}", self.job_dir, False))
                raise
        self._emit(Finished(result))
        return result

    async def _upscale(self) -> JobResult:
        """Probe, name the job, take its directory and lock, run it, and clean up after it."""
        spec = self.spec
        self._meter.report(Stage.PROBING, 0, 0)
        media = await self._threads.run(self._probe)
        if spec.transport == SEGMENTS_TRANSPORT and not isinstance(media, VideoMedia):
            raise JobError("cannot start: --transport segments is for videos (use frames)", resumable=False)
        if spec.dedup and not isinstance(media, VideoMedia):
            raise JobError("cannot start: --dedup is for videos (no image repeats another)", resumable=False)
        frame_format, yuv = self._frame_layout(media)
        started = time.monotonic()
        identity = await self._threads.run(job_identity, spec, media, yuv is not None)
        log.info("hashed the input in %.1f s", time.monotonic() - started)
        layout = JobLayout(self.farm.root, job_id_for(media.name, identity))
        lock = await self._threads.run(JobLock(layout).acquire)
        try:
            self.run_number = await self._threads.run(open_job_dir, layout, identity, spec, media.frame_count)
            self.layout, self.media = layout, media
            self._emit(Started(layout.job_id, layout.job_dir, media.frame_count, self.run_number))
            await self._produce(media, layout, frame_format, yuv)
            if not spec.keep_frames:
                await self._threads.run(shutil.rmtree, layout.job_dir, True)
            else:
                log.info("frames kept in %s", layout.job_dir)
        finally:
            await self._threads.settle()
            await asyncio.to_thread(lock.release)
        return self._result(layout.job_id, media)

    def _probe(self) -> JobMedia:
        """What the input is (a video, an image, a folder of images), checked with the output."""
        spec = self.spec
        media: JobMedia
        if is_image_job(spec.input, spec.output):
            media = ImageMedia(
                probe_images(spec.input, spec.output, overwrite=spec.overwrite), spec.overwrite
            )
        else:
            check_output_path(spec.input, spec.output, spec.overwrite)
            media = VideoMedia(
                probe(spec.input), spec.output, spec.encode, spec.overwrite, precision=spec.precision
            )
            media.check_output(spec.scale)
        self.farm.root.mkdir(parents=True, exist_ok=True)
        media.remove_leftovers()
        return media

    def _frame_layout(self, media: JobMedia) -> tuple[FrameFormat, YuvSpec | None]:
        """The frame files' format, decided once, before the job is named (YUV frames are part of
        its identity): every model's native scale is a whole number, which keeps the frame sides'
        parity, so the scale the workers will tell does not change it."""
        try:
            frame_format, yuv = media.frame_layout(self.spec.frame_format, self.spec.scale or 1.0)
        except ValueError as exc:
            raise JobError(f"cannot start: {exc}", resumable=False) from exc
        log.info("frames on shared storage: %s", yuv or frame_format.value)
        self._frame_format = frame_format
        return frame_format, yuv

    async def _produce(
        self, media: JobMedia, layout: JobLayout, frame_format: FrameFormat, yuv: YuvSpec | None
    ) -> None:
        """Run the job and join its parts into the output; a failure from here on keeps the job
        directory (the error says so)."""
        try:
            chunks = await self._run_plan(media, layout, frame_format, yuv)
            await self._join(media, layout, chunks)
        except JobError as exc:
            if exc.job_dir is not None or not exc.resumable:
                raise
            raise exc.kept_in(layout.job_dir) from exc.__cause__
        except EXPECTED_ERRORS as exc:
            if not layout.job_dir.is_dir():
                raise
            kind = WorkersLostError if isinstance(exc, FleetError) else JobError
            raise kind(str(exc), layout.job_dir) from exc
        except OSError as exc:  # the shared root or the output's disk: full, gone read-only...
            where = exc.filename or f"the shared root {layout.shared_root} or beside {self.spec.output}"
            raise JobError(f"cannot write to {where}: {exc.strerror or exc}", layout.job_dir) from exc

    async def _run_plan(
        self, media: JobMedia, layout: JobLayout, frame_format: FrameFormat, yuv: YuvSpec | None
    ) -> tuple[Chunk, ...]:
        """Decide the run's plan, last its scale, and hand it to the runner; the workers load their
        model meanwhile (``ready``), and the runner may start before they have."""
        ready = asyncio.ensure_future(self._workers_ready())
        try:
            scale = await self._scale(media, ready)
            self.plan = RunPlan(self.spec, media, layout, self.run_number, scale, frame_format, yuv)
            tools = RunTools(self.fleet, self._meter, self._emit, self._threads, self._processes, self.stats)
            runner: Runner = run_segments if self.spec.transport == SEGMENTS_TRANSPORT else run_frames
            return await runner(self.plan, tools, ready)
        finally:
            ready.cancel()

    async def _workers_ready(self) -> list[WorkerHandle]:
        handles = await self.fleet.wait_ready(self.spec.model, self.spec.backend)
        self._warn_if_resized(handles[0])
        self.stats["workers_ready_s"] = time.monotonic() - self._begun
        return handles

    async def _scale(self, media: JobMedia, ready: Awaitable[list[WorkerHandle]]) -> float:
        """The job's scale, found once: the one it names, else the one the workers' model gives
        (known once they have loaded it; the output is checked for it then)."""
        if self.spec.scale is not None:
            return self.spec.scale
        self._meter.report(Stage.LOADING, 0, 0)
        scale = (await ready)[0].scale
        assert scale is not None, "a worker that is ready tells its scale"
        await self._threads.run(media.check_output, scale)
        return scale

    def _warn_if_resized(self, handle: WorkerHandle) -> None:
        """A scale above the model's own is its output resized: say so (no detail is added)."""
        native, scale = handle.health.native_scale if handle.health else None, self.spec.scale
        if native is not None and scale is not None and scale > native:
            log.warning(
                "%s is a x%g model: scale %g resizes its x%g output by %g (plain resampling adds no "
                "detail; a x%g model, or scale %g, keeps what the model gives)",
                handle.model, native, scale, native, scale / native, scale, native,
            )  # fmt: skip

    async def _join(self, media: JobMedia, layout: JobLayout, chunks: tuple[Chunk, ...]) -> None:
        started = time.monotonic()
        self.stats["pipeline_done_s"] = started - self._begun
        self._meter.report(Stage.JOINING, 0, 1)
        await self._threads.run(media.finish, layout, chunks)
        self.stats["join_s"] = time.monotonic() - started
        log.info("joined %d part(s) into %s in %.1f s", len(chunks), self.spec.output, self.stats["join_s"])
        self._meter.report(Stage.JOINING, 1, 1)

    def _result(self, job_id: str, media: JobMedia) -> JobResult:
        self.stats["total_s"] = time.monotonic() - self._begun
        # CPU seconds of this process by stage while the job ran (media.cputime).
        for stage, seconds in grown(self._cpu_at_start, METER.snapshot()).items():
            self.stats[f"cpu_{stage}_s"] = seconds
        stats = {key: round(value, 3) for key, value in self.stats.items()}
        found = min(media.frame_count, self._meter.found)
        return JobResult(job_id, self.spec.output, media.frame_count, self.run_number > 1, stats, found)


async def upscale(
    spec: JobSpec,
    farm: FarmSettings,
    *,
    on_event: Callable[[JobEvent], None] | None = None,
    stop: asyncio.Event | None = None,
) -> JobResult:
    """Upscale one video on a fleet of its own (local workers are started and stopped here).

    ``stop``, once set, cancels the job (:meth:`Job.cancel`): it then raises :class:`JobCancelledError`.
    """
    local = (
        None
        if farm.workers
        else LocalWorkerConfig(spec.model, spec.scale, spec.tile, spec.precision, spec.backend)
    )
    run_dir = farm.root / "workers" / f"{socket.gethostname()}-{os.getpid()}"
    fleet = WorkerFleet(farm, local=local, run_dir=run_dir)
    await fleet.check_model()  # a bad --model is one line, before a worker starts or a job dir is made
    starting = asyncio.ensure_future(fleet.start())  # workers load their model while the input is probed
    job = Job(spec, fleet).start()
    stopper = asyncio.ensure_future(_cancel_when(stop, job)) if stop is not None else None
    try:
        async for event in job.events():
            if on_event is not None:
                on_event(event)
        result = await job.wait()
    finally:
        for task in (starting, stopper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await fleet.close()
    await asyncio.to_thread(shutil.rmtree, run_dir, True)  # worker logs are kept only if the job failed
    return result


async def _cancel_when(stop: asyncio.Event, job: Job) -> None:
    await stop.wait()
    await job.cancel()
