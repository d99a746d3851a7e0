"""One upscaling job, end to end, streamed through a bounded window of frames: the :class:`Job` handle.

The input's frames are cut into chunks (``manifests.chunks``), and each chunk moves through the
chunk book (``manifests.chunkbook``): extraction of chunk k+1, upscaling of chunk k and encoding of
chunk k-1 overlap, and frame data on disk stays under ``max_disk``. Each chunk becomes a
video-only segment; the segments are joined without re-encoding and the audio, subtitles and
chapters are muxed once from the source.

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
import concurrent.futures
import contextlib
import contextvars
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from coordinator.dedup import BLOCK as DEDUP_BLOCK
from coordinator.dedup import THRESHOLD as DEDUP_THRESHOLD
from coordinator.dedup import job_duplicate_map
from coordinator.errors import EXPECTED_ERRORS, JobCancelledError, JobError
from coordinator.events import (
    BatchFailed,
    Cancelled,
    Failed,
    Finished,
    JobEvent,
    JobResult,
    Progress,
    SegmentDone,
    Stage,
    Started,
    WorkerLost,
)
from coordinator.fleet import Dispatch, LocalWorkerConfig, WorkerFleet, WorkerHandle
from coordinator.images import is_image_job, probe_images
from coordinator.media import ImageMedia, JobMedia, VideoMedia, file_sha256
from coordinator.memory import release_free_memory
from coordinator.spec import FarmSettings, JobSpec
from manifests.chunkbook import Admission, ChunkBook, ChunkStage
from manifests.chunks import Chunk, ChunkPlan, format_size, plan_chunks
from manifests.colour import YuvSpec
from manifests.dedup import DuplicateMap, chunk_sources, plan_unique_batches
from manifests.errors import DocumentError, FormatVersionError, PlanningError
from manifests.frames import frame_file_is_sound
from manifests.jobrecord import JobRecord, SegmentsRecord
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout, frame_filename
from manifests.ledger import JobLedger
from manifests.manifest import Batch, Manifest
from manifests.planner import plan_batches
from manifests.progress import ProgressThrottle, job_progress
from manifests.status import Status
from media.cputime import METER, grown
from media.encode import PART_SUFFIX
from media.ffmpeg import ProcessGroup, process_group
from media.probe import check_output_path, probe
from media.segments import SEGMENT_SUFFIX

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        identity["dedup"] = {"block": DEDUP_BLOCK, "threshold": DEDUP_THRESHOLD}
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


@dataclass(frozen=True)
class _Parked:
    """A manifest a worker refused as busy (409), kept to be sent again instead of a new file."""

    manifest_id: str
    batches: tuple[Batch, ...]


class _Stopped(Exception):
    """Extraction was told to stop (the job is ending)."""


# -- the job -------------------------------------------------------------------------------------


class Job:
    """One video through the farm; see the module docstring."""

    def __init__(self, spec: JobSpec, fleet: WorkerFleet, *, progress_interval_s: float = 0.25) -> None:
        self.spec = spec
        self.fleet = fleet
        self.farm: FarmSettings = fleet.farm
        self.layout: JobLayout | None = None
        self.media: JobMedia | None = None
        self.run_number = 0
        self.stats: dict[str, float] = {"segment_encode_s": 0.0, "worker_idle_s": 0.0}
        self._cpu_at_start = METER.snapshot()
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._throttle = ProgressThrottle(progress_interval_s)
        self._task: asyncio.Task[JobResult] | None = None
        self._cancel_requested = False
        self._body_started = False  # _run's body began (a task cancelled before that never runs it)
        self._processes = ProcessGroup()
        self._threads: set[asyncio.Future[Any]] = set()
        self._begun = time.monotonic()
        # set by the pipeline
        self._book: ChunkBook | None = None
        self._plan: ChunkPlan | None = None
        self._scale: float | None = spec.scale
        self._frame_format: FrameFormat | None = None  # decided once the input is probed
        self._yuv: YuvSpec | None = None
        self._dedup: DuplicateMap | None = None  # --dedup: which frames reuse another's upscale
        self._batch_ids: dict[int, int] = {}  # --dedup: upscaled frame -> its batch
        self._ledger = JobLedger.for_batches([])
        self._to_extract: frozenset[int] = frozenset()
        self._batch_size = spec.batch_size
        self._admissions: dict[int, asyncio.Future[Admission | None]] = {}
        self._extraction: asyncio.Future[None] | None = None
        self._encoding: dict[int, asyncio.Future[None]] = {}
        self._encode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._holders: dict[str, WorkerHandle] = {}  # open manifest id -> the worker holding it
        self._last_status: dict[str, bytes] = {}
        self._last_change: dict[str, float] = {}
        self._reported_errors: set[tuple[str, int]] = set()
        self._parked: dict[str, _Parked] = {}
        self._lost: set[str] = set()
        self._reset_orphans: set[str] = set()
        self._stopping = False
        self._manifest_count = 0
        self._ready = False
        self._frames_found = 0  # frames of chunks an earlier run finished (upscaled or encoded)
        self._found_batch_frames = 0  # frames of batches found on disk and added to the ledger done
        self._encoded_before = 0
        self._encoding_from: tuple[float, int] | None = (
            None  # (loop time, frames encoded) at the stage's start
        )
        self._frames_extracted = 0
        self._started_at = 0.0  # loop time the workers were ready
        self._last_tick: float | None = None
        self._callback_error: Exception | None = None

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

    def _emit(self, event: JobEvent) -> None:
        self._events.put_nowait(event)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work on a thread; the job waits for it even when cancelled meanwhile."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._threads.add(future)
        future.add_done_callback(self._threads.discard)
        return await asyncio.shield(future)

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
        spec = self.spec
        self._report(Stage.PROBING, 0, 0)
        media = await self._in_thread(self._probe)
        if spec.dedup and not isinstance(media, VideoMedia):
            raise JobError("cannot start: --dedup is for videos (no image repeats another)", resumable=False)
        # The frame files' format, decided once: every model's native scale is a whole number, which
        # keeps the frame sides' parity, so the scale the workers will tell does not change it.
        try:
            self._frame_format, self._yuv = media.frame_layout(spec.frame_format, spec.scale or 1.0)
        except ValueError as exc:
            raise JobError(f"cannot start: {exc}", resumable=False) from exc
        log.info("frames on shared storage: %s", self._yuv or self._frame_format.value)
        started = time.monotonic()
        identity = await self._in_thread(job_identity, spec, media, self._yuv is not None)
        log.info("hashed the input in %.1f s", time.monotonic() - started)
        layout = JobLayout(self.farm.root, job_id_for(media.name, identity))
        lock = await self._in_thread(JobLock(layout).acquire)
        try:
            self.run_number = await self._in_thread(open_job_dir, layout, identity, spec, media.frame_count)
            self.layout, self.media = layout, media
            self._emit(Started(layout.job_id, layout.job_dir, media.frame_count, self.run_number))
            try:
                await self._upscale_frames()
                await self._join()
            except JobError as exc:
                if exc.job_dir is not None or not exc.resumable:
                    raise
                raise exc.kept_in(layout.job_dir) from exc.__cause__
            except EXPECTED_ERRORS as exc:
                if not layout.job_dir.is_dir():
                    raise
                raise JobError(str(exc), layout.job_dir) from exc
            except OSError as exc:  # the shared root or the output's disk: full, gone read-only...
                where = exc.filename or f"the shared root {layout.shared_root} or beside {spec.output}"
                raise JobError(f"cannot write to {where}: {exc.strerror or exc}", layout.job_dir) from exc
            if not spec.keep_frames:
                await self._in_thread(shutil.rmtree, layout.job_dir, True)
            else:
                log.info("frames kept in %s", layout.job_dir)
        finally:
            await asyncio.gather(*self._threads, return_exceptions=True)
            await asyncio.to_thread(lock.release)
        self.stats["total_s"] = time.monotonic() - self._begun
        # CPU seconds of this process by stage while the job ran (media.cputime).
        for stage, seconds in grown(self._cpu_at_start, METER.snapshot()).items():
            self.stats[f"cpu_{stage}_s"] = seconds
        stats = {key: round(value, 3) for key, value in self.stats.items()}
        found = min(media.frame_count, self._frames_found + self._found_batch_frames)
        return JobResult(layout.job_id, spec.output, media.frame_count, self.run_number > 1, stats, found)

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

    async def _upscale_frames(self) -> None:
        """Plan, extract, upscale and encode every chunk; the segments are on disk afterwards."""
        spec = self.spec
        ready = asyncio.ensure_future(self.fleet.wait_ready(spec.model, spec.backend))
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(spec.encoder_count, "segment")
        succeeded = False
        try:
            if self._scale is not None:  # else the workers tell the scale first
                await self._start_pipeline()
            self._report(Stage.LOADING, 0, 0)
            handles = await ready
            self._warn_if_resized(handles[0])
            self._ready = True
            self.stats["workers_ready_s"] = time.monotonic() - self._begun
            if self._book is None:
                self._scale = handles[0].scale
                assert self.media is not None
                await self._in_thread(self.media.check_output, self._scale)
                await self._start_pipeline()
            self._started_at = asyncio.get_running_loop().time()
            await self._loop()
            assert self._extraction is not None
            await self._extraction
            succeeded = True
        finally:
            ready.cancel()
            await self._stop(succeeded)

    def _warn_if_resized(self, handle: WorkerHandle) -> None:
        """A scale above the model's own is its output resized: say so (no detail is added)."""
        native, scale = handle.health.native_scale if handle.health else None, self.spec.scale
        if native is not None and scale is not None and scale > native:
            log.warning(
                "%s is a x%g model: scale %g resizes its x%g output by %g (plain resampling adds no "
                "detail; a x%g model, or scale %g, keeps what the model gives)",
                handle.model, native, scale, native, scale / native, scale, native,
            )  # fmt: skip

    async def _loop(self) -> None:
        """The job, one step after another every ``poll_interval_s``, until every segment is encoded."""
        assert self._book is not None
        while not self._book.all_encoded:
            self._raise_if_extraction_failed()
            self._admit_chunks()
            await self._read_statuses()
            self._account_lost_workers()
            await self._take_back_from_unwritable_workers()
            self._lose_stale_workers()
            await self._collect_upscaled_chunks()
            self._start_encoders()
            await self._collect_segments()
            self._raise_if_stuck()
            await self._deal()
            self._report_progress()
            await asyncio.sleep(self.farm.poll_interval_s)
        log.info(
            "upscaled and encoded %d frames; frame data admitted at most %s",
            self._ledger.frames_done,
            format_size(self._book.peak),
        )

    async def _stop(self, succeeded: bool) -> None:
        """Whatever way the pipeline ends: extraction and encoders stopped, workers reset if it failed."""
        self._stopping = True
        for future in self._admissions.values():
            if not future.done():
                future.set_result(None)
        if not succeeded:
            self._processes.kill_all()
            holders = [h for h in set(self._holders.values()) if h.holding in self._holders]
            await asyncio.gather(*(self.fleet.reset(h) for h in holders))
            for manifest_id, handle in self._holders.items():
                self.fleet.release(handle, manifest_id)
        waits = [f for f in (self._extraction, *self._encoding.values()) if f is not None]
        await asyncio.gather(*waits, return_exceptions=True)
        if self._encode_pool is not None:
            await asyncio.to_thread(self._encode_pool.shutdown, True, cancel_futures=True)

    # -- planning ---------------------------------------------------------------------------------

    async def _start_pipeline(self) -> None:
        """Plan the chunks, take in what earlier runs left, and start extracting."""
        spec, media, layout = self.spec, self.media, self.layout
        assert media is not None and layout is not None and self._scale is not None
        input_bytes, output_bytes = media.frame_bytes(self._scale, self.frame_format)
        self._batch_size = batch_size = media.batch_size(spec.batch_size)
        try:
            plan = plan_chunks(
                media.frame_count,
                batch_size=batch_size,
                input_frame_bytes=input_bytes,
                output_frame_bytes=output_bytes,
                max_disk=spec.max_disk,
                max_chunk_frames=spec.max_chunk_frames,
            )
        except PlanningError as exc:
            if self.run_number == 1:  # nothing of this job is on disk: leave nothing behind
                await self._in_thread(shutil.rmtree, layout.job_dir, True)
            raise JobError(f"cannot start: {exc}", resumable=False) from exc
        if spec.dedup:
            self._dedup = await self._in_thread(self._duplicate_map, plan)
            batches = plan_unique_batches(plan, self._dedup, batch_size)
            self._batch_ids = {frame: b.id for b in batches for frame in b.frames}
        else:
            batches = plan_batches(media.frame_count, batch_size, ["all"]).batches
        encoded, on_disk = await self._in_thread(self._scan_disk, plan, batches)
        # Kept output frames stay on disk: the budget then cannot hold, and is not enforced.
        budget = None if spec.keep_frames else spec.max_disk
        self._plan = plan
        held = self._dedup.duplicates.keys() if self._dedup is not None else frozenset()
        self._book = book = ChunkBook(
            plan, batches, budget=budget, encoded=encoded, outputs_on_disk=on_disk, held=held
        )
        self._to_extract = frozenset(c.index for c in book.in_stage(ChunkStage.WAITING))
        self._frames_found = book.frames_in(ChunkStage.UPSCALED, ChunkStage.ENCODED)
        if self.run_number > 1:
            log.info(
                "resuming: %d of %d segments done, %d more chunks upscaled",
                len(encoded),
                len(plan.chunks),
                len(book.in_stage(ChunkStage.UPSCALED)),
            )
        log.info(
            "%d frames in %d chunk(s) of up to %d frames; frame data kept under %s",
            media.frame_count,
            len(plan.chunks),
            plan.chunk_frames,
            format_size(spec.max_disk),
        )
        if held:  # held frames are upscaled by no worker: progress counts the upscaled frames
            found = book.in_stage(ChunkStage.UPSCALED) + book.in_stage(ChunkStage.ENCODED)
            self._frames_found -= sum(1 for chunk in found for frame in chunk.frames if frame in held)
        self._extraction = asyncio.ensure_future(self._in_thread(self._extract))

    def _duplicate_map(self, plan: ChunkPlan) -> DuplicateMap:
        """--dedup: the map an earlier run kept, or one found now (a decode of the whole video)."""
        assert self.layout is not None and isinstance(self.media, VideoMedia)
        started = time.monotonic()
        yuv = self._yuv
        bits = yuv.bits if yuv is not None else self.media.bit_depth
        dedup = job_duplicate_map(self.layout.job_dir, self.media.info, plan, yuv=yuv is not None, bits=bits)
        self.stats["dedup_s"] = time.monotonic() - started
        self.stats["frames_upscaled"] = dedup.upscaled_count
        return dedup

    def _scan_disk(self, plan: ChunkPlan, batches: Iterable[Batch]) -> tuple[set[int], dict[int, set[int]]]:
        """What earlier runs left that can be trusted: complete segments, and batches whose output
        frames are all whole and of the right size (a damaged frame is deleted and redone)."""
        layout, spec, media, scale = self.layout, self.spec, self.media, self._scale
        assert layout is not None and media is not None and scale is not None
        self._check_segments_record(plan)
        for leftover in layout.segments_dir.glob(f".*{PART_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a killed encoder's; this coordinator holds the job lock
        encoded = {c.index for c in plan.chunks if media.part_done(layout, c)}
        on_disk: dict[int, set[int]] = {}
        for batch in batches:
            chunk = plan.chunk_of(batch.frames[0])
            if chunk.index in encoded:
                continue
            paths = [layout.output_dir / frame_filename(f, self.frame_format) for f in batch.frames]
            if not all(path.is_file() for path in paths):
                continue
            damaged = [
                path
                for frame, path in zip(batch.frames, paths, strict=True)
                if not frame_file_is_sound(
                    path, self.frame_format, *media.output_size(frame, scale), bit_depth=media.bit_depth
                )
            ]
            for path in damaged:
                log.warning("output frame %s of an earlier run is damaged; its batch is upscaled again", path)
                path.unlink(missing_ok=True)
            if not damaged:
                on_disk.setdefault(chunk.index, set()).add(batch.id)
        for chunk in plan.chunks:
            if chunk.index in encoded:
                self._remove_frames(chunk, layout.input_dir)
                if not spec.keep_frames:
                    self._remove_frames(chunk, layout.output_dir)
        return encoded, on_disk

    def _check_segments_record(self, plan: ChunkPlan) -> None:
        """Segments of an earlier run count only if cut and encoded the same way."""
        assert self.layout is not None
        encode = asdict(self.spec.encode)
        record = SegmentsRecord(
            chunk_frames=plan.chunk_frames, encode={**encode, "extra_args": list(self.spec.encode.extra_args)}
        )
        record_file = self.layout.segments_dir / "segments.json"
        previous: SegmentsRecord | None = None
        with contextlib.suppress(OSError, DocumentError):
            previous = SegmentsRecord.from_json(record_file.read_bytes(), source=record_file)
        if previous != record and any(self.layout.segments_dir.glob(f"*{SEGMENT_SUFFIX}")):
            log.info("encoder settings or chunking changed: the earlier segments are encoded again")
            for segment in self.layout.segments_dir.glob(f"*{SEGMENT_SUFFIX}"):
                segment.unlink()
        write_json_atomic(record_file, record.to_json())

    def _remove_frames(self, chunk: Chunk, directory: Path) -> None:
        for frame in chunk.frames:
            (directory / frame_filename(frame, self.frame_format)).unlink(missing_ok=True)

    # -- extraction (a thread) and admission (the loop) -------------------------------------------

    def _extract(self) -> None:
        """Decodes the input once, writing the frames of the chunks the book admits."""
        plan, media, layout = self._plan, self.media, self.layout
        assert plan is not None and media is not None and layout is not None
        if not self._to_extract:
            return
        loop = self._loop_ref()
        batch_size = self._batch_size
        skip: frozenset[int] = frozenset()

        def gate(index: int) -> bool:
            nonlocal skip
            chunk = plan.chunk_of(index)
            if chunk.index not in self._to_extract:
                return False
            if index == chunk.first:
                admitted = asyncio.run_coroutine_threadsafe(self._admission(chunk.index), loop).result()
                if admitted is None:
                    raise _Stopped
                skip = admitted.skip
            if self._dedup is None:
                return (index - 1) // batch_size not in skip
            return self._batch_ids.get(index, -1) not in skip and index in self._batch_ids

        def on_frame(index: int) -> None:
            if plan.chunk_of(index).index in self._to_extract:
                with contextlib.suppress(RuntimeError):  # the loop closed: the job is over
                    loop.call_soon_threadsafe(self._frame_extracted, index)

        started = time.monotonic()
        try:
            media.extract(layout.input_dir, self.frame_format, self.spec.png_compression, gate, on_frame)
        except _Stopped:
            return
        except EXPECTED_ERRORS:
            if self._stopping:
                return  # killed on purpose: the job is ending for another reason
            raise
        self.stats["extract_s"] = time.monotonic() - started
        log.info("extracted %d frames in %.1f s", media.frame_count, time.monotonic() - started)

    def _loop_ref(self) -> asyncio.AbstractEventLoop:
        assert self._task is not None
        return self._task.get_loop()

    async def _admission(self, index: int) -> Admission | None:
        """The extraction thread waits here until the book admits chunk ``index`` (None: stop)."""
        if self._stopping:
            return None
        future = self._admissions[index] = asyncio.get_running_loop().create_future()
        return await future

    def _admit_chunks(self) -> None:
        assert self._book is not None
        while (chunk := self._book.next_admission()) is not None and chunk.index in self._admissions:
            future = self._admissions.pop(chunk.index)
            future.set_result(self._book.admit(chunk.index))

    def _frame_extracted(self, index: int) -> None:
        """Frame ``index`` is on disk (or not needed): batches whose frames are all there go to the
        ledger at once, so workers start before the whole chunk is extracted."""
        assert self._book is not None
        if self._stopping:
            return
        self._frames_extracted += 1
        try:
            chunk = self._book.frame_extracted(index)
            for batch, done in self._book.ready_batches(chunk) if chunk is not None else ():
                self._ledger.add([batch], done=[batch.id] if done else [])
                if done:
                    self._found_batch_frames += len(batch)
        except Exception as exc:  # a callback's error would be lost: the loop raises it
            self._callback_error = exc

    def _raise_if_extraction_failed(self) -> None:
        if self._callback_error is not None:
            raise self._callback_error

        extraction = self._extraction
        if extraction is not None and extraction.done() and extraction.exception() is not None:
            extraction.result()

    # -- status files and workers -----------------------------------------------------------------

    async def _read_statuses(self) -> None:
        """The status file of every manifest a worker holds for this job, until it is final (a
        manifest whose batches are all done still holds its worker until then)."""
        manifest_ids = list(self._holders)
        if not manifest_ids:
            return
        raws = await self._in_thread(self._read_status_files, manifest_ids)
        now = asyncio.get_running_loop().time()
        for manifest_id, raw in raws.items():
            if raw is not None and raw != self._last_status.get(manifest_id):
                self._last_status[manifest_id] = raw
                self._last_change[manifest_id] = now
                self._take_status(manifest_id, raw)

    def _read_status_files(self, manifest_ids: list[str]) -> dict[str, bytes | None]:
        assert self.layout is not None
        raws: dict[str, bytes | None] = {}
        for manifest_id in manifest_ids:
            try:
                raws[manifest_id] = self.layout.status_path(manifest_id).read_bytes()
            except FileNotFoundError:
                raws[manifest_id] = None
        return raws

    def _take_status(self, manifest_id: str, raw: bytes) -> None:
        assert self.layout is not None
        handle = self._holders[manifest_id]
        path = self.layout.status_path(manifest_id)
        try:
            status = Status.from_json(raw, source=path)
        except FormatVersionError as exc:
            self.fleet.lose(handle, f"it writes status files this coordinator cannot read ({exc})")
            return
        except DocumentError as exc:
            log.warning("ignoring unreadable status file: %s", exc)
            return
        for error in status.errors:
            if (manifest_id, error.batch_id) not in self._reported_errors:
                self._reported_errors.add((manifest_id, error.batch_id))
                log.warning("worker %s: %s", handle.worker_id, error)
                self._emit(BatchFailed(error.batch_id, error.frame, handle.worker_id, error.reason))
        if manifest_id in self._ledger.manifests:  # else its batches are encoded and forgotten already
            self._ledger.record_status(status)
        if status.state.is_final:
            self._end_manifest(manifest_id)

    def _end_manifest(self, manifest_id: str) -> None:
        handle = self._holders.pop(manifest_id)
        self.fleet.release(handle, manifest_id)
        self._last_status.pop(manifest_id, None)
        self._last_change.pop(manifest_id, None)

    def _account_lost_workers(self) -> None:
        """A worker the fleet lost gives its batches back (once)."""
        for handle in self.fleet.handles.values():
            if handle.alive or handle.url in self._lost:
                continue
            self._lost.add(handle.url)
            returned = self._ledger.release_worker(handle.url)
            for manifest_id in [m for m, h in self._holders.items() if h is handle]:
                self._end_manifest(manifest_id)
            if returned or handle.serves(self.spec.model, self.spec.backend):
                log.error("%d batch(es) of lost worker %s go to the others", len(returned), handle.worker_id)
                self._emit(WorkerLost(handle.worker_id, handle.lost_reason or "lost", len(returned)))

    async def _take_back_from_unwritable_workers(self) -> None:
        """A worker whose /health says it cannot write the shared root would never update its status
        file: its manifests end now and their batches go to the others. It is not lost: the fleet
        deals to it again once it can write."""
        for manifest_id, handle in list(self._holders.items()):
            reason = handle.storage_error
            if reason is None:
                continue
            returned = self._ledger.release(manifest_id)
            self._end_manifest(manifest_id)
            await self.fleet.reset(handle)
            log.error(
                "worker %s cannot write the shared storage (%s): its %d batch(es) go to the others, and it "
                "gets no more until it can",
                handle.worker_id,
                reason,
                len(returned),
            )

    def _lose_stale_workers(self) -> None:
        now = asyncio.get_running_loop().time()
        for manifest_id, handle in list(self._holders.items()):
            still = now - self._last_change.get(manifest_id, now)
            if still > self.farm.stale_after_s:
                self.fleet.lose(handle, f"its status file did not change for {still:.0f} s")

    # -- chunks -----------------------------------------------------------------------------------

    async def _collect_upscaled_chunks(self) -> None:
        """A chunk whose batches are all done (and on disk) frees its input frames."""
        assert self._book is not None and self.layout is not None
        for chunk in self._book.in_stage(ChunkStage.UPSCALING):
            batches = self._book.batches(chunk.index)
            if not all(b.id in self._ledger.done for b in batches):
                continue
            missing = await self._in_thread(self._missing_outputs, batches)
            for batch in missing:
                worker = self._ledger.done_by.get(batch.id, "")
                self._ledger.record_failure(
                    worker, batch.id, "its output frames are missing although it was done"
                )
            if missing:
                continue
            self._book.upscaled(chunk.index)
            await self._in_thread(self._remove_frames, chunk, self.layout.input_dir)

    def _missing_outputs(self, batches: Iterable[Batch]) -> list[Batch]:
        assert self.layout is not None
        out = self.layout.output_dir
        fmt = self.frame_format
        return [b for b in batches if not all((out / frame_filename(f, fmt)).is_file() for f in b.frames)]

    def _start_encoders(self) -> None:
        assert self._book is not None and self._encode_pool is not None
        loop = asyncio.get_running_loop()
        for chunk in self._book.in_stage(ChunkStage.UPSCALED):
            self._book.encoding_started(chunk.index)
            context = contextvars.copy_context()  # the encoder's ffmpeg joins this job's process group
            self._encoding[chunk.index] = loop.run_in_executor(
                self._encode_pool, context.run, self._make_part, chunk
            )

    def _make_part(self, chunk: Chunk) -> None:
        assert self.media is not None and self.layout is not None
        started = time.monotonic()
        try:
            sources = chunk_sources(chunk, self._dedup) if self._dedup is not None else None
            self.media.make_part(self.layout, chunk, self.frame_format, sources)
        finally:
            # The segment's frame arrays and buffers are freed: hand the pages back, so that heap
            # fragmentation cannot raise the RSS step by step over a long job (coordinator.memory).
            release_free_memory()
            self.stats["segment_encode_s"] += time.monotonic() - started

    async def _collect_segments(self) -> None:
        assert self._book is not None and self.layout is not None
        for index, future in list(self._encoding.items()):
            if not future.done():
                continue
            del self._encoding[index]
            future.result()  # raises the encoder's error: the job fails, the frames stay
            batches = self._book.encoded(index)
            self._ledger.forget(b.id for b in batches if b.id in self._ledger.batches)
            assert self._plan is not None
            chunk = self._plan.chunks[index]
            if not self.spec.keep_frames:
                await self._in_thread(self._remove_frames, chunk, self.layout.output_dir)
            log.info("segment %d (frames %d-%d) encoded", chunk.index, chunk.first, chunk.last)
            self._emit(SegmentDone(chunk.index, chunk.first, chunk.last))

    def _raise_if_stuck(self) -> None:
        # A worker being restarted (a Ray actor) counts: it comes back as a new worker.
        alive = [
            h.url for h in self.fleet.serving(self.spec.model, self.spec.backend)
        ] + self.fleet.replacing()
        failure = self._ledger.failure(alive)
        if failure is not None:
            batch = failure.batch
            raise JobError(
                f"upscaling failed: {failure}",
                batch_id=batch.id if batch is not None else None,
                frames=batch.frames if batch is not None else (),
                reasons=dict(failure.reasons),
            )

    # -- dealing ----------------------------------------------------------------------------------

    async def _deal(self) -> None:
        """Each idle worker gets its share of the pending batches; the rest waits for the next one."""
        await self._reset_orphaned_manifests()
        await self._drop_stale_parked_manifests()
        pending = len(self._ledger.pending())
        idle = self.fleet.idle(self.spec.model, self.spec.backend)
        if not pending or not idle:
            return
        serving = len(self.fleet.serving(self.spec.model, self.spec.backend))
        share = -(-pending // max(1, serving))
        handles = {h.url: h for h in idle}
        for url, batches in self._ledger.deal(list(handles), limit=share * len(idle)).items():
            await self._dispatch(handles[url], batches[:share])

    async def _reset_orphaned_manifests(self) -> None:
        """A worker still busy with this job's manifest of an earlier, killed run is reset (once)."""
        assert self.layout is not None
        for handle in self.fleet.serving(self.spec.model, self.spec.backend):
            health = handle.health
            manifest_id = (health.manifest_id if health else None) or ""
            if (
                handle.busy_elsewhere
                and health is not None
                and health.job_id == self.layout.job_id
                and not manifest_id.startswith(f"r{self.run_number:02d}-")
                and handle.url not in self._reset_orphans
            ):
                self._reset_orphans.add(handle.url)
                log.info("resetting %s: it still runs a manifest of an earlier run", handle.worker_id)
                await self.fleet.reset(handle)

    async def _drop_stale_parked_manifests(self) -> None:
        """A manifest refused as busy is kept for its worker while its batches wait; once any of them
        went elsewhere, its file is deleted."""
        assert self.layout is not None
        pending = {b.id for b in self._ledger.pending()}
        for url, parked in list(self._parked.items()):
            if not all(b.id in pending for b in parked.batches):
                del self._parked[url]
                await self._in_thread(self.layout.manifest_path(parked.manifest_id).unlink, True)

    async def _dispatch(self, handle: WorkerHandle, batches: tuple[Batch, ...]) -> None:
        assert self.layout is not None
        parked = self._parked.pop(handle.url, None)
        if parked is not None and parked.batches == batches:
            manifest_id = parked.manifest_id  # the same file again: nothing new is written
        else:
            if parked is not None:
                await self._in_thread(self.layout.manifest_path(parked.manifest_id).unlink, True)
            self._manifest_count += 1
            manifest_id = f"r{self.run_number:02d}-m{self._manifest_count:05d}"
            manifest = self._manifest(manifest_id, handle, batches)
            await self._in_thread(
                write_json_atomic, self.layout.manifest_path(manifest_id), manifest.to_json()
            )
        if handle.holding is not None:  # another job on the fleet dealt to it while the file was written
            self._parked[handle.url] = _Parked(manifest_id, batches)
            return
        self._ledger.assign(manifest_id, handle.url, batches)
        self._holders[manifest_id] = handle
        path = self.layout.manifest_path(manifest_id).relative_to(self.layout.shared_root)
        outcome = await self.fleet.dispatch(handle, manifest_id, str(path))
        if outcome is not Dispatch.ACCEPTED:
            self._ledger.release(manifest_id)
            del self._holders[manifest_id]
            if outcome is Dispatch.BUSY:
                self._parked[handle.url] = _Parked(manifest_id, batches)
            return
        self._last_change[manifest_id] = asyncio.get_running_loop().time()
        log.debug(
            "dispatched %s (batches %s) to %s",
            manifest_id,
            ",".join(str(b.id) for b in batches),
            handle.worker_id,
        )

    @property
    def frame_format(self) -> FrameFormat:
        """The format of the job's frame files, decided once the input is probed."""
        assert self._frame_format is not None, "the frame format is decided once the input is probed"
        return self._frame_format

    def _manifest(self, manifest_id: str, handle: WorkerHandle, batches: tuple[Batch, ...]) -> Manifest:
        assert self.layout is not None and self.media is not None
        return Manifest(
            job_id=self.layout.job_id,
            manifest_id=manifest_id,
            worker_id=handle.worker_id,
            model=self.spec.model,
            batches=batches,
            scale=self._scale,
            tile=self.spec.tile,
            frame_format=self.frame_format,
            png_compression=self.spec.png_compression,
            bit_depth=self.media.bit_depth,
            yuv=self._yuv,
        )

    # -- progress and the end ---------------------------------------------------------------------

    def _report(
        self, stage: Stage, done: int, total: int, *, this_run: int = 0, elapsed_s: float = 0.0
    ) -> None:
        report = job_progress(
            stage.value, done=done, total=total, done_this_run=this_run, elapsed_s=elapsed_s
        )
        if self._throttle.admit(report, time.monotonic()):
            self._emit(Progress(report.stage, report.done, report.total, report.fps, report.eta_s))

    def _report_progress(self) -> None:
        assert self._book is not None and self.media is not None
        now = asyncio.get_running_loop().time()
        elapsed = now - self._started_at
        idle = sum(1 for h in self.fleet.serving(self.spec.model, self.spec.backend) if h.holding is None)
        self.stats["worker_idle_s"] += idle * (now - (self._last_tick or now))
        self._last_tick = now
        total = self.media.frame_count
        ledger = self._ledger
        upscaling_total = self._dedup.upscaled_count if self._dedup is not None else total
        if not self._book.all_upscaled:
            if not ledger.batches and not ledger.frames_forgotten and not self._frames_found:
                self._report(Stage.EXTRACTING, self._frames_extracted, total)
                return
            done = self._frames_found + ledger.frames_done
            this_run = ledger.frames_done - self._found_batch_frames
            self._report(Stage.UPSCALING, done, upscaling_total, this_run=this_run, elapsed_s=elapsed)
        else:
            # The encoding stage's own rate: from when it began, not the upscaling's over the whole run.
            encoded = self._book.frames_in(ChunkStage.ENCODED)
            if self._encoding_from is None:
                self._encoding_from = (now, encoded)
            since, before = self._encoding_from
            self._report(Stage.ENCODING, encoded, total, this_run=encoded - before, elapsed_s=now - since)

    async def _join(self) -> None:
        assert self._plan is not None and self.media is not None and self.layout is not None
        started = time.monotonic()
        self.stats["pipeline_done_s"] = started - self._begun
        self._report(Stage.JOINING, 0, 1)
        await self._in_thread(self.media.finish, self.layout, self._plan.chunks)
        self.stats["join_s"] = time.monotonic() - started
        log.info(
            "joined %d part(s) into %s in %.1f s",
            len(self._plan.chunks),
            self.spec.output,
            self.stats["join_s"],
        )
        self._report(Stage.JOINING, 1, 1)


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
