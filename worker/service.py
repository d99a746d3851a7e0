"""The worker's HTTP service: one process, one model, one device, one manifest at a time.

Endpoints (all JSON except /metrics)::

    GET  /health            200 once the model is loaded and warm, 503 before (or if loading failed);
                            ``storage_writable`` false (and ``storage_error``) while the shared root
                            cannot be written
    GET  /status            the status of the current or last manifest (as its status file has it, or
                            would, when the file cannot be written: its message then says why)
    POST /process_manifest  {"manifest_path": "jobs/<id>/manifests/w0.json"}: 202 started, 409 busy,
                            400 bad manifest, 403 path outside the shared root, 503 model not ready or
                            shared root not writable (with ``Retry-After``)
    POST /reset             stop the running manifest at the next batch boundary; 200 when it has stopped
    GET  /metrics           Prometheus text

Every endpoint but /health is behind the HTTP guard the job service uses too
(:mod:`manifests.httpguard`, installed by :mod:`worker.httpguard`): bound to a non-loopback address
it wants ``Authorization: Bearer <token>``; without a token it answers only to a loopback ``Host``
(403: DNS rebinding); the POST endpoints refuse any ``Origin`` but the worker's own and want
``Content-Type: application/json`` (415 otherwise, which a browser cannot send cross-site without a
preflight the worker never grants); a body over ``max_request_bytes`` gets 413.

The worker is not held by its clients: a connection must complete its request headers within
``header_timeout_s`` of opening or of its previous answer (aiohttp's keep-alive timer, which runs
from the connection's start), a body must arrive within ``body_timeout_s``, and at most
``max_connections`` are open (fewer when the descriptor limit is lower): a new one beyond that
closes the oldest connection with no request in progress (:class:`ConnectionGuard`), so
``/health`` stays answerable under any number of slow clients.

A worker that cannot write the shared root (its status file or a probe file there: a read-only or
full mount, say) stops its manifest, says so in ``/health`` and ``/status``, takes no manifest, and
tries a probe file every ``storage_probe_interval_s`` until a write succeeds again: the coordinator,
which would otherwise wait for a status file that never changes, takes its batches away at once.

Every file is opened safely (:mod:`manifests.atomic`): the manifest is read only if it is a regular
file no larger than ``max_manifest_bytes``, without blocking and without following a symlink; the
manifest's directories are opened once at submit, walking from the shared root without following
a symlink, and every frame and status file is written relative to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler

from manifests import (
    DocumentError,
    JobLayout,
    Manifest,
    PathOutsideRootError,
    Status,
    WorkerIdentity,
    WorkerState,
    resolve_within,
    write_json_atomic,
)
from manifests.atomic import Directory
from manifests.errors import FileTooLargeError, SymlinkRefusedError, UnsafeFileError
from manifests.health import GpuMemory, Health
from manifests.httpguard import GuardRules
from manifests.manifest import check_frames_within_job, job_frame_count
from manifests.segment import TRANSPORTS
from worker.errors import WorkerError
from worker.frames import FrameLimits
from worker.gpuinfo import GpuMemoryProbe
from worker.httpguard import guarded_app, read_body
from worker.logsafe import loggable
from worker.metrics import WorkerMetrics
from worker.processing import ManifestRun, RunDirs, Upscaler, in_daemon_thread
from worker.segments import ProbeCache, SegmentRun, check_segment_manifest
from worker.settings import WorkerSettings
from worker.upscaling import settings_from

log = logging.getLogger(__name__)

ModelLoader = Callable[[WorkerSettings], Upscaler]


def _version() -> str:
    try:
        return metadata.version("esrfarm")
    except metadata.PackageNotFoundError:
        return "unknown"


class RequestError(WorkerError):
    """A request the worker refuses; becomes a JSON ``{"error": ...}`` response with ``status``
    (and ``Retry-After`` when ``retry_after_s`` says when trying again may help)."""

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None) -> None:
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def load_runtime_model(settings: WorkerSettings) -> Upscaler:
    """The real loader: the backend (torch and spandrel, or ncnn) is imported only here."""
    if settings.simulate_latency_ms is not None:
        from worker.benchmarking import SimulatedUpscaler

        scale = settings.scale or 4.0
        latency = settings.simulate_latency_ms / 1000
        return SimulatedUpscaler(settings.model, latency, scale=scale, backend=settings.backend)
    budget = settings.pixel_budget
    if settings.backend == "ncnn":
        from worker.ncnn_runtime import NcnnSettings, load_ncnn_upscaler

        ncnn_settings = settings_from(NcnnSettings, settings, gpu=settings.gpu or 0, max_pass_pixels=budget)
        return load_ncnn_upscaler(settings.model, ncnn_settings, allow_download=settings.allow_download)
    from worker.runtime import RuntimeSettings, load_upscaler

    runtime = settings_from(RuntimeSettings, settings, device=settings.device_spec, max_pass_pixels=budget)
    return load_upscaler(settings.model, runtime, allow_download=settings.allow_download)


class WorkerService:
    """The state behind the endpoints."""

    def __init__(self, settings: WorkerSettings, load_model: ModelLoader) -> None:
        self.settings = settings
        self.shared_root = Path(os.path.realpath(settings.shared_root))
        self._load_model = load_model
        self.metrics = WorkerMetrics()
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.started = time.monotonic()
        self.state = "loading"  # loading | idle | processing | error
        self.load_error: str | None = None
        self.upscaler: Upscaler | None = None
        self.gpu: GpuMemoryProbe | None = None
        self.identity = WorkerIdentity(
            worker_id=settings.worker_id or f"{socket.gethostname()}:{settings.port}",
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        self.run: ManifestRun | None = None
        self.task: asyncio.Task[Status] | None = None
        self._submitting = False  # a manifest is being read and checked: at most one at a time
        self.fatal = asyncio.Event()  # set when the model cannot be loaded: the process should exit
        self.storage_error: str | None = None  # why the shared root cannot be written, while it cannot
        self._storage_probe: asyncio.Task[None] | None = None
        self.probes = ProbeCache()  # segment jobs: each source probed once, not once per range

    def set_worker_id(self, worker_id: str) -> None:
        self.identity = WorkerIdentity(worker_id, self.identity.host, self.identity.pid)

    # -- model --------------------------------------------------------------------------------

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        log.info("loading model %s on %s", settings.model, settings.device_spec)
        try:
            upscaler = await loop.run_in_executor(self.compute, self._load_model, settings)
            if settings.warmup:
                size = settings.warmup_size
                await loop.run_in_executor(self.compute, upscaler.warmup, size, size)
            self.gpu = GpuMemoryProbe(upscaler)
        except Exception as exc:
            self.state, self.load_error = "error", f"{type(exc).__name__}: {exc}"
            log.error("cannot load model %s: %s", settings.model, exc)
            self.fatal.set()
            return
        self.upscaler = upscaler
        device_type = getattr(upscaler.device, "type", "cpu")
        self.identity = WorkerIdentity(
            worker_id=self.identity.worker_id,
            host=self.identity.host,
            pid=self.identity.pid,
            gpu=settings.gpu_label(device_type),
            device=upscaler.device_name,
        )
        self.state = "idle"
        self.metrics.ready.set(1)
        await self._probe_storage_once()
        log.info(
            "ready: %s (%s) x%g %s on %s", upscaler.model_name, upscaler.architecture, upscaler.scale,
            upscaler.precision, upscaler.device_name,
        )  # fmt: skip

    # -- shared storage -------------------------------------------------------------------------

    def storage_unwritable(self, exc: OSError) -> None:
        """A write to the shared root failed: the run in progress stops (nobody could see what it
        claims), /health and /status say why, no manifest is taken, and the root is tried again every
        ``storage_probe_interval_s`` until a write succeeds."""
        reason = f"the shared storage is not writable from this worker: {exc.strerror or exc}"
        if self.storage_error is None:
            log.error("%s; taking no manifest until it is", reason)
        self.storage_error = reason
        if self.run is not None and self.busy:
            self.run.request_stop(reason)
        if self._storage_probe is None or self._storage_probe.done():
            self._storage_probe = asyncio.get_running_loop().create_task(self._probe_storage_until_writable())

    async def _probe_storage_once(self) -> bool:
        """Create and remove a small file in the shared root (off the event loop); True if it worked."""
        try:
            await in_daemon_thread(_probe_writable, self.shared_root, self.identity.pid)
        except OSError as exc:
            self.storage_unwritable(exc)
            return False
        return True

    async def _probe_storage_until_writable(self) -> None:
        while self.storage_error is not None:
            await asyncio.sleep(self.settings.storage_probe_interval_s)
            try:
                await in_daemon_thread(_probe_writable, self.shared_root, self.identity.pid)
            except OSError:
                continue
            self.storage_error = None
            log.info("the shared storage is writable again; taking manifests")

    # -- manifests ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def _resolve(self, path: str | Path, field: str | None = None) -> Path:
        """``path`` (relative to the shared root) resolved, symlinks followed; 403 unless under the root."""
        if "\x00" in str(path):
            raise RequestError(400, "the manifest path must not contain a NUL character")
        try:
            return resolve_within(self.shared_root, self.shared_root / path)
        except PathOutsideRootError as exc:
            raise RequestError(403, f"manifest field '{field}': {exc}" if field else str(exc)) from None

    async def submit(self, manifest_path: str) -> ManifestRun:
        if self.upscaler is None:
            raise RequestError(503, f"the model is not ready (state {self.state})")
        if self.storage_error is not None:
            raise RequestError(503, self.storage_error, retry_after_s=self.settings.storage_probe_interval_s)
        if self.busy and self.run is not None and self.run.status.state.is_final and self.task is not None:
            # Its final status is written (a coordinator may already have read it and sent the next
            # manifest); the run is only ending: wait for it rather than refuse with 409.
            await asyncio.wait({self.task}, timeout=self.settings.reset_timeout_s)
        if self.busy:
            raise RequestError(409, self._busy_message())
        if self._submitting:
            raise RequestError(409, "another manifest is being submitted right now; try again")
        self._submitting = True
        try:
            # All file system work in one thread, and one submit at a time: requests never pile up threads.
            manifest, dirs = await in_daemon_thread(self._prepare, manifest_path)
        finally:
            self._submitting = False
        settings = self.settings
        scale = manifest.scale if manifest.scale is not None else self.upscaler.scale
        segment: dict[str, Any] = {}
        if manifest.segment is not None:
            names = (Path(manifest.segment.source).name, Path(manifest.segment.file).name)
            segment = {"source_name": names[0], "segment_name": names[1], "probes": self.probes}
        run = (SegmentRun if segment else ManifestRun)(
            manifest,
            dirs,
            self.upscaler,
            self.identity,
            self.compute,
            self.metrics,
            limits=FrameLimits(scale, settings.max_output_pixels),
            part_pixels=settings.part_pixels,
            io_threads=settings.io_threads,
            fsync_frames=settings.fsync_frames,
            on_status_unwritable=self.storage_unwritable,
            **segment,
        )
        self.run, self.task = run, asyncio.create_task(self._process(run))
        return run

    def _prepare(self, manifest_path: str) -> tuple[Manifest, RunDirs]:
        """Read and check the manifest, open its directories; raises :class:`RequestError`. Blocking."""
        path = self._resolve(manifest_path)
        with Directory.open(self.shared_root) as root:
            manifest = self._read_manifest(root, path, manifest_path)
            self._check_compatible(manifest)
            with contextlib.ExitStack() as opened:
                job = JobLayout(self.shared_root, manifest.job_id)
                job_dir = opened.enter_context(self._open(root, self._resolve(job.job_dir), "job_id"))
                frames = self._job_frames(job_dir)
                if frames is not None:
                    try:
                        check_frames_within_job(manifest, frames, source=loggable(manifest_path))
                    except DocumentError as exc:
                        raise RequestError(400, str(exc)) from None
                status_file = self._resolve(job.job_dir / manifest.status_file, "status_file")
                # A segment job reads its source's directory and writes its segment's instead of frames.
                reads: tuple[str, str | Path] = ("input_dir", manifest.input_dir)
                writes: tuple[str, str | Path] = ("output_dir", manifest.output_dir)
                if manifest.segment is not None:
                    try:
                        check_segment_manifest(manifest)
                    except ValueError as exc:
                        raise RequestError(400, f"manifest {loggable(manifest_path)}: {exc}") from None
                    source = self._segment_file(job.job_dir, manifest.segment.source, "segment.source")
                    file = self._segment_file(job.job_dir, manifest.segment.file, "segment.file")
                    reads, writes = ("segment.source", source.parent), ("segment.file", file.parent)
                input_dir, output_dir, status_dir = (
                    opened.enter_context(
                        self._open(root, self._resolve(job.job_dir / relative, field), field, create)
                    )
                    for field, relative, create in (
                        (*reads, False),
                        (*writes, True),
                        ("status_file", status_file.parent, True),
                    )
                )
                opened.pop_all()
        job_dir.close()
        return manifest, RunDirs(input_dir, output_dir, status_dir, status_file.name)

    def _segment_file(self, job_dir: Path, relative: str, field: str) -> Path:
        """A segment manifest's file ``relative`` to the job directory: its directory resolved inside the
        shared root (403 otherwise); the file itself is opened by name, never through a symlink."""
        path = job_dir / relative
        if path.name in {"", ".", ".."}:
            raise RequestError(400, f"manifest field '{field}' must name a file, not {loggable(relative)}")
        return self._resolve(path.parent, field) / path.name

    def _read_manifest(self, root: Directory, path: Path, given: str) -> Manifest:
        shown = loggable(given)
        limit = self.settings.max_manifest_bytes
        try:
            with root.open_below(path.relative_to(self.shared_root).parent) as parent:
                data = parent.read_bytes(path.name, max_bytes=limit)
        except (OSError, UnsafeFileError) as exc:
            raise _refusal(f"manifest {shown}", exc) from None
        try:
            return Manifest.from_json(data, source=shown)
        except DocumentError as exc:
            raise RequestError(400, str(exc)) from None

    def _open(self, root: Directory, path: Path, field: str, create: bool = False) -> Directory:
        """The resolved directory ``path`` opened from the root without following a symlink."""
        relative = path.relative_to(self.shared_root)
        shown = loggable(relative)
        try:
            return root.open_below(relative, create=create)
        except (OSError, UnsafeFileError) as exc:
            raise _refusal(f"manifest field '{field}': directory {shown}", exc) from None

    @staticmethod
    def _job_frames(job_dir: Directory) -> int | None:
        """The job's frame count from its job.json; None (static bounds only) when it gives none."""
        try:
            return job_frame_count(job_dir.read_bytes("job.json", max_bytes=1 << 20))
        except (OSError, UnsafeFileError):
            return None

    async def _process(self, run: ManifestRun) -> Status:
        self.state = "processing"
        self.metrics.busy.set(1)
        try:
            try:
                await run.start()
            except OSError:  # the status file cannot be written: the run said so and failed
                return run.status
            return await run.run()
        finally:
            run.dirs.release()
            self.state = "idle"
            self.metrics.busy.set(0)

    def _busy_message(self) -> str:
        assert self.run is not None
        return (
            f"already processing manifest {self.run.manifest.manifest_id} of job {self.run.manifest.job_id}; "
            "POST /reset first to cancel it"
        )

    def _check_compatible(self, manifest: Manifest) -> None:
        upscaler, settings = self.upscaler, self.settings
        assert upscaler is not None
        if manifest.model not in {settings.model, upscaler.model_name}:
            raise RequestError(
                400,
                f"manifest asks for model {manifest.model!r}, but this worker runs {upscaler.model_name!r} "
                f"(started with --model {settings.model}); send it to a worker running that model",
            )
        for field, wanted, running in (
            ("tile", manifest.tile, settings.tile),
            ("tile_pad", manifest.tile_pad, settings.tile_pad),
        ):
            if wanted is not None and wanted != running:
                raise RequestError(
                    400,
                    f"manifest asks for {field} {wanted}, but this worker runs {field} {running} "
                    "(set when it was started)",
                )

    async def stop_run(self, reason: str, timeout: float) -> bool:
        """Ask the running manifest to stop at its next batch boundary; True once it has stopped."""
        task, run = self.task, self.run
        if task is None or run is None or task.done():
            return True
        run.request_stop(reason)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        return bool(done)

    async def shutdown(self) -> None:
        """On SIGTERM: let the batch in flight finish, write the final status; cancel after the timeout."""
        if self.busy:
            assert self.task is not None
            if not await self.stop_run("worker stopped", self.settings.shutdown_timeout_s):
                log.error(
                    "the batch in flight did not finish within %gs; cancelling it",
                    self.settings.shutdown_timeout_s,
                )
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
        if self._storage_probe is not None:
            self._storage_probe.cancel()
        self.compute.shutdown(wait=False, cancel_futures=True)

    # -- views --------------------------------------------------------------------------------

    def status_bytes(self) -> bytes:
        if self.run is not None:
            return self.run.status_bytes
        return Status(
            state=WorkerState.IDLE, worker=self.identity, updated_at=time.time(), message=self.storage_error
        ).to_json()

    def health(self) -> Health:
        upscaler = self.upscaler
        memory = self.gpu.read() if self.gpu is not None else None
        current = self.run.manifest if self.run is not None and self.busy else None
        return Health(
            state=self.state,
            ready=upscaler is not None,
            error=self.load_error,
            backend=upscaler.backend if upscaler else self.settings.backend,
            model=upscaler.model_name if upscaler else self.settings.model,
            architecture=upscaler.architecture if upscaler else None,
            scale=upscaler.scale if upscaler else self.settings.scale,
            native_scale=upscaler.native_scale if upscaler else None,
            precision=upscaler.precision if upscaler else self.settings.precision,
            device=upscaler.device_name if upscaler else self.settings.device_spec,
            gpu=self.identity.gpu,
            gpu_memory=GpuMemory(**memory) if memory is not None else None,
            tile=self.settings.tile,
            tile_pad=self.settings.tile_pad,
            transports=TRANSPORTS,
            storage_writable=self.storage_error is None,
            storage_error=self.storage_error,
            job_id=current.job_id if current else None,
            manifest_id=current.manifest_id if current else None,
            worker_id=self.identity.worker_id,
            host=self.identity.host,
            pid=self.identity.pid,
            uptime_s=round(time.monotonic() - self.started, 3),
            version=_version(),
        )


