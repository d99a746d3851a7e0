"""One upscaling job, end to end: probe, extract, dispatch, watch, reassign, encode.

The coordinator trusts files, not promises: a batch is done when a status file claims it and its
output frames are on disk. A worker that fails or vanishes (process gone, ``/health`` unreachable
for ``unreachable_after_s``, status file unchanged for ``stale_after_s``) loses its batches to the
others. The job fails when no worker is left, or when one batch has failed on two workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from coordinator.client import WorkerBusyError, WorkerClient, WorkerRequestError
from coordinator.encode import EncodeSettings, check_encode, encode_video
from coordinator.extract import extract_frames
from coordinator.local_workers import LocalWorkerPool, visible_gpu_count
from coordinator.probe import MediaInfo, check_output_path, probe
from manifests.errors import DocumentError
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout, frame_filename
from manifests.ledger import JobLedger
from manifests.manifest import Batch, Manifest
from manifests.planner import plan_batches
from manifests.status import Status

log = logging.getLogger(__name__)

DEFAULT_MODEL = "realesr-animevideov3"


class JobError(Exception):
    """The job could not be done. ``job_dir`` is where its files were kept, if anywhere."""

    def __init__(self, message: str, job_dir: Path | None = None) -> None:
        self.message, self.job_dir = message, job_dir
        kept = f" (its files are kept in {job_dir})" if job_dir else ""
        super().__init__(f"{message}{kept}")


@dataclass(frozen=True)
class UpscaleSettings:
    """Everything one ``esrfarm upscale`` needs; every timeout is a setting so tests can shrink it."""

    input: Path
    output: Path
    scale: float | None = None  # None: the model's own
    model: str = DEFAULT_MODEL
    workers: tuple[str, ...] = ()  # worker URLs; empty: start local workers
    local_workers: int | None = None  # None: one per visible GPU, or one on the CPU
    local_worker_args: tuple[str, ...] = ()  # extra flags for local workers (e.g. --cpu-threads 1)
    shared_root: Path | None = None
    batch_size: int = 8
    frame_format: FrameFormat = FrameFormat.PNG
    png_compression: int = 1
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    overwrite: bool = False
    keep_frames: bool = False
    token: str | None = field(default=None, repr=False)
    poll_interval_s: float = 0.25
    health_interval_s: float = 2.0
    startup_timeout_s: float = 600.0  # local workers: model load and warm-up
    unreachable_after_s: float = 30.0
    stale_after_s: float = 600.0
    request_timeout_s: float = 10.0

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


@dataclass(frozen=True)
class JobProgress:
    stage: str  # "extract" | "upscale" | "encode"
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


def new_job_id(input_path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in input_path.stem)[:40] or "job"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


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


async def run_upscale(settings: UpscaleSettings, on_progress: ProgressCallback | None = None) -> MediaInfo:
    """Upscale ``settings.input`` into ``settings.output``. Raises :class:`JobError` or a media error."""
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
    layout = JobLayout(shared_root, new_job_id(settings.input))
    layout.create()
    write_json_atomic(
        layout.job_file,
        orjson.dumps(
            {
                "format": "esrfarm.job/1",
                "input": str(settings.input.resolve()),
                "output": str(settings.output.resolve()),
                "model": settings.model,
                "scale": settings.scale,
                "frames": info.frame_count,
                "created_at": time.time(),
            }
        ),
    )
    log.info("job %s: %s, %d frames, in %s", layout.job_id, settings.input, info.frame_count, layout.job_dir)
    job = _Job(settings, info, layout, on_progress or (lambda _: None))
    try:
        await job.run()
    except BaseException as exc:
        if isinstance(exc, JobError):
            raise JobError(exc.message, layout.job_dir) from exc.__cause__
        if isinstance(exc, Exception) and not isinstance(exc, asyncio.CancelledError):
            log.error("job %s failed; its files are kept in %s", layout.job_id, layout.job_dir)
        raise
    if not settings.keep_frames:
        shutil.rmtree(layout.job_dir, ignore_errors=True)
    else:
        log.info("frames kept in %s", layout.job_dir)
    return info


class _Job:
    def __init__(
        self, settings: UpscaleSettings, info: MediaInfo, layout: JobLayout, on_progress: ProgressCallback
    ) -> None:
        self.settings = settings
        self.info = info
        self.layout = layout
        self.on_progress = on_progress
        self.workers: dict[str, _Worker] = {}
        self.pool: LocalWorkerPool | None = None
        self.manifest_count = 0
        self.scale = settings.scale

    async def run(self) -> None:
        settings = self.settings
        async with aiohttp.ClientSession() as session:
            try:
                start = asyncio.create_task(self._start_workers())
                try:
                    await asyncio.to_thread(self._extract)
                    urls = await start
                except BaseException:
                    start.cancel()
                    raise
                for url in urls:
                    client = WorkerClient(url, session, settings.token, settings.request_timeout_s)
                    self.workers[url] = _Worker(url, client)
                await self._wait_healthy()
                await self._upscale()
            finally:
                if self.pool is not None:
                    await self.pool.stop()
        self._encode()

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
        self.pool = LocalWorkerPool(self.layout.job_dir / "workers", [*args, *settings.local_worker_args])
        return await self.pool.start(count, gpus, settings.startup_timeout_s)

    def _extract(self) -> None:
        started = time.monotonic()
        total = self.info.frame_count

        def report(done: int) -> None:
            elapsed = time.monotonic() - started
            fps = done / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / fps if fps > 0 else None
            self.on_progress(JobProgress("extract", done, total, fps, eta))

        count = extract_frames(
            self.info,
            self.layout.input_dir,
            frame_format=self.settings.frame_format,
            png_compression=self.settings.png_compression,
            progress=report,
        )
        if count != total:
            raise JobError(f"extracted {count} frames from {self.settings.input}, but it has {total}")
        log.info("extracted %d frames in %.1f s", count, time.monotonic() - started)

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

    async def _upscale(self) -> None:
        settings = self.settings
        alive = self._alive()
        plan = plan_batches(self.info.frame_count, settings.batch_size, [w.url for w in alive])
        ledger = JobLedger.for_batches(plan.batches)
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_health = loop.time() + settings.health_interval_s
        health: asyncio.Task[None] | None = None  # runs beside the loop: a hung host must not stall it
        for worker in alive:
            await self._dispatch(ledger, worker, plan.for_worker(worker.url))
        try:
            while True:
                now = loop.time()
                for manifest_id in ledger.open_manifests():
                    self._read_status(ledger, manifest_id, now)
                self._check_workers(ledger, now)
                if now >= next_health and (health is None or health.done()):
                    health = asyncio.create_task(self._health_round())
                    next_health = now + settings.health_interval_s
                if ledger.complete:
                    missing = self._missing_outputs(ledger)
                    if not missing:
                        break
                    for batch_id, (worker_url, reason) in missing.items():
                        ledger.record_failure(worker_url, batch_id, reason)
                failure = ledger.failure([w.url for w in self._alive()])
                if failure is not None:
                    raise JobError(f"upscaling failed: {failure}")
                for url, batches in ledger.deal(
                    [w.url for w in self._alive() if not ledger.open_manifests(w.url)]
                ).items():
                    await self._dispatch(ledger, self.workers[url], batches)
                elapsed = loop.time() - started
                fps = ledger.frames_done / elapsed if elapsed > 0 else 0.0
                remaining = ledger.frames_total - ledger.frames_done
                self.on_progress(
                    JobProgress(
                        "upscale",
                        ledger.frames_done,
                        ledger.frames_total,
                        fps,
                        remaining / fps if fps else None,
                    )
                )
                await asyncio.sleep(settings.poll_interval_s)
        finally:
            if health is not None:
                health.cancel()
        elapsed = loop.time() - started
        log.info(
            "upscaled %d frames in %.1f s (%.2f fps)",
            ledger.frames_total,
            elapsed,
            ledger.frames_total / elapsed,
        )

    def _encode(self) -> None:
        started = time.monotonic()
        self.on_progress(JobProgress("encode", 0, self.info.frame_count, 0.0, None))
        encode_video(
            self.info,
            self.layout.output_dir,
            self.settings.output,
            frame_format=self.settings.frame_format,
            settings=self.settings.encode,
            overwrite=self.settings.overwrite,
        )
        log.info("encoded %s in %.1f s", self.settings.output, time.monotonic() - started)
        self.on_progress(JobProgress("encode", self.info.frame_count, self.info.frame_count, 0.0, 0.0))

    # -- helpers ----------------------------------------------------------------------------------

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
            frame_format=self.settings.frame_format,
            png_compression=self.settings.png_compression,
        )

    async def _dispatch(self, ledger: JobLedger, worker: _Worker, batches: tuple[Batch, ...]) -> None:
        if not batches:
            return
        self.manifest_count += 1
        manifest_id = f"m{self.manifest_count:04d}"
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
            self._lose(ledger, worker, f"refused {manifest_id}: {exc}")
            return
        worker.last_change = asyncio.get_running_loop().time()
        worker.last_status = b""
        log.info(
            "dispatched %s (batches %s) to %s",
            manifest_id,
            ",".join(str(b.id) for b in batches),
            worker.worker_id,
        )

    def _read_status(self, ledger: JobLedger, manifest_id: str, now: float) -> None:
        worker = self.workers[ledger.manifests[manifest_id]]
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
        for batch_id in ledger.record_status(status):
            log.debug("batch %d done by %s", batch_id, worker.worker_id)
        for error in status.errors:
            log.warning("worker %s: %s", worker.worker_id, error)

    def _check_workers(self, ledger: JobLedger, now: float) -> None:
        settings = self.settings
        exited = self.pool.exited() if self.pool is not None else {}
        for worker in self._alive():
            if worker.url in exited:
                self._lose(ledger, worker, f"its process exited with code {exited[worker.url]}")
            elif (
                worker.unreachable_since is not None
                and now - worker.unreachable_since > settings.unreachable_after_s
            ):
                self._lose(ledger, worker, f"/health unreachable for {now - worker.unreachable_since:.0f} s")
            elif ledger.open_manifests(worker.url) and now - worker.last_change > settings.stale_after_s:
                self._lose(
                    ledger, worker, f"its status file did not change for {now - worker.last_change:.0f} s"
                )

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

    def _lose(self, ledger: JobLedger, worker: _Worker, reason: str) -> None:
        worker.alive = False
        returned = ledger.release_worker(worker.url)
        log.error(
            "lost worker %s: %s; %d batch(es) go to the others",
            worker.worker_id or worker.url,
            reason,
            len(returned),
        )

    def _missing_outputs(self, ledger: JobLedger) -> dict[int, tuple[str, str]]:
        """Batches claimed done whose output frames are not all on disk: the files are the truth."""
        missing: dict[int, tuple[str, str]] = {}
        output_dir = self.layout.output_dir
        for batch_id, batch in ledger.batches.items():
            for frame in batch.frames:
                name = frame_filename(frame, self.settings.frame_format)
                if not (output_dir / name).is_file():
                    claimed_by = ledger.done_by.get(batch_id, "")
                    missing[batch_id] = (
                        claimed_by,
                        f"output frame {name} is missing although the batch was done",
                    )
                    break
        return missing
