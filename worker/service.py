"""The worker's HTTP service: one process, one model, one device, one manifest at a time.

Endpoints (all JSON except /metrics)::

    GET  /health            200 once the model is loaded and warm, 503 before (or if loading failed)
    GET  /status            the status file of the current or last manifest
    POST /process_manifest  {"manifest_path": "jobs/<id>/manifests/w0.json"}: 202 started, 409 busy,
                            400 bad manifest, 403 path outside the shared root, 503 model not ready
    POST /reset             stop the running manifest at the next batch boundary; 200 when it has stopped
    GET  /metrics           Prometheus text

Bound to a non-loopback address, every endpoint but /health wants ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from manifests import (
    DocumentError,
    JobLayout,
    Manifest,
    PathOutsideRootError,
    Status,
    WorkerIdentity,
    WorkerState,
    read_manifest,
    resolve_within,
    write_json_atomic,
)
from worker.gpuinfo import GpuMemoryProbe
from worker.metrics import WorkerMetrics
from worker.processing import ManifestRun, RunPaths, Upscaler, in_daemon_thread
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

ModelLoader = Callable[[WorkerSettings], Upscaler]


def _version() -> str:
    try:
        return metadata.version("esrfarm")
    except metadata.PackageNotFoundError:
        return "unknown"


class RequestError(Exception):
    """A request the worker refuses; becomes a JSON ``{"error": ...}`` response with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def load_runtime_model(settings: WorkerSettings) -> Upscaler:
    """The real loader: the runtime (torch, spandrel) is imported only here."""
    if settings.simulate_latency_ms is not None:
        from worker.benchmarking import SimulatedUpscaler

        scale = settings.scale or 4.0
        return SimulatedUpscaler(settings.model, settings.simulate_latency_ms / 1000, scale=scale)
    from worker.runtime import RuntimeSettings, load_upscaler

    runtime = RuntimeSettings(
        device=settings.device_spec,
        precision=settings.precision,
        scale=settings.scale,
        tile=settings.tile,
        tile_pad=settings.tile_pad,
        max_batch=settings.max_batch,
        cpu_threads=settings.cpu_threads,
    )
    return load_upscaler(settings.model, runtime, allow_download=settings.allow_download)


