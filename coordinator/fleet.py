"""The farm's workers as one fleet: started, watched, dispatched to, reset, and shared by jobs.

A :class:`WorkerFleet` outlives one job and may serve several at once (the job service runs many
jobs on one fleet). It owns:

- **starting** local workers (:class:`coordinator.local_workers.LocalWorkerPool`), or worker actors
  on a Ray cluster (``farm.ray_address``: :class:`coordinator.ray_fleet.RayWorkerPool`, imported
  only then), or taking the URLs of workers already running;
- **health**: a background round of ``GET /health`` every ``health_interval_s``; a worker that does
  not answer for ``unreachable_after_s``, or whose process (or Ray actor) exited, is **lost** (a lost
  worker the fleet started is killed: a stopped or hung process cannot act on SIGTERM). A pool's
  worker that comes back on a new URL (a restarted Ray actor) **joins**: it is dealt to once it
  answers /health;
- **dispatch**: a worker holds at most one manifest at a time. :meth:`idle` names the workers a job
  may deal to now (alive, running the job's model on the job's backend, holding nothing, not busy
  with another coordinator's manifest and able to write the shared root as far as its last
  ``/health`` says, not backing off after a 409 or 503);
  :meth:`dispatch` posts a manifest and marks the worker as holding it until :meth:`release`.
  A 409 (busy elsewhere) makes the worker back off, doubling from ``busy_backoff_s``.
- **reset** of the manifests a worker holds (a cancelled or failed job's).

It talks to workers through :class:`WorkerClient` objects (HTTP, :mod:`coordinator.client`); tests
give it in-process clients of the same shape instead (``clients=``), the way httpx takes a
``MockTransport``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import msgspec

from coordinator.client import HttpWorkerClient, WorkerBusyError, WorkerRequestError
from coordinator.errors import FleetError, NoWorkerError
from coordinator.local_workers import LocalWorkerPool, check_model, visible_gpu_count
from coordinator.spec import FarmSettings
from manifests.health import Health
from manifests.segment import FRAMES_TRANSPORT

log = logging.getLogger(__name__)


class WorkerClient(Protocol):
    """What the fleet needs of a worker: its three calls. Each raises :class:`WorkerRequestError`."""

    url: str

    async def health(self) -> Health: ...

    async def process_manifest(self, manifest_path: str) -> None: ...

    async def reset(self) -> None: ...


class WorkerPool(Protocol):
    """Worker processes the fleet started (:class:`LocalWorkerPool`, or Ray actors), by URL."""

    def exited(self) -> dict[str, str]:
        """URL -> why, for every worker whose process (or actor) is gone."""
        ...

    def joined(self) -> list[str]:
        """URLs of workers that came up since the last call (a restarted actor's new URL)."""
        ...

    def replacing(self) -> list[str]:
        """Names of lost workers being restarted: the job may wait for them."""
        ...

    def kill(self, url: str) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class LocalWorkerConfig:
    """How local workers are started: the model they load and what fixes their output."""

    model: str
    scale: float | None = None
    tile: int | None = None
    precision: str | None = None
    backend: str = "torch"

    def worker_args(self, shared_root: Path) -> list[str]:
        args = ["--shared-root", str(shared_root), "--model", self.model]
        if self.backend != "torch":
            args += ["--backend", self.backend]
        if self.scale is not None:
            args += ["--scale", f"{self.scale:g}"]
        if self.tile is not None:
            args += ["--tile", str(self.tile)]
        if self.precision is not None:
            args += ["--precision", self.precision]
        return args


class Dispatch(enum.Enum):
    ACCEPTED = "accepted"  # the worker took the manifest (202)
    BUSY = "busy"  # 409: it is processing another manifest; it backs off and the batches wait
    REFUSED = "refused"  # anything else: the worker is lost


@dataclass(eq=False)  # one object per worker: compared and hashed by identity
class WorkerHandle:
    """The fleet's view of one worker."""

    url: str
    client: WorkerClient
    health: Health | None = None  # its last /health answer
    alive: bool = True
    lost_reason: str | None = None
    unreachable_since: float | None = None  # loop time of the first failed health check in a row
    holding: str | None = None  # the manifest id it holds for a job of this fleet
    busy_until: float = 0.0  # loop time before which it is not dealt to (after a 409)
    backoff_s: float = 0.0
    changes: int = 0  # dispatches and releases so far: a /health answer older than one says nothing

    @property
    def worker_id(self) -> str:
        return (self.health.worker_id if self.health else None) or self.url

    @property
    def ready(self) -> bool:
        return self.alive and self.health is not None

    @property
    def model(self) -> str | None:
        return self.health.model if self.health else None

    @property
    def scale(self) -> float | None:
        return self.health.scale if self.health else None

    @property
    def backend(self) -> str:
        """Its backend, as its /health names it (a worker from before backends existed: torch)."""
        return self.health.backend if self.health else "torch"

    def serves(self, model: str, backend: str = "torch") -> bool:
        """It runs ``model`` on ``backend``: a job's workers all run one backend (their outputs differ)."""
        return self.model in {model, Path(model).stem} and self.backend == backend

    @property
    def transports(self) -> tuple[str, ...]:
        """The transports its /health names (a worker from before them: frames only)."""
        return self.health.transports if self.health is not None else (FRAMES_TRANSPORT,)

    @property
    def storage_error(self) -> str | None:
        """Why the worker cannot write the shared root, as its last /health says; None if it can."""
        if self.health is None or self.health.storage_writable:
            return None
        return self.health.storage_error or "the shared storage is not writable from it"

    @property
    def busy_elsewhere(self) -> bool:
        """Its last /health shows a manifest this fleet did not give it (another coordinator's)."""
        return self.holding is None and self.health is not None and self.health.state == "processing"

    def now_in_state(self, state: str) -> None:
        """What this fleet did (dispatched, released) makes its state ``state`` until it answers again."""
        if self.health is not None:
            self.health = msgspec.structs.replace(self.health, state=state)


class WorkerFleet:
    """The workers of a farm; see the module docstring. Use ``async with`` or start()/close()."""

    def __init__(
        self,
        farm: FarmSettings,
        *,
        local: LocalWorkerConfig | None = None,
        clients: Sequence[WorkerClient] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        if clients is None and not farm.workers and local is None:
            raise ValueError("a fleet of local workers needs their LocalWorkerConfig")
        self.farm = farm
        self.local = local
        self.run_dir = run_dir
        self.handles: dict[str, WorkerHandle] = {}
        self.pool: WorkerPool | None = None
        self._given_clients = list(clients) if clients is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = farm.token
        # URLs that joined after start and have not answered /health yet -> when they joined (monotonic)
        self._joining: dict[str, float] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._model_checked = False

    async def __aenter__(self) -> WorkerFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- life -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start local workers (or take the given ones) and the health round. Idempotent; a
        concurrent caller waits for the first. Raises :class:`WorkerStartError`."""
        if self._started is not None:
            return await asyncio.shield(self._started)
        self._started = asyncio.get_running_loop().create_future()
        try:
            for client in await self._clients():
                self.handles[client.url] = WorkerHandle(client.url, client)
        except asyncio.CancelledError:
            self._started.cancel()
            raise
        except BaseException as exc:
            self._started.set_exception(exc)
            self._started.exception()  # retrieved: the caller gets it raised here
            raise
        self._started.set_result(None)
        self._health_task = asyncio.create_task(self._health_rounds())

    async def _clients(self) -> list[WorkerClient]:
        if self._given_clients is not None:
            return self._given_clients
        farm = self.farm
        self._session = aiohttp.ClientSession()
        self._token = farm.token
        urls = list(farm.workers)
        if not urls:
            assert self.local is not None
            run_dir = self.run_dir or farm.root / "workers"
            args = [*self.local.worker_args(farm.root), *farm.local_worker_args]
            if farm.ray_address is not None:
                if self.local.backend != "torch":  # Ray places actors by CUDA GPUs, not Vulkan devices
                    raise FleetError(
                        f"Ray starts torch workers only; for the {self.local.backend} backend start the "
                        "workers on each host (esrfarm worker --backend ...) and pass their URLs"
                    )
                urls = await self._start_ray_pool(run_dir, args)
            else:
                await self.check_model()
                ncnn = self.local.backend == "ncnn"  # Vulkan devices are not counted here: one worker
                gpus = 0 if ncnn else visible_gpu_count()
                count = farm.local_workers or max(gpus, 1)
                pool = LocalWorkerPool(run_dir, args, backend=self.local.backend)
                self.pool = pool
                urls = await pool.start(count, gpus, farm.startup_timeout_s)
        return [self._client(u) for u in urls]

    async def check_model(self) -> None:
        """Raise :class:`ModelError` (one line) if the local workers' model is unknown or its file does
        not exist: before any worker starts, and before a job makes its directory. Checked once; a
        fleet of workers already running, or of Ray actors on other nodes, is not checked here."""
        if self._model_checked or self.local is None or self.farm.workers or self.farm.ray_address:
            return
        await check_model(self.local.model)
        self._model_checked = True

    async def _start_ray_pool(self, run_dir: Path, args: list[str]) -> list[str]:
        """Worker actors on the Ray cluster of ``farm.ray_address``. Their workers bind their node's
        address, so they need a token: without one, this run makes its own."""
        from coordinator.ray_fleet import RayWorkerPool  # ray is imported only for --ray

        farm = self.farm
        assert farm.ray_address is not None
        self._token = self._token or secrets.token_urlsafe(32)
        pool = RayWorkerPool(
            farm.ray_address, farm.ray_workers, args, run_dir, self._token, farm.startup_timeout_s
        )
        self.pool = pool
        return await pool.start()

    def _client(self, url: str) -> HttpWorkerClient:
        assert self._session is not None
        return HttpWorkerClient(url, self._session, self._token, self.farm.request_timeout_s)

    def replacing(self) -> list[str]:
        """Workers to wait for, not gone yet: lost ones the pool is bringing back (restarting Ray
        actors), and ones that joined (a restarted actor's new URL) but have not answered /health yet,
        for at most ``startup_timeout_s`` from their joining."""
        now = time.monotonic()
        coming = [u for u, t in self._joining.items() if now - t < self.farm.startup_timeout_s]
        return (self.pool.replacing() if self.pool is not None else []) + coming

    async def close(self) -> None:
        """Stop the health round and the local workers; close the HTTP session."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self.pool is not None:
            await self.pool.stop()
        if self._session is not None:
            await self._session.close()

    # -- readiness --------------------------------------------------------------------------------

    async def wait_ready(self, model: str, backend: str = "torch") -> list[WorkerHandle]:
        """The workers that answer /health with ``model`` on ``backend``, once each has answered or given up.

        A worker still loading its model (503), or a local one, gets ``startup_timeout_s``; a remote
        one that does not answer at all gets ``unreachable_after_s``. A worker that runs another
        model or backend is not lost (another job may want it), only not used for this one. Raises
        :class:`NoWorkerError` with what each worker answered if none serves ``model`` on ``backend``.
        """
        await self.start()
        farm = self.farm
        loop = asyncio.get_running_loop()
        started = loop.time()
        problems: dict[str, str] = {}
        answered: set[str] = set()
        pending = {url for url, h in self.handles.items() if h.alive and h.health is None}
        while pending:
            for url in sorted(pending):
                handle = self.handles[url]
                try:
                    handle.health = await handle.client.health()
                except WorkerRequestError as exc:
                    problems[url] = str(exc)
                    if exc.status is not None:
                        answered.add(url)
                    gone = self._exit_reason(url)
                    local = self.pool is not None
                    patience = (
                        farm.startup_timeout_s if local or url in answered else farm.unreachable_after_s
                    )
                    if gone is not None:
                        self.lose(handle, gone)
                        problems[url] = gone
                        pending.discard(url)
                    elif loop.time() - started > patience:
                        pending.discard(url)
                    continue
                pending.discard(url)
                problems.pop(url, None)
            if pending:
                await asyncio.sleep(farm.poll_interval_s)
        ready = [h for h in self.handles.values() if h.ready and h.serves(model, backend)]
        for handle in self.handles.values():
            if handle.ready and not handle.serves(model, handle.backend):
                problems[handle.url] = f"worker {handle.url} runs model {handle.model!r}, not {model!r}"
            elif handle.ready and handle.backend != backend:
                problems[handle.url] = (
                    f"worker {handle.url} runs the {handle.backend} backend, not {backend} "
                    "(one backend per job)"
                )
        for url, problem in problems.items():
            log.warning("not using worker %s: %s", url, problem)
        if not ready:
            raise NoWorkerError(problems)
        log.info("upscaling with %d worker(s): %s", len(ready), ", ".join(h.worker_id for h in ready))
        return ready

    # -- dealing ----------------------------------------------------------------------------------

    def serving(self, model: str, backend: str = "torch") -> list[WorkerHandle]:
        """Alive workers that run ``model`` on ``backend``."""
        return [h for h in self.handles.values() if h.ready and h.serves(model, backend)]

    def idle(self, model: str, backend: str = "torch") -> list[WorkerHandle]:
        """Workers a job of ``model`` on ``backend`` may deal a manifest to right now."""
        now = asyncio.get_running_loop().time()
        return [
            h
            for h in self.serving(model, backend)
            if h.holding is None and h.busy_until <= now and not h.busy_elsewhere and h.storage_error is None
        ]

    async def dispatch(self, handle: WorkerHandle, manifest_id: str, manifest_path: str) -> Dispatch:
        """Post ``manifest_path`` (relative to the shared root) to ``handle``'s worker."""
        if handle.holding is not None:
            raise ValueError(f"worker {handle.url} already holds manifest {handle.holding}")
        handle.holding = manifest_id  # before the await: no second job can deal to it meanwhile
        try:
            await handle.client.process_manifest(manifest_path)
        except WorkerBusyError:
            handle.holding = None
            base = self.farm.busy_backoff_s
            handle.backoff_s = min(max(2 * handle.backoff_s, base), 20 * base)
            handle.busy_until = asyncio.get_running_loop().time() + handle.backoff_s
            log.info("worker %s is busy; it gets nothing for %.2f s", handle.worker_id, handle.backoff_s)
            return Dispatch.BUSY
        except WorkerRequestError as exc:
            handle.holding = None
            self.lose(handle, f"refused {manifest_id}: {exc}")
            return Dispatch.REFUSED
        handle.backoff_s = 0.0
        handle.changes += 1
        handle.now_in_state("processing")
        return Dispatch.ACCEPTED

    def release(self, handle: WorkerHandle, manifest_id: str) -> None:
        """The manifest ended (its status is final, or the job gave it up)."""
        if handle.holding == manifest_id:
            handle.holding = None
            handle.changes += 1
            handle.now_in_state("idle")

    async def reset(self, handle: WorkerHandle) -> None:
        """Ask the worker to stop its manifest at the next batch boundary (errors are logged)."""
        if not handle.alive:
            return
        try:
            await handle.client.reset()
        except WorkerRequestError as exc:
            log.warning("could not reset worker %s: %s", handle.worker_id, exc)

    def lose(self, handle: WorkerHandle, reason: str) -> None:
        """Give up on a worker: nothing more goes to it; a local one is killed."""
        if not handle.alive:
            return
        handle.alive, handle.lost_reason = False, reason
        log.error("lost worker %s: %s", handle.worker_id, reason)
        if self.pool is not None:
            self.pool.kill(handle.url)

    async def revive_lost(self) -> list[WorkerHandle]:
        """Remote workers that were lost but answer ``/health`` again (restarted, say) are taken up
        again; returns them. For a fleet that outlives its jobs (the job service), called while no
        job runs. Local workers are never revived (a lost one was killed)."""
        if self.pool is not None:
            return []
        lost = [h for h in self.handles.values() if not h.alive]
        answers = await asyncio.gather(*(h.client.health() for h in lost), return_exceptions=True)
        revived = []
        for handle, answer in zip(lost, answers, strict=True):
            if isinstance(answer, Health):
                handle.alive, handle.lost_reason, handle.unreachable_since = True, None, None
                handle.health, handle.holding, handle.busy_until = answer, None, 0.0
                handle.changes += 1
                log.info("worker %s answers again; it is used again", handle.worker_id)
                revived.append(handle)
        return revived

    # -- health -----------------------------------------------------------------------------------

    async def _greet_joining(self) -> None:
        """A worker that joined is dealt to once it answers /health (it may still load its model);
        until then it is not lost for not answering: its pool reports it if its process dies."""
        joining = [self.handles[url] for url in sorted(self._joining)]
        results = await asyncio.gather(*(h.client.health() for h in joining), return_exceptions=True)
        for handle, result in zip(joining, results, strict=True):
            if not handle.alive:
                self._joining.pop(handle.url, None)
            elif isinstance(result, Health):
                handle.health = result
                self._joining.pop(handle.url, None)
                log.info("worker %s is ready", handle.worker_id)

    def _exit_reason(self, url: str) -> str | None:
        if self.pool is None:
            return None
        return self.pool.exited().get(url)

    async def _health_rounds(self) -> None:
        while True:
            await asyncio.sleep(self.farm.health_interval_s)
            try:
                await self.health_round()
            except Exception:  # the round must go on: without it no worker is ever lost
                log.exception("health round failed")

    async def health_round(self) -> None:
        """One round: exited workers and workers unreachable for too long are lost, workers that came
        back on a new URL join."""
        loop = asyncio.get_running_loop()
        if self.pool is not None:
            for url, reason in self.pool.exited().items():
                if url in self.handles:
                    self.lose(self.handles[url], reason)
            for url in self.pool.joined():
                log.info("worker %s joined", url)
                self.handles[url] = WorkerHandle(url, self._client(url))
                self._joining[url] = time.monotonic()
        await self._greet_joining()
        handles = [h for h in self.handles.values() if h.ready]  # wait_ready() watches the others
        changes = [h.changes for h in handles]
        results = await asyncio.gather(*(h.client.health() for h in handles), return_exceptions=True)
        now = loop.time()
        for handle, before, result in zip(handles, changes, results, strict=True):
            if isinstance(result, Health):
                handle.unreachable_since = None
                if handle.changes != before and handle.health is not None:
                    # dispatched or released meanwhile: its state is ours
                    result = msgspec.structs.replace(result, state=handle.health.state)
                handle.health = result
            elif isinstance(result, WorkerRequestError) and result.status is not None:
                handle.unreachable_since = None  # it answers (503 while it reloads, say): not lost
            elif handle.unreachable_since is None:
                log.warning("health check of %s failed: %s", handle.worker_id, result)
                handle.unreachable_since = now
            elif now - handle.unreachable_since > self.farm.unreachable_after_s:
                self.lose(handle, f"/health unreachable for {now - handle.unreachable_since:.0f} s")