PROBE_NAME = ".esrfarm-write-probe-{pid}"


def _probe_writable(shared_root: Path, pid: int) -> None:
    """Create, write and remove a small file in ``shared_root``; raises OSError if it cannot. Blocking."""
    path = shared_root / PROBE_NAME.format(pid=pid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, b"esrfarm")
    finally:
        os.close(fd)
    os.unlink(path)


def _refusal(what: str, exc: OSError | UnsafeFileError) -> RequestError:
    """The answer for a manifest file or directory that cannot be opened as asked (``what`` names it)."""
    if isinstance(exc, SymlinkRefusedError):
        return RequestError(403, f"{what}: {exc} (it was replaced while being opened)")
    if isinstance(exc, FileTooLargeError):
        return RequestError(400, f"{what} is too large: it {exc.problem} (--max-manifest-bytes)")
    if isinstance(exc, UnsafeFileError):
        return RequestError(400, f"{what} {exc.problem}")
    if isinstance(exc, FileNotFoundError):
        return RequestError(400, f"{what} does not exist")
    if isinstance(exc, NotADirectoryError):
        return RequestError(400, f"{what} does not exist: part of its path is not a directory")
    return RequestError(400, f"{what} cannot be opened: {exc.strerror or exc}")


SETTINGS = web.AppKey("settings", WorkerSettings)