class Worker:
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
        self.fatal = asyncio.Event()  # set when the model cannot be loaded: the process should exit

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
        log.info(
            "ready: %s (%s) x%g %s on %s", upscaler.model_name, upscaler.architecture, upscaler.scale,
            upscaler.precision, upscaler.device_name,
        )  # fmt: skip

    # -- manifests ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def _resolve(self, path: str | Path) -> Path:
        if "\x00" in str(path):
            raise RequestError(400, "the manifest path must not contain a NUL character")
        try:
            return resolve_within(self.shared_root, self.shared_root / path)
        except PathOutsideRootError as exc:
            raise RequestError(403, str(exc)) from None

    async def submit(self, manifest_path: str) -> ManifestRun:
        if self.upscaler is None:
            raise RequestError(503, f"the model is not ready (state {self.state})")
        if self.busy:
            raise RequestError(409, self._busy_message())
        path = self._resolve(manifest_path)
        try:
            manifest = await in_daemon_thread(read_manifest, path)
        except FileNotFoundError:
            raise RequestError(400, f"manifest {manifest_path} does not exist") from None
        except IsADirectoryError:
            raise RequestError(400, f"manifest {manifest_path} is a directory, not a file") from None
        except OSError as exc:
            raise RequestError(
                400, f"manifest {manifest_path} cannot be read: {exc.strerror or exc}"
            ) from None
        except DocumentError as exc:
            raise RequestError(400, str(exc)) from None
        paths = self._paths(manifest)
        self._check_compatible(manifest)
        if not paths.input_dir.is_dir():
            raise RequestError(
                400, f"input directory {manifest.input_dir} of job {manifest.job_id} does not exist"
            )
        try:
            paths.output_dir.mkdir(parents=True, exist_ok=True)
            paths.status_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RequestError(400, f"cannot create the output or status directory: {exc}") from None
        if self.busy:  # another request got in while the manifest was being read
            raise RequestError(409, self._busy_message())
        run = ManifestRun(
            manifest,
            paths,
            self.upscaler,
            self.identity,
            self.compute,
            self.metrics,
            io_threads=self.settings.io_threads,
            fsync_frames=self.settings.fsync_frames,
        )
        self.run, self.task = run, asyncio.create_task(self._process(run))
        return run

    async def _process(self, run: ManifestRun) -> Status:
        self.state = "processing"
        self.metrics.busy.set(1)
        try:
            await run.start()
            return await run.run()
        finally:
            self.state = "idle"
            self.metrics.busy.set(0)

    def _busy_message(self) -> str:
        assert self.run is not None
        return (
            f"already processing manifest {self.run.manifest.manifest_id} of job {self.run.manifest.job_id}; "
            "POST /reset first to cancel it"
        )

    def _paths(self, manifest: Manifest) -> RunPaths:
        job_dir = self._resolve(JobLayout(self.shared_root, manifest.job_id).job_dir)

        def inside_job(field: str, relative: str) -> Path:
            try:
                return resolve_within(self.shared_root, job_dir / relative)
            except PathOutsideRootError as exc:
                raise RequestError(403, f"manifest field '{field}': {exc}") from None

        return RunPaths(
            shared_root=self.shared_root,
            job_dir=job_dir,
            input_dir=inside_job("input_dir", manifest.input_dir),
            output_dir=inside_job("output_dir", manifest.output_dir),
            status_file=inside_job("status_file", manifest.status_file),
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
        self.compute.shutdown(wait=False, cancel_futures=True)

    # -- views --------------------------------------------------------------------------------

    def status_bytes(self) -> bytes:
        if self.run is not None:
            return self.run.status_bytes
        return Status(state=WorkerState.IDLE, worker=self.identity, updated_at=time.time()).to_json()

    def health(self) -> dict[str, Any]:
        upscaler = self.upscaler
        memory = self.gpu.read() if self.gpu is not None else None
        current = self.run.manifest if self.run is not None and self.busy else None
        return {
            "state": self.state,
            "ready": upscaler is not None,
            "error": self.load_error,
            "model": upscaler.model_name if upscaler else self.settings.model,
            "architecture": upscaler.architecture if upscaler else None,
            "scale": upscaler.scale if upscaler else self.settings.scale,
            "native_scale": upscaler.native_scale if upscaler else None,
            "precision": upscaler.precision if upscaler else self.settings.precision,
            "device": upscaler.device_name if upscaler else self.settings.device_spec,
            "gpu": self.identity.gpu,
            "gpu_memory": memory,
            "tile": self.settings.tile,
            "tile_pad": self.settings.tile_pad,
            "job_id": current.job_id if current else None,
            "manifest_id": current.manifest_id if current else None,
            "worker_id": self.identity.worker_id,
            "host": self.identity.host,
            "pid": self.identity.pid,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": _version(),
        }


SETTINGS = web.AppKey("settings", WorkerSettings)

WORKER = web.AppKey("worker", Worker)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}), status=status, content_type="application/json", headers=headers
    )


async def health(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return _json(worker.health(), status=200 if worker.upscaler is not None else 503)


async def status(request: web.Request) -> web.Response:
    return web.Response(body=request.app[WORKER].status_bytes(), content_type="application/json")


async def process_manifest(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    try:
        body = orjson.loads(await request.read())
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
        log.info("refused manifest %s: %s %s", body["manifest_path"], exc.status, exc.message)
        return _error(exc.status, exc.message)
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
        worker.metrics.gpu_memory_used.set(memory["used"])
        worker.metrics.gpu_memory_total.set(memory["total"])
    return web.Response(
        body=worker.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_request_bytes
        return _error(413, f"the request body is too large: at most {limit} bytes")


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def require_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != "/health":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(
                    401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer realm="esrfarm"'}
                )
        return await handler(request)

    return require_token


def create_app(settings: WorkerSettings, *, load_model: ModelLoader = load_runtime_model) -> web.Application:
    """The worker app. The model loads in the background once the app starts (/health is 503 until then)."""
    middlewares: list[Middleware] = [_errors_as_json]
    if settings.token is not None:
        middlewares.insert(0, _auth_middleware(settings.token))
    app = web.Application(client_max_size=settings.max_request_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    app[WORKER] = Worker(settings, load_model)
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
    worker = app[WORKER]
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=5.0)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 2
    port = _bound_port(runner, settings.port)
    if settings.worker_id is None:
        worker.set_worker_id(f"{socket.gethostname()}:{port}")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{port}"
    if settings.port_file is not None:
        write_json_atomic(settings.port_file, orjson.dumps({"port": port, "url": url, "pid": os.getpid()}))
    if on_listening is not None:
        on_listening(url)
    log.info("listening on %s (worker %s)", url, worker.identity.worker_id)

    loop = asyncio.get_running_loop()
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
    await runner.cleanup()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    log.info("stopped")
    return code


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback
