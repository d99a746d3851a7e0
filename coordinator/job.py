"""One upscaling job, end to end, streamed through a bounded window of frames.

The input's frames are cut into chunks (``manifests.chunks``). Extraction of chunk k+1, upscaling
of chunk k and encoding of chunk k-1 overlap; frame data on disk stays under ``max_disk``. Each
chunk becomes a video-only segment; the segments are joined without re-encoding and the audio,
subtitles and chapters are muxed once from the source.

The coordinator trusts files, not promises: a batch is done when a status file claims it and its
output frames are on disk. A worker that fails or vanishes (process gone, ``/health`` unreachable
for ``unreachable_after_s``, status file unchanged for ``stale_after_s``) loses its batches to the
others. The job fails when no worker is left, or when one batch has failed on two workers.

A job is named by what determines its frames: the input's content, the model, the scale, the tile
size and the precision. Started again with the same command after a crash (even SIGKILL), it finds
its job directory and continues: finished segments are kept, batches whose output frames are on
disk are not upscaled again. Changing only encoder settings re-encodes the segments, from the
upscaled frames when they were kept (``--keep-frames``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from coordinator.client import WorkerBusyError, WorkerClient, WorkerRequestError
from coordinator.encode import EncodeSettings, check_encode
from coordinator.extract import extract_frames
from coordinator.local_workers import LocalWorkerPool, visible_gpu_count
from coordinator.memory import release_free_memory
from coordinator.probe import MediaInfo, check_output_path, probe
from coordinator.segments import SEGMENT_SUFFIX, encode_segment, join_segments, segment_is_complete
from manifests.chunks import Chunk, ChunkPlan, format_size, frame_file_bytes, plan_chunks
from manifests.errors import DocumentError, PlanningError
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout, frame_filename
from manifests.ledger import JobLedger
from manifests.manifest import Batch, Manifest
from manifests.planner import plan_batches
from manifests.status import Status

log = logging.getLogger(__name__)

DEFAULT_MODEL = "realesr-animevideov3"
DEFAULT_MAX_DISK = 4 << 30
JOB_FORMAT = "esrfarm.job/1"


class JobError(Exception):
    """The job could not be done. ``job_dir`` is where its files were kept, if anywhere."""

    def __init__(self, message: str, job_dir: Path | None = None) -> None:
        self.message, self.job_dir = message, job_dir
        kept = f" (its files are kept in {job_dir}; the same command resumes it)" if job_dir else ""
        super().__init__(f"{message}{kept}")


@dataclass(frozen=True)
class UpscaleSettings:
    """Everything one ``esrfarm upscale`` needs; every timeout is a setting so tests can shrink it."""

    input: Path
    output: Path
    scale: float | None = None  # None: the model's own
    model: str = DEFAULT_MODEL
    tile: int | None = None  # None: whatever the workers run
    precision: str | None = None  # local workers only; None: the device's default
    workers: tuple[str, ...] = ()  # worker URLs; empty: start local workers
    local_workers: int | None = None  # None: one per visible GPU, or one on the CPU
    local_worker_args: tuple[str, ...] = ()  # extra flags for local workers (e.g. --cpu-threads 1)
    shared_root: Path | None = None
    batch_size: int = 8
    frame_format: FrameFormat = FrameFormat.PNG
    png_compression: int = 1
    max_disk: int = DEFAULT_MAX_DISK  # bytes of input and output frames on disk at once
    max_chunk_frames: int = 256
    encoders: int | None = None  # segments encoded at once; None: by CPU count
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    overwrite: bool = False
    keep_frames: bool = False
    token: str | None = field(default=None, repr=False)
    poll_interval_s: float = 0.02
    health_interval_s: float = 2.0
    startup_timeout_s: float = 600.0  # local workers: model load and warm-up
    unreachable_after_s: float = 30.0
    stale_after_s: float = 600.0
    request_timeout_s: float = 10.0
    stats_file: Path | None = None  # where to write stage timings (JSON) after success

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.scale is not None and not 0 < self.scale <= 16:
            raise ValueError(f"--scale must be above 0 and at most 16, not {self.scale:g}")
        if self.local_workers is not None and self.local_workers < 1:
            raise ValueError(f"--local-workers must be at least 1, not {self.local_workers}")
        if self.workers and self.local_workers is not None:
            raise ValueError("give either --workers or --local-workers, not both")
        if self.workers and self.shared_root is None:
            raise ValueError(
                "--workers needs --shared-root (or ESRFARM_SHARED_ROOT): the directory those workers "
                "were started with, as this machine sees it"
            )
        if not 0 <= self.png_compression <= 9:
            raise ValueError(f"PNG compression must be 0 to 9, not {self.png_compression}")
        if self.max_disk < 1 or self.max_chunk_frames < 1:
            raise ValueError("--max-disk and --chunk-frames must be above 0")
        if self.encoders is not None and self.encoders < 1:
            raise ValueError(f"--encoders must be at least 1, not {self.encoders}")
        if self.tile is not None and self.tile < 0:
            raise ValueError(f"--tile must be 0 or more, not {self.tile}")


@dataclass(frozen=True)
class JobProgress:
    stage: str  # "extract" | "upscale" | "join"
    done: int
    total: int
    fps: float
    eta_s: float | None


ProgressCallback = Callable[[JobProgress], None]


def default_shared_root() -> Path:
    env = os.environ.get("ESRFARM_SHARED_ROOT")
    if env:
        return Path(env)
    import tempfile

    return Path(tempfile.gettempdir()) / f"esrfarm-{os.getuid()}"


def output_size(info: MediaInfo, scale: float | None) -> tuple[int, int] | None:
    """(width, height) of the upscaled frames, or None while the scale is not known."""
    if scale is None:
        return None
    return round(info.video.width * scale), round(info.video.height * scale)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def job_identity(settings: UpscaleSettings) -> dict[str, object]:
    """What determines the upscaled frames: a changed value means another job."""
    model_path = Path(settings.model)
    model = {"file_sha256": file_sha256(model_path)} if model_path.is_file() else {"name": settings.model}
    return {
        "input_sha256": file_sha256(settings.input),
        "model": model,
        "scale": settings.scale,
        "tile": settings.tile,
        "precision": settings.precision,
    }


def job_id_for(input_path: Path, identity: dict[str, object]) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in input_path.stem)[:40] or "job"
    digest = hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{stem}-{digest[:16]}"


@dataclass
class _Worker:
    """The coordinator's view of one worker."""

    url: str
    client: WorkerClient
    worker_id: str = ""
    alive: bool = True
    unreachable_since: float | None = None  # monotonic time of the first failed health check in a row
    last_change: float = 0.0  # monotonic time the status of its open manifest last changed
    last_status: bytes = b""