MAX_HEADERS = 32  # request headers; a client of the worker sends about 6
MAX_LINE_BYTES = 8190  # request line and each header (aiohttp's default)
BACKLOG = 32  # pending connections; also the most the event loop accepts at once

WORKER = web.AppKey("worker", WorkerService)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}), status=status, content_type="application/json", headers=headers
    )


async def health(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return _json(msgspec.to_builtins(worker.health()), status=200 if worker.upscaler is not None else 503)


async def status(request: web.Request) -> web.Response:
    return web.Response(body=request.app[WORKER].status_bytes(), content_type="application/json")


async def process_manifest(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    raw = await read_body(request, worker.settings.body_timeout_s)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _error(400, f"the request body is not valid JSON: {exc}")
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("manifest_path"), str)
        or not body["manifest_path"]
    ):
        return _error(
            400, 'the request body must be a JSON object {"manifest_path": "<path under the shared root>"}'
        )
    try:
        run = await worker.submit(body["manifest_path"])
    except RequestError as exc:
        log.info(
            "refused manifest %s: %s %s", loggable(body["manifest_path"]), exc.status, loggable(exc.message)
        )
        return _error(exc.status, exc.message, **exc.headers)
    manifest = run.manifest
    return _json(
        {
            "accepted": True,
            "job_id": manifest.job_id,
            "manifest_id": manifest.manifest_id,
            "batches": len(manifest.batches),
            "frames": manifest.frame_count,
            "status_file": manifest.status_file,
        },
        status=202,
    )


