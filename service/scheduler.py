"""The scheduler: queued jobs from the store, run by the coordinator's job engine on one shared fleet.

- Up to ``max_running`` jobs run at once on one :class:`coordinator.fleet.WorkerFleet` (the fleet
  gives each worker at most one manifest, so jobs never collide on a worker); which ones start is
  :func:`service.policy.plan_starts`.
- **Local workers** run one model: the fleet is started with the model of the job first in line,
  and restarted with another once the jobs of its model are done (grouped, so it switches rarely).
  A fleet that lost a worker, or could not start, is started afresh before the next job.
- **Remote workers** keep their models: a job goes only to workers running its model
  (:meth:`Scheduler.check_model` refuses, at submit, a model no worker runs). A worker the fleet
  lost is looked at again once no job runs (it may have been restarted).
- **Restart**: jobs a killed service left ``running`` are queued again and resume (the same spec
  finds the same job directory).
- Every job runs through one interface, :class:`service.runners.JobRunner` (start, events, cancel,
  wait): :class:`~service.runners.UpscaleRunner` for upscaling jobs, :class:`CompareProcess` for
  comparison jobs, which do not use the fleet: one at a time, beside the upscaling jobs.
- **Cancel**: the runner's (upscaling: no new batches, workers reset, ffmpeg killed, the output
  never written; comparison: the child killed); the job is ``cancelled`` and ``retry`` resumes it.
  A stopping service cancels every run and queues it again.
- A run that fails with :class:`~service.errors.RetryableError` (its workers failed: lost, could not
  start) is queued again, up to ``max_attempts`` runs; any other failure is final, with the
  runner's one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.fleet import LocalWorkerConfig, WorkerFleet, WorkerHandle
from coordinator.spec import FarmSettings
from manifests.health import Health
from manifests.layout import JobLayout
from manifests.status import Status
from service.comparisons import CompareProcess, is_compare
from service.errors import ModelUnavailableError, RetryableError, RunCancelledError, RunError
from service.metrics import ServiceMetrics
from service.policy import Queued, plan_starts
from service.runners import Began, JobRunner, RunEvent, UpscaleRunner
from service.store import JobRow, JobState, Store, StoreUnavailableError, now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerSettings:
    max_running: int = 2
    max_attempts: int = 2  # runs of a job whose workers failed it
    progress_interval_s: float = 0.5  # most one progress update per job this often (SSE, store)
    idle_poll_s: float = 1.0
    store_retry_s: float = 1.0  # how often a change the database refused is tried again
    compare_device: str = "auto"  # --device of comparison jobs
    compare_args: tuple[str, ...] = ()  # more flags for them (e.g. --cpu-threads=2)

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be at least 1, not {self.max_running}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")


def _same_job(row: JobRow) -> tuple[object, ...]:
    """What makes two queued jobs the same coordinator job (one job directory, one lock)."""
    return (row.input, row.model, row.scale, _backend(row))


def _backend(row: JobRow) -> str:
    return str(row.spec_dict.get("backend") or "torch")


def _workers_for(row: JobRow) -> str:
    """The local workers a job needs, as the policy groups jobs: its model, on its backend if not torch."""
    backend = _backend(row)
    return row.model if backend == "torch" else f"{row.model} [{backend}]"


@dataclass(eq=False)
class _Run:
    """A job the scheduler runs: its runner (an upscaling or a comparison job), its task, and what
    its progress throttle remembers."""

    runner: JobRunner
    key: tuple[object, ...]  # _same_job: no two runs of one coordinator job at once
    on_fleet: bool  # it runs on the fleet (an upscaling job), not beside it (a comparison)
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False  # by a user: cancelled; otherwise (shutdown) queued again
    last_write: float = 0.0
    last_stage: str | None = None


@dataclass
class Scheduler:
    store: Store
    farm: FarmSettings
    settings: SchedulerSettings = field(default_factory=SchedulerSettings)
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    def __post_init__(self) -> None:
        self.local = not self.farm.workers
        self.fleet: WorkerFleet | None = None
        self.fleet_model: str | None = None
        self._fleet_start: asyncio.Future[None] | None = None
        self._runs: dict[str, _Run] = {}  # by job id, every kind
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- life -------------------------------------------------------------------------------------

    async def start(self) -> None:
        requeued = await self.store.requeue_running()
        if requeued:
            log.info("queued again the job(s) a stopped service left running: %s", ", ".join(requeued))
        if not self.local and self.fleet is None:  # (a test gives one of in-process workers)
            self._use_fleet(WorkerFleet(self.farm), None)
        self._loop_task = asyncio.create_task(self._loop(), name="esrfarm-scheduler")

    async def close(self) -> None:
        """Stop: running jobs are cancelled and queued again (the next start resumes them)."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        runs = list(self._runs.values())
        await asyncio.gather(*(run.runner.cancel() for run in runs), return_exceptions=True)
        await asyncio.gather(*(run.task for run in runs if run.task is not None), return_exceptions=True)
        await self._close_fleet()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while not self._closing:  # besides the cancel: Python 3.11's wait_for can swallow one
            self._wake.clear()
            try:
                await self._schedule()
            except StoreUnavailableError as exc:  # no job is started meanwhile; the next turn tries again
                log.warning("cannot schedule: %s", exc)
            except Exception:  # the queue must go on
                log.exception("scheduling failed")
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({woken}, timeout=self.settings.idle_poll_s)
            finally:
                woken.cancel()

    async def _schedule(self) -> None:
        queued = [j for j in await self.store.jobs(JobState.QUEUED) if j.id not in self._runs]
        if self._closing:
            return
        comparisons = [j for j in queued if is_compare(j)]
        if comparisons and all(run.on_fleet for run in self._runs.values()):  # one at a time, beside
            self._start(comparisons[0], self._comparison_runner)
        on_fleet = [run for run in self._runs.values() if run.on_fleet]
        queued = [j for j in queued if not is_compare(j)]
        slots = self.settings.max_running - len(on_fleet)
        if slots <= 0 or not queued:
            return
        if not on_fleet and self.fleet is not None and self._fleet_broken():
            if self.local:
                log.warning("the local workers of model %s failed; starting them afresh", self.fleet_model)
                await self._close_fleet()
            else:  # a lost remote worker may be back (restarted by systemd, say)
                await self.fleet.revive_lost()
        needs = {_workers_for(j): (j.model, _backend(j)) for j in queued}
        plan = plan_starts(
            [Queued(j.id, _workers_for(j), j.priority, _same_job(j)) for j in queued],
            slots=slots,
            running=len(on_fleet),
            fleet_model=self.fleet_model if self.fleet is not None else None,
            one_model=self.local,
            running_keys={run.key for run in on_fleet},
        )
        if plan.switch_to is not None:
            await self._close_fleet()
            log.info("starting local workers with model %s", plan.switch_to)
            run_dir = self.farm.root / "workers" / f"service-{os.getpid()}"
            model, backend = needs[plan.switch_to]
            self._use_fleet(
                WorkerFleet(self.farm, local=LocalWorkerConfig(model, backend=backend), run_dir=run_dir),
                plan.switch_to,
            )
        by_id = {j.id: j for j in queued}
        for job_id in plan.start:
            self._start(by_id[job_id], self._upscale_runner)

    # -- the fleet --------------------------------------------------------------------------------

    def _use_fleet(self, fleet: WorkerFleet, model: str | None) -> None:
        self.fleet, self.fleet_model = fleet, model
        self._fleet_start = asyncio.ensure_future(fleet.start())  # models load while jobs probe
        self._fleet_start.add_done_callback(_retrieve)

    def _fleet_broken(self) -> bool:
        assert self.fleet is not None
        start = self._fleet_start
        if start is not None and start.done() and (start.cancelled() or start.exception() is not None):
            return True
        return any(not h.alive for h in self.fleet.handles.values())

    async def _close_fleet(self) -> None:
        fleet, self.fleet, self.fleet_model = self.fleet, None, None
        if self._fleet_start is not None:
            self._fleet_start.cancel()
            await asyncio.gather(self._fleet_start, return_exceptions=True)
            self._fleet_start = None
        if fleet is not None:
            await fleet.close()

    async def check_model(self, model: str, backend: str = "torch") -> None:
        """Remote workers: raise :class:`ModelUnavailableError` unless some worker runs ``model`` on
        ``backend``. (Local workers are started with whatever model and backend a job needs.)"""
        if self.local:
            return
        fleet = self.fleet
        assert fleet is not None
        if self._fleet_start is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._fleet_start)
        unknown = [h for h in fleet.handles.values() if h.alive and h.health is None]
        answers = await asyncio.gather(*(h.client.health() for h in unknown), return_exceptions=True)
        for handle, answer in zip(unknown, answers, strict=True):
            if isinstance(answer, Health) and handle.changes == 0:
                handle.health = answer
        if any(h.ready and h.serves(model, backend) for h in fleet.handles.values()):
            return
        served = sorted({f"{h.model} ({h.backend})" for h in fleet.handles.values() if h.ready and h.model})
        runs = f"the workers run {', '.join(served)}" if served else "no worker answers"
        raise ModelUnavailableError(f"no worker runs model {model!r} on the {backend} backend ({runs})")

    async def workers(self) -> list[dict[str, Any]]:
        """Each worker of the fleet: state, model, GPU memory and the batch it is on."""
        fleet = self.fleet
        if fleet is None:
            return []
        handles = list(fleet.handles.values())
        batches = await asyncio.to_thread(lambda: [_current_batch(fleet.farm.root, h) for h in handles])
        result = []
        for handle, batch in zip(handles, batches, strict=True):
            health = handle.health
            memory = health.gpu_memory if health else None
            state = (health.state if health else "starting") if handle.alive else "lost"
            result.append(
                {
                    "url": handle.url, "state": state, "model": handle.model,
                    "gpu_memory_used": memory.used if memory else None,
                    "gpu_memory_total": memory.total if memory else None,
                    "batch": batch,
                }
            )  # fmt: skip
        return result

    # -- jobs -------------------------------------------------------------------------------------

    def _upscale_runner(self, row: JobRow) -> JobRunner:
        assert self.fleet is not None
        return UpscaleRunner(row, self.fleet, self.settings.progress_interval_s)

    def _comparison_runner(self, row: JobRow) -> JobRunner:
        return CompareProcess(row, self.settings.compare_device, self.settings.compare_args)

    def _start(self, row: JobRow, runner_for: Callable[[JobRow], JobRunner]) -> None:
        """Run ``row`` with the runner ``runner_for`` makes, in a task of its own. Registered before
        any await: a cancel from now on finds the run (and waits for its task)."""
        run = _Run(runner_for(row), _same_job(row), on_fleet=not is_compare(row))
        self._runs[row.id] = run
        run.task = asyncio.create_task(self._drive(row, run), name=f"esrfarm-job-{row.id}")

    async def _drive(self, queued: JobRow, run: _Run) -> None:
        job_id = queued.id
        started: dict[str, Any] = {
            "state": JobState.RUNNING, "started_at": queued.started_at or now(),
            "attempts": queued.attempts + 1, **run.runner.on_start,
        }  # fmt: skip
        try:
            try:
                row = await self.store.update(job_id, only_if=[JobState.QUEUED], **started)
            except StoreUnavailableError as exc:  # it stays queued: the next turn of the loop tries again
                log.warning("job %s: not started: %s", job_id, exc)
                return
            if row is None:  # cancelled or deleted meanwhile
                return
            log.info("started %s job %s (%s, model %s)", row.kind, job_id, row.input, row.model)
            await self._run(row, run)
        finally:
            self._runs.pop(job_id, None)
            self.wake()

    async def _run(self, row: JobRow, run: _Run) -> None:
        """Run it to its end, and store that end."""
        job_id = row.id
        try:
            await run.runner.start()
            async for event in run.runner.events():
                await self._take_event(job_id, run, event)
            result = await run.runner.wait()
        except RunCancelledError:
            if run.cancel_requested:
                await self._end(job_id, JobState.CANCELLED)
            else:  # the service is stopping: the job waits for the next start, and resumes
                await self._record(job_id, state=JobState.QUEUED, stage=None, fps=None, eta_s=None)
        except RetryableError as exc:
            if row.attempts < self.settings.max_attempts and not self._closing:
                log.warning("job %s: %s; queued again", job_id, exc)
                await self._record(job_id, state=JobState.QUEUED, error=str(exc))
            else:
                await self._end(job_id, JobState.FAILED, error=str(exc))
        except RunError as exc:
            await self._end(job_id, JobState.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            await self._end(job_id, JobState.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            ended = await self._end(job_id, JobState.DONE, frames_done=result.done)
            if ended is not None:
                self.metrics.frames.inc(result.frames_upscaled)
                if ended.duration_s is not None:
                    self.metrics.job_duration.observe(ended.duration_s)

    async def _record(self, job_id: str, **values: Any) -> JobRow | None:
        """A change of a job's state, which must be stored: while the database is unavailable (a
        lock held past its timeout, a full disk) it is tried again every ``store_retry_s``, so a
        job never fails for the store's sake. A stopping service gives up (the job is still
        ``running`` in the database: the next start queues it again)."""
        warned = False
        while True:
            try:
                return await self.store.update(job_id, **values)
            except StoreUnavailableError as exc:
                if self._closing:
                    log.warning("job %s: its %s is not recorded: %s", job_id, values.get("state"), exc)
                    return None
                if not warned:
                    log.warning(
                        "job %s: %s; trying again every %g s", job_id, exc, self.settings.store_retry_s
                    )
                    warned = True
            await asyncio.sleep(self.settings.store_retry_s)

    async def _note(self, job_id: str, **values: Any) -> None:
        """Progress, which may be lost: while the database is unavailable the job goes on without it."""
        try:
            await self.store.update(job_id, **values)
        except StoreUnavailableError as exc:
            log.warning("job %s: progress not recorded: %s", job_id, exc)

    async def _take_event(self, job_id: str, run: _Run, event: RunEvent) -> None:
        if isinstance(event, Began):
            job_dir = str(event.job_dir)
            await self._record(job_id, frames_total=event.frames_total, job_dir=job_dir, error=None)
            return
        moment = time.monotonic()
        last_of_stage = event.total > 0 and event.done >= event.total
        if (
            event.stage == run.last_stage
            and not last_of_stage
            and moment - run.last_write < self.settings.progress_interval_s
        ):
            return
        run.last_write, run.last_stage = moment, event.stage
        values: dict[str, Any] = {"stage": event.stage, "fps": event.fps, "eta_s": event.eta_s}
        if event.counts_frames:
            values.update(frames_done=event.done, frames_total=event.total)
        await self._note(job_id, **values)

    async def _end(self, job_id: str, state: JobState, **values: Any) -> JobRow | None:
        row = await self._record(
            job_id, state=state, finished_at=now(), fps=None, eta_s=None, stage=None, **values
        )
        self.metrics.jobs_ended.labels(state.value).inc()
        return row

    async def cancel(self, job_id: str) -> JobRow | None:
        """Cancel a queued or running job; returns its row (None if it is neither)."""
        run = self._runs.get(job_id)
        if run is None:
            row = await self.store.update(
                job_id, only_if=[JobState.QUEUED], state=JobState.CANCELLED, finished_at=now()
            )
            if row is not None:
                self.metrics.jobs_ended.labels(JobState.CANCELLED.value).inc()
                return row
            run = self._runs.get(job_id)  # it may have started meanwhile
            if run is None:
                return None
        run.cancel_requested = True
        await run.runner.cancel()
        if run.task is not None:
            await asyncio.gather(run.task, return_exceptions=True)
        return await self.store.get(job_id)

    async def retry(self, job_id: str) -> JobRow | None:
        """Queue a failed or cancelled job again (it resumes from its job directory)."""
        row = await self.store.update(
            job_id,
            only_if=[JobState.FAILED, JobState.CANCELLED],
            state=JobState.QUEUED,
            error=None,
            stage=None,
            attempts=0,
            started_at=None,
            finished_at=None,
        )
        if row is not None:
            self.wake()
        return row

    def is_running(self, job_id: str) -> bool:
        return job_id in self._runs


def _current_batch(root: Path, handle: WorkerHandle) -> int | None:
    """The batch the worker's status file says it is on, if it holds a manifest now."""
    health = handle.health
    job_id, manifest_id = (health.job_id, health.manifest_id) if health else (None, None)
    if job_id is None or manifest_id is None or not handle.alive:
        return None
    try:
        path = JobLayout(root, job_id).status_path(manifest_id)
        return Status.from_json(path.read_bytes(), source=path).current_batch
    except Exception:  # a status being replaced, a job gone: no batch to show
        return None


def _retrieve(future: asyncio.Future[None]) -> None:
    """A fleet that cannot start fails its jobs (each says why); the future's error is read here."""
    if not future.cancelled():
        future.exception()