class _DiskBudget:
    """Bytes of frame data admitted to disk; extraction waits here for room."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.closed = False
        self._cond = threading.Condition()

    def acquire(self, cost: int, *, wait: bool = True) -> None:
        with self._cond:
            while wait and self.used and self.used + cost > self.limit and not self.closed:
                self._cond.wait()
            if self.closed:
                raise _Stopped
            self.used += cost
            self.peak = max(self.peak, self.used)

    def release(self, cost: int) -> None:
        with self._cond:
            self.used -= cost
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _Stopped(Exception):
    """Extraction was told to stop (the job is failing)."""


@dataclass
class _ChunkState:
    chunk: Chunk
    batches: tuple[Batch, ...]
    done_on_disk: set[int] = field(default_factory=set)  # batch ids whose outputs were found
    extract: bool = False  # its input frames must be extracted
    extracted: bool = False
    frames_extracted: dict[int, int] = field(default_factory=dict)  # batch id -> frames on disk
    added: set[int] = field(default_factory=set)  # batch ids handed to the ledger
    dispatched: bool = False  # all its batches are in the ledger
    upscaled: bool = False
    encoding: concurrent.futures.Future[Path] | None = None
    encoded: bool = False
    holds_input: int = 0  # bytes of the disk budget it holds
    holds_output: int = 0


async def run_upscale(settings: UpscaleSettings, on_progress: ProgressCallback | None = None) -> MediaInfo:
    """Upscale ``settings.input`` into ``settings.output``. Raises :class:`JobError` or a media error."""
    begun = time.monotonic()
    check_output_path(settings.input, settings.output, settings.overwrite)
    info = probe(settings.input)
    check_encode(
        info,
        settings.output,
        settings.encode,
        overwrite=settings.overwrite,
        size=output_size(info, settings.scale),
    )
    shared_root = (settings.shared_root or default_shared_root()).resolve()
    shared_root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    identity = await asyncio.to_thread(job_identity, settings)
    log.info("hashed the input in %.1f s", time.monotonic() - started)
    layout = JobLayout(shared_root, job_id_for(settings.input, identity))
    with _job_lock(layout):
        run = _open_job_dir(layout, identity, settings, info)
        job = _Job(settings, info, layout, run, on_progress or (lambda _: None))
        try:
            await job.run()
        except BaseException as exc:
            if isinstance(exc, JobError):
                raise JobError(exc.message, layout.job_dir) from exc.__cause__
            if isinstance(exc, Exception):
                log.error("job %s failed; its files are kept in %s", layout.job_id, layout.job_dir)
            raise
        if not settings.keep_frames:
            shutil.rmtree(layout.job_dir, ignore_errors=True)
        else:
            log.info("frames kept in %s", layout.job_dir)
    job.stats["total_s"] = time.monotonic() - begun
    if settings.stats_file is not None:
        stats = {key: round(value, 3) for key, value in job.stats.items()}
        try:
            write_json_atomic(settings.stats_file, orjson.dumps({"frames": info.frame_count, **stats}))
        except OSError as exc:  # the video is written; a stats file that cannot be is only a warning
            log.warning("could not write the stats file %s: %s", settings.stats_file, exc)
    return info


@contextlib.contextmanager
def _job_lock(layout: JobLayout) -> Iterator[None]:
    """One coordinator per job: a second one started with the same command is refused."""
    lock_path = layout.shared_root / "jobs" / f".{layout.job_id}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise JobError(f"job {layout.job_id} is being run by {holder} right now") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"esrfarm pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _open_job_dir(
    layout: JobLayout, identity: dict[str, object], settings: UpscaleSettings, info: MediaInfo
) -> int:
    """Create the job directory, or take up the one a stopped run left. Returns this run's number."""
    runs = 0
    if layout.job_file.is_file():
        try:
            previous = orjson.loads(layout.job_file.read_bytes())
            if previous.get("format") == JOB_FORMAT and previous.get("identity") == identity:
                runs = int(previous.get("runs", 0))
        except (ValueError, OSError):
            pass
        if runs:
            log.info("resuming job %s (run %d) from %s", layout.job_id, runs + 1, layout.job_dir)
        else:
            log.warning("job directory %s is not readable as this job's; starting it afresh", layout.job_dir)
            shutil.rmtree(layout.job_dir, ignore_errors=True)
    layout.create()
    write_json_atomic(
        layout.job_file,
        orjson.dumps(
            {
                "format": JOB_FORMAT,
                "identity": identity,
                "input": str(settings.input.resolve()),
                "output": str(settings.output.resolve()),
                "frames": info.frame_count,
                "runs": runs + 1,
                "updated_at": time.time(),
            }
        ),
    )
    return runs + 1