async def reset(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    if not worker.busy:
        return _json({"state": worker.state, "cancelled": False})
    stopped = await worker.stop_run("cancelled by POST /reset", worker.settings.reset_timeout_s)
    if not stopped:
        return _json(
            {
                "state": "processing",
                "cancelled": False,
                "message": "stop requested; the batch in flight has not finished yet",
            },
            status=202,
        )
    return _json({"state": worker.state, "cancelled": True, "status": orjson.loads(worker.status_bytes())})


async def metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    memory = worker.gpu.read() if worker.gpu is not None else None
    if memory is not None:
        if memory["used"] is not None:  # Vulkan (ncnn) reports the total only
            worker.metrics.gpu_memory_used.set(memory["used"])
        worker.metrics.gpu_memory_total.set(memory["total"])
    return web.Response(
        body=worker.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def _connection_tracker(guard: ConnectionGuard) -> Middleware:
    @web.middleware
    async def track(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        with guard.active(request.protocol):
            return await handler(request)

    return track


class ConnectionGuard:
    """The protocol factory of the worker's listening socket: keeps at most ``limit`` connections.

    A connection beyond the limit closes the oldest one that has no request in progress: first one
    that has sent part of its headers and no more (a slow client), then one idle between requests
    (every request it sent answered).
    A connection that has sent nothing yet is never closed for a newer one: it may be one of a burst
    accepted at once whose requests the event loop has not read yet (it ends at the header timeout
    if it stays silent). If none can give way (every one busy: a request in progress, or parsed and
    waiting for its handler, or just accepted),
    the new connection is answered 503 with ``Retry-After`` instead (:class:`_Refused`), which the
    coordinator's client retries. The worker's own descriptors are kept clear of the limit,
    so accepting never fails for want of one and ``/health`` stays answerable.
    """

    def __init__(self, limit: int, linger_limit: int = BACKLOG) -> None:
        self.limit = limit
        self.linger_limit = linger_limit  # refused connections being answered 503 at once, at most
        self.lingering = 0
        self.server: web.Server | None = None
        self._busy: dict[RequestHandler, int] = {}
        self._heard: dict[
            RequestHandler, int
        ] = {}  # connections that have sent something -> requests answered

    def __call__(self) -> asyncio.BaseProtocol:
        assert self.server is not None, "attach the runner's server first"
        open_now = [h for h in self.server.connections if h.transport is not None]
        if len(open_now) >= self.limit:
            # A connection that has sent part of its headers goes first (a slow client), then one idle
            # between requests; a connection whose request has arrived (a /health probe waiting for
            # its handler to run), or that has sent nothing yet, counts as busy.
            free = [h for h in open_now if h not in self._busy and self._between_requests(h)]
            idle = next((h for h in free if not _requests_seen(h)), None) or next(iter(free), None)
            if idle is None:
                log.warning("%d connections, every one busy: answering a new one 503", len(open_now))
                return _Refused(self)
            idle.force_close()
        return _Heard(self.server(), self)

    def _between_requests(self, handler: RequestHandler) -> bool:
        """The connection has sent something, and every request it sent has been answered (or it
        waits for the rest of its first request's headers)."""
        if handler not in self._heard:
            return False
        return _awaiting_request(handler) or 0 < _requests_seen(handler) == self._heard[handler]

    def heard(self, handler: RequestHandler) -> None:
        self._heard.setdefault(handler, 0)

    def gone(self, handler: RequestHandler) -> None:
        self._heard.pop(handler, None)

    @contextlib.contextmanager
    def active(self, handler: RequestHandler) -> Iterator[None]:
        self._busy[handler] = self._busy.get(handler, 0) + 1
        try:
            yield
        finally:
            self._busy[handler] -= 1
            if not self._busy[handler]:
                del self._busy[handler]
            if handler in self._heard:
                self._heard[handler] += 1


def _requests_seen(handler: RequestHandler) -> int:
    """How many requests' headers the connection has delivered (aiohttp counts them as it parses)."""
    return int(getattr(handler, "_request_count", 0))


def _awaiting_request(handler: RequestHandler) -> bool:
    """Whether the connection's handler is parked waiting for a request to arrive: none is queued,
    none is being handled, no answer is being written (aiohttp's request loop sets ``_waiter`` only
    there; a request parsed but not yet taken up, or handled, leaves it unset or done)."""
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
REFUSAL_BODY = b'{"error": "too many connections, every one busy; try again"}'
REFUSAL_LINGER_S = 2.0  # a refused connection is read (and dropped) this long at most, for its answer


class _Heard(asyncio.Protocol):
    """The protocol of an accepted connection: aiohttp's handler, telling the guard that the
    connection has sent something, and that it is gone (the handler's own slots cannot be added to)."""

    def __init__(self, handler: RequestHandler, guard: ConnectionGuard) -> None:
        self.handler = handler
        self._guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._guard.heard(self.handler)
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.gone(self.handler)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection answered 503 with ``Retry-After`` as soon as it is made, without a request being
    read: what the client sends meanwhile is read and dropped until it closes (or for
    ``REFUSAL_LINGER_S``), since closing a socket with unread data resets it before the client
    reads the answer. At most ``guard.linger_limit`` linger at once (the descriptors the connection
    limit leaves); past that a connection is just closed."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._guard.lingering >= self._guard.linger_limit:  # no descriptor to spare: just closed
            transport.close()
            return
        self._guard.lingering += 1
        self._transport = transport
        transport.write(REFUSAL % (len(REFUSAL_BODY), REFUSAL_BODY))
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.lingering -= 1
            self._transport = None
        if self._timer is not None:
            self._timer.cancel()


def descriptor_budget(soft_limit: int | None, max_connections: int) -> tuple[int, int]:
    """(connections kept open at most, connections being answered 503 at most) within a descriptor
    limit of ``soft_limit`` (None: unlimited). Kept clear below it: the worker's own descriptors
    (files, pipes, the model: ``FD_RESERVE``) and an accept burst (the event loop accepts up to
    ``BACKLOG`` connections before the guard sees any of them, and each may close an older one whose
    descriptor is released only on the loop's next turn: twice ``BACKLOG``)."""
    if soft_limit is None:
        return max_connections, 4 * BACKLOG
    available = soft_limit - FD_RESERVE - 2 * BACKLOG
    limit = max(4, min(max_connections, available - min(BACKLOG, available // 4)))
    return limit, max(0, min(4 * BACKLOG, available - limit))


def _descriptor_budget(settings: WorkerSettings) -> tuple[int, int]:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return descriptor_budget(None if soft == resource.RLIM_INFINITY else soft, settings.max_connections)


FD_RESERVE = 64  # descriptors kept for the worker's own use below the connection limit

CONNECTIONS = web.AppKey("connections", ConnectionGuard)


def guard_rules(settings: WorkerSettings) -> GuardRules:
    """The worker's use of the HTTP guard (:mod:`manifests.httpguard`): every path but /health."""
    return GuardRules(
        server="worker",
        token=settings.token,
        max_body_bytes=settings.max_request_bytes,
        public_paths=frozenset({"/health"}),
    )


def create_app(settings: WorkerSettings, *, load_model: ModelLoader = load_runtime_model) -> web.Application:
    """The worker app. The model loads in the background once the app starts (/health is 503 until then)."""
    guard = ConnectionGuard(*_descriptor_budget(settings))
    app = guarded_app(guard_rules(settings), outer=[_connection_tracker(guard)])
    app[SETTINGS] = settings
    app[CONNECTIONS] = guard
    app[WORKER] = WorkerService(settings, load_model)
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_post("/process_manifest", process_manifest)
    app.router.add_post("/reset", reset)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_worker_lifetime)
    return app


async def _worker_lifetime(app: web.Application) -> AsyncIterator[None]:
    worker = app[WORKER]
    loading = asyncio.create_task(worker.load())
    yield
    await worker.shutdown()
    if not loading.done():
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading


async def serve(settings: WorkerSettings, *, on_listening: Callable[[str], None] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT (exit code 0) or a model that cannot load (exit code 3)."""
    app = create_app(settings)
    worker, guard = app[WORKER], app[CONNECTIONS]
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
        handler_cancellation=True,  # a client gone mid-request frees its handler at once
        keepalive_timeout=settings.header_timeout_s,  # runs from the connection's start: a header deadline
        max_headers=MAX_HEADERS,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
    )
    await runner.setup()
    assert runner.server is not None
    guard.server = runner.server
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(guard, settings.host, settings.port, backlog=BACKLOG)
    except OSError as exc:
        await runner.cleanup()
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 2
    port = int(listener.sockets[0].getsockname()[1]) if listener.sockets else settings.port
    if settings.worker_id is None:
        worker.set_worker_id(f"{socket.gethostname()}:{port}")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{port}"
    if settings.port_file is not None:
        write_json_atomic(settings.port_file, orjson.dumps({"port": port, "url": url, "pid": os.getpid()}))
    if on_listening is not None:
        on_listening(url)
    log.info(
        "listening on %s (worker %s, at most %d connections)", url, worker.identity.worker_id, guard.limit
    )

    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.fatal.wait())}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    code = 3 if worker.fatal.is_set() and not stop.is_set() else 0
    reason = (
        f"worker stopped ({received[0]})" if received else "worker stopped (the model could not be loaded)"
    )
    log.info("stopping: %s", reason)
    if worker.busy:
        assert worker.run is not None
        worker.run.request_stop(reason)
    listener.close()
    await runner.cleanup()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    log.info("stopped")
    return code