class _Job:
    def __init__(
        self,
        settings: UpscaleSettings,
        info: MediaInfo,
        layout: JobLayout,
        run: int,
        on_progress: ProgressCallback,
    ) -> None:
        self.settings = settings
        self.info = info
        self.layout = layout
        self.run_number = run
        self.on_progress = on_progress
        self.workers: dict[str, _Worker] = {}
        self.pool: LocalWorkerPool | None = None
        self.manifest_count = 0
        self.scale = settings.scale
        self.ledger = JobLedger.for_batches([])
        self.plan: ChunkPlan | None = None
        self.states: list[_ChunkState] = []
        # Stage timings in seconds, for --stats: wall times of the stages, summed encoder time,
        # and idle worker-seconds (a live worker without work while the job was not done).
        self.stats: dict[str, float] = {"segment_encode_s": 0.0, "worker_idle_s": 0.0}
        self._stats_lock = threading.Lock()
        self.budget = _DiskBudget(float("inf"))
        self.frames_before = 0  # frames in segments finished by earlier runs
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.monotonic()

    async def run(self) -> None:
        settings = self.settings
        self.loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        encoders = settings.encoders or max(1, min(4, (os.cpu_count() or 1) // 4))
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=encoders, thread_name_prefix="segment")
        try:
            async with aiohttp.ClientSession() as session:
                start = asyncio.create_task(self._start_workers())
                extraction: asyncio.Task[None] | None = None
                try:
                    if self.scale is not None:  # else the workers tell the scale first
                        self._plan()
                        extraction = asyncio.create_task(asyncio.to_thread(self._extract))
                    urls = await start
                    self.stats["workers_started_s"] = time.monotonic() - self.started
                    for url in urls:
                        client = WorkerClient(url, session, settings.token, settings.request_timeout_s)
                        self.workers[url] = _Worker(url, client)
                    await self._wait_healthy()
                    self.stats["workers_ready_s"] = time.monotonic() - self.started
                    if extraction is None:
                        self._plan()
                        extraction = asyncio.create_task(asyncio.to_thread(self._extract))
                    await self._pipeline(extraction, executor)
                    await extraction
                finally:
                    self.budget.close()
                    start.cancel()
                    if extraction is not None and not extraction.done():
                        await asyncio.gather(extraction, return_exceptions=True)
                    if self.pool is not None:
                        await self.pool.stop()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        await asyncio.to_thread(self._join)

    # -- planning ---------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Chunks, budget, and what a previous run already did (files are the truth)."""
        settings, info = self.settings, self.info
        assert self.scale is not None
        width, height = info.video.width, info.video.height
        out_w, out_h = round(width * self.scale), round(height * self.scale)
        try:
            plan = plan_chunks(
                info.frame_count,
                batch_size=settings.batch_size,
                input_frame_bytes=frame_file_bytes(width, height, settings.frame_format),
                output_frame_bytes=frame_file_bytes(out_w, out_h, settings.frame_format),
                max_disk=settings.max_disk,
                max_chunk_frames=settings.max_chunk_frames,
            )
        except PlanningError as exc:
            raise JobError(f"cannot start: {exc}") from exc
        self.plan = plan
        # Kept output frames stay on disk: the budget then cannot hold, and is not enforced.
        self.budget = _DiskBudget(float("inf") if settings.keep_frames else settings.max_disk)
        self._check_segments_key(plan)
        batches = plan_batches(info.frame_count, settings.batch_size, ["all"]).batches
        by_chunk: dict[int, list[Batch]] = {}
        for batch in batches:
            by_chunk.setdefault(plan.chunk_of(batch.frames[0]).index, []).append(batch)
        for chunk in plan.chunks:
            state = _ChunkState(chunk, tuple(by_chunk[chunk.index]))
            self.states.append(state)
            if segment_is_complete(self._segment_path(chunk), chunk.count):
                state.encoded = True
                self.frames_before += chunk.count
                self._remove_frames(chunk, self.layout.input_dir)
                if not settings.keep_frames:
                    self._remove_frames(chunk, self.layout.output_dir)
                continue
            state.done_on_disk = {b.id for b in state.batches if self._outputs_exist(b)}
            if len(state.done_on_disk) == len(state.batches):
                state.extracted = True  # nothing to extract; straight to the ledger, then encoding
                state.holds_output = plan.output_cost(chunk)
                self.budget.acquire(state.holds_output, wait=False)
            else:
                state.extract = True
        done = sum(1 for s in self.states if s.encoded)
        if self.run_number > 1:
            log.info(
                "resuming: %d of %d segments done, %d more chunks upscaled",
                done,
                len(plan.chunks),
                sum(1 for s in self.states if not s.encoded and not s.extract),
            )
        log.info(
            "%d frames in %d chunk(s) of up to %d frames; frame data kept under %s",
            info.frame_count,
            len(plan.chunks),
            plan.chunk_frames,
            format_size(settings.max_disk),
        )

    def _check_segments_key(self, plan: ChunkPlan) -> None:
        """Segments of an earlier run count only if cut and encoded the same way."""
        key = orjson.dumps({"encode": asdict(self.settings.encode), "chunk_frames": plan.chunk_frames})
        key_file = self.layout.segments_dir / "segments.json"
        if key_file.is_file() and key_file.read_bytes() != key:
            log.info("encoder settings or chunking changed: the earlier segments are encoded again")
            for segment in self.layout.segments_dir.glob(f"*{SEGMENT_SUFFIX}"):
                segment.unlink()
        write_json_atomic(key_file, key)

    def _segment_path(self, chunk: Chunk) -> Path:
        return self.layout.segments_dir / f"{chunk.index:06d}{SEGMENT_SUFFIX}"

    def _frame_path(self, directory: Path, frame: int) -> Path:
        return directory / frame_filename(frame, self.settings.frame_format)

    def _outputs_exist(self, batch: Batch) -> bool:
        return all(self._frame_path(self.layout.output_dir, f).is_file() for f in batch.frames)

    def _remove_frames(self, chunk: Chunk, directory: Path) -> None:
        for frame in chunk.frames:
            self._frame_path(directory, frame).unlink(missing_ok=True)

    # -- stages -----------------------------------------------------------------------------------

    async def _start_workers(self) -> list[str]:
        settings = self.settings
        if settings.workers:
            return list(settings.workers)
        gpus = visible_gpu_count()
        count = settings.local_workers or max(gpus, 1)
        args = ["--shared-root", str(self.layout.shared_root), "--model", settings.model]
        if settings.scale is not None:
            args += ["--scale", f"{settings.scale:g}"]
        if settings.tile is not None:
            args += ["--tile", str(settings.tile)]
        if settings.precision is not None:
            args += ["--precision", settings.precision]
        self.pool = LocalWorkerPool(self.layout.job_dir / "workers", [*args, *settings.local_worker_args])
        return await self.pool.start(count, gpus, settings.startup_timeout_s)

    def _extract(self) -> None:
        """Runs in a thread: decodes the input once, writing the frames of chunks that need them."""
        plan, loop = self.plan, self.loop
        assert plan is not None and loop is not None
        if not any(state.extract for state in self.states):
            return
        started = time.monotonic()
        total = self.info.frame_count

        def gate(index: int) -> bool:
            state = self.states[plan.chunk_of(index).index]
            if not state.extract:
                return False
            if index == state.chunk.first:
                cost = plan.input_cost(state.chunk) + plan.output_cost(state.chunk)
                self.budget.acquire(cost)  # waits for room
                state.holds_input, state.holds_output = (
                    plan.input_cost(state.chunk),
                    plan.output_cost(state.chunk),
                )
            batch = state.batches[(index - state.chunk.first) // self.settings.batch_size]
            return batch.id not in state.done_on_disk

        def on_frame(index: int) -> None:
            loop.call_soon_threadsafe(self._frame_extracted, index)

        try:
            extract_frames(
                self.info,
                self.layout.input_dir,
                frame_format=self.settings.frame_format,
                png_compression=self.settings.png_compression,
                gate=gate,
                on_frame=on_frame,
            )
        except _Stopped:
            return
        self.stats["extract_s"] = time.monotonic() - started
        log.info("extracted %d frames in %.1f s", total, time.monotonic() - started)

    def _frame_extracted(self, index: int) -> None:
        """On the loop: frame ``index`` is on disk (or was not needed). A batch whose frames are all
        there goes to the ledger at once, so workers start before the whole chunk is extracted."""
        assert self.plan is not None
        state = self.states[self.plan.chunk_of(index).index]
        if not state.extract:  # encoded or upscaled by an earlier run: its frames were skipped
            return
        batch = state.batches[(index - state.chunk.first) // self.settings.batch_size]
        done = state.frames_extracted.get(batch.id, 0) + 1
        state.frames_extracted[batch.id] = done
        if done == len(batch):
            self._add_batches(state, [batch])

    def _add_batches(self, state: _ChunkState, batches: list[Batch]) -> None:
        self.ledger.add(batches, done=[b.id for b in batches if b.id in state.done_on_disk])
        state.added.update(b.id for b in batches)
        if len(state.added) == len(state.batches):
            state.extracted = state.dispatched = True
            state.added.clear()  # per-batch bookkeeping is done: a long job must not keep it
            state.frames_extracted.clear()

    async def _wait_healthy(self) -> None:
        """Keep the workers that answer /health with the right model; fail if none does.

        A worker still loading its model (503), or one started here, gets ``startup_timeout_s``;
        a remote one that does not answer at all gets ``unreachable_after_s``.
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        problems: dict[str, str] = {}
        answered: set[str] = set()
        pending = set(self.workers)
        while pending:
            for url in sorted(pending):
                worker = self.workers[url]
                try:
                    health = await worker.client.health()
                except WorkerRequestError as exc:
                    problems[url] = str(exc)
                    if exc.status is not None:
                        answered.add(url)
                    gone = self.pool.exit_reason(url) if self.pool is not None else None
                    local = self.pool is not None
                    patience = (
                        settings.startup_timeout_s
                        if local or url in answered
                        else settings.unreachable_after_s
                    )
                    if gone is not None:
                        problems[url] = gone
                        pending.discard(url)
                    elif loop.time() - started > patience:
                        pending.discard(url)
                    continue
                pending.discard(url)
                problems.pop(url, None)
                model = health.get("model")
                if model not in {settings.model, Path(settings.model).stem}:
                    problems[url] = f"worker {url} runs model {model!r}, not {settings.model!r}"
                    continue
                if self.scale is None:  # every manifest names the scale, so all workers match it
                    self.scale = float(health["scale"])
                worker.worker_id = str(health.get("worker_id") or url)
            if pending:
                await asyncio.sleep(settings.poll_interval_s)
        ready = [w for w in self.workers.values() if w.worker_id]
        for url, problem in problems.items():
            log.warning("not using worker %s: %s", url, problem)
            self.workers[url].alive = False
        if not ready:
            detail = "; ".join(problems.values()) or "none answered"
            raise JobError(f"no healthy worker to upscale with: {detail}")
        if settings.scale is None:
            size = output_size(self.info, self.scale)
            check_encode(self.info, settings.output, settings.encode, overwrite=settings.overwrite, size=size)
        log.info("upscaling with %d worker(s): %s", len(ready), ", ".join(w.worker_id for w in ready))

    async def _pipeline(
        self,
        extraction: asyncio.Task[None],
        executor: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        settings, ledger = self.settings, self.ledger
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_health = loop.time() + settings.health_interval_s
        health: asyncio.Task[None] | None = None  # runs beside the loop: a hung host must not stall it
        last = loop.time()
        try:
            while True:
                now = loop.time()
                idle = sum(1 for w in self._alive() if not ledger.open_manifests(w.url))
                self.stats["worker_idle_s"] += idle * (now - last)
                last = now
                if extraction.done() and extraction.exception() is not None:
                    extraction.result()  # raises the extraction error
                for state in self.states:
                    if state.extracted and not state.dispatched and not state.encoded:
                        self._add_batches(state, list(state.batches))  # found upscaled on disk
                for manifest_id in ledger.open_manifests():
                    self._read_status(manifest_id, now)
                self._check_workers(now)
                if now >= next_health and (health is None or health.done()):
                    health = asyncio.create_task(self._health_round())
                    next_health = now + settings.health_interval_s
                self._collect_upscaled_chunks(executor)
                self._collect_segments()
                if all(state.encoded for state in self.states):
                    break
                failure = ledger.failure([w.url for w in self._alive()])
                if failure is not None:
                    raise JobError(f"upscaling failed: {failure}")
                await self._deal()
                elapsed = loop.time() - started
                done = ledger.frames_done
                fps = done / elapsed if elapsed > 0 else 0.0
                remaining = self.info.frame_count - self.frames_before - done
                eta = remaining / fps if fps else None
                self.on_progress(
                    JobProgress("upscale", self.frames_before + done, self.info.frame_count, fps, eta)
                )
                await asyncio.sleep(settings.poll_interval_s)
        finally:
            if health is not None:
                health.cancel()
        elapsed = loop.time() - started
        log.info(
            "upscaled and encoded %d frames in %.1f s (%.2f fps); frame data admitted at most %s",
            ledger.frames_done,
            elapsed,
            ledger.frames_done / elapsed if elapsed > 0 else 0.0,
            format_size(self.budget.peak),
        )

    async def _deal(self) -> None:
        ledger = self.ledger
        alive = self._alive()
        idle = [w.url for w in alive if not ledger.open_manifests(w.url)]
        pending = len(ledger.pending())
        if not idle or not pending:
            return
        share = -(
            -pending // max(1, len(alive))
        )  # each worker its share; the rest waits for the next idle one
        for url, batches in ledger.deal(idle, limit=share * len(idle)).items():
            await self._dispatch(self.workers[url], batches[:share])

    def _collect_upscaled_chunks(self, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        """A chunk whose batches are all done (and on disk) frees its input and goes to an encoder."""
        assert self.plan is not None
        for state in self.states:
            if not state.dispatched or state.upscaled or state.encoded:
                continue
            if not all(b.id in self.ledger.done for b in state.batches):
                continue
            missing = [b for b in state.batches if not self._outputs_exist(b)]
            for batch in missing:
                worker = self.ledger.done_by.get(batch.id, "")
                self.ledger.record_failure(
                    worker, batch.id, "its output frames are missing although it was done"
                )
            if missing:
                continue
            state.upscaled = True
            self._remove_frames(state.chunk, self.layout.input_dir)
            self.budget.release(state.holds_input)
            state.holds_input = 0
            state.encoding = executor.submit(
                self._encode_segment,
                self.info,
                self.layout.output_dir,
                state.chunk.first,
                state.chunk.count,
                self._segment_path(state.chunk),
                settings=self.settings.encode,
                frame_format=self.settings.frame_format,
            )

    def _encode_segment(self, *args: Any, **kwargs: Any) -> Path:
        started = time.monotonic()
        try:
            return encode_segment(*args, **kwargs)
        finally:
            # The segment's frame arrays and buffers are freed: hand the pages back, so that heap
            # fragmentation cannot raise the RSS step by step over a long job (coordinator.memory).
            release_free_memory()
            with self._stats_lock:
                self.stats["segment_encode_s"] += time.monotonic() - started

    def _collect_segments(self) -> None:
        for state in self.states:
            if state.encoding is None or not state.encoding.done():
                continue
            state.encoding.result()  # raises the encoder's error: the job fails, the frames stay
            state.encoding = None
            state.encoded = True
            self.ledger.forget(b.id for b in state.batches)
            state.batches = ()
            if not self.settings.keep_frames:
                self._remove_frames(state.chunk, self.layout.output_dir)
            self.budget.release(state.holds_output)
            state.holds_output = 0
            log.info(
                "segment %d (frames %d-%d) encoded", state.chunk.index, state.chunk.first, state.chunk.last
            )

    def _join(self) -> None:
        assert self.plan is not None
        count = self.info.frame_count
        self.on_progress(JobProgress("join", 0, count, 0.0, None))
        started = time.monotonic()
        self.stats["pipeline_done_s"] = started - self.started
        join_segments(
            self.info,
            [self._segment_path(chunk) for chunk in self.plan.chunks],
            self.settings.output,
            settings=self.settings.encode,
            overwrite=self.settings.overwrite,
        )
        self.stats["join_s"] = time.monotonic() - started
        log.info(
            "joined %d segment(s) into %s in %.1f s",
            len(self.plan.chunks),
            self.settings.output,
            time.monotonic() - started,
        )
        self.on_progress(JobProgress("join", count, count, 0.0, 0.0))

    # -- workers ----------------------------------------------------------------------------------

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.alive and w.worker_id]

    def _manifest(self, manifest_id: str, worker: _Worker, batches: tuple[Batch, ...]) -> Manifest:
        return Manifest(
            job_id=self.layout.job_id,
            manifest_id=manifest_id,
            worker_id=worker.worker_id,
            model=self.settings.model,
            batches=batches,
            scale=self.scale,
            tile=self.settings.tile,
            frame_format=self.settings.frame_format,
            png_compression=self.settings.png_compression,
        )

    async def _dispatch(self, worker: _Worker, batches: tuple[Batch, ...]) -> None:
        if not batches:
            return
        ledger = self.ledger
        self.manifest_count += 1
        manifest_id = f"r{self.run_number:02d}-m{self.manifest_count:05d}"
        manifest = self._manifest(manifest_id, worker, batches)
        path = self.layout.manifest_path(manifest_id)
        write_json_atomic(path, manifest.to_json())
        ledger.assign(manifest_id, worker.url, batches)
        try:
            await worker.client.process_manifest(str(path.relative_to(self.layout.shared_root)))
        except WorkerBusyError:
            log.info("worker %s is busy; %s waits for the next round", worker.url, manifest_id)
            ledger.release(manifest_id)
            return
        except WorkerRequestError as exc:
            self._lose(worker, f"refused {manifest_id}: {exc}")
            return
        worker.last_change = asyncio.get_running_loop().time()
        worker.last_status = b""
        log.debug(
            "dispatched %s (batches %s) to %s",
            manifest_id,
            ",".join(str(b.id) for b in batches),
            worker.worker_id,
        )

    def _read_status(self, manifest_id: str, now: float) -> None:
        worker = self.workers[self.ledger.manifests[manifest_id]]
        path = self.layout.status_path(manifest_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        if raw == worker.last_status:
            return
        try:
            status = Status.from_json(raw, source=path)
        except DocumentError as exc:
            log.warning("ignoring unreadable status file: %s", exc)
            return
        worker.last_status = raw
        worker.last_change = now
        self.ledger.record_status(status)
        for error in status.errors:
            log.warning("worker %s: %s", worker.worker_id, error)

    def _check_workers(self, now: float) -> None:
        settings = self.settings
        exited = self.pool.exited() if self.pool is not None else {}
        for worker in self._alive():
            if worker.url in exited:
                self._lose(worker, f"its process exited with code {exited[worker.url]}")
            elif (
                worker.unreachable_since is not None
                and now - worker.unreachable_since > settings.unreachable_after_s
            ):
                self._lose(worker, f"/health unreachable for {now - worker.unreachable_since:.0f} s")
            elif self.ledger.open_manifests(worker.url) and now - worker.last_change > settings.stale_after_s:
                self._lose(worker, f"its status file did not change for {now - worker.last_change:.0f} s")

    async def _health_round(self) -> None:
        loop = asyncio.get_running_loop()
        workers = self._alive()
        results = await asyncio.gather(*(w.client.health() for w in workers), return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if not isinstance(result, BaseException):
                worker.unreachable_since = None
            elif worker.unreachable_since is None:
                log.warning("health check of %s failed: %s", worker.worker_id, result)
                worker.unreachable_since = loop.time()

    def _lose(self, worker: _Worker, reason: str) -> None:
        worker.alive = False
        returned = self.ledger.release_worker(worker.url)
        log.error(
            "lost worker %s: %s; %d batch(es) go to the others",
            worker.worker_id or worker.url,
            reason,
            len(returned),
        )
