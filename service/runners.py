"""How the scheduler runs a job, whatever its kind: a :class:`JobRunner` (start, events, cancel,
wait). Two kinds implement it: :class:`UpscaleRunner` (the coordinator's :class:`~coordinator.job.Job`
on the shared fleet) and :class:`service.comparisons.CompareProcess` (``esrfarm compare`` in a child
process).

A runner tells the scheduler what to store through two events, :class:`Began` and :class:`Advanced`,
and ends with :meth:`JobRunner.wait`: a :class:`RunResult`, or one of the service's run errors
(:class:`~service.errors.RunCancelledError`, :class:`~service.errors.RetryableError`, or another
:class:`~service.errors.RunError`), which is where each kind's own errors are translated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from coordinator.errors import EXPECTED_ERRORS, FleetError, JobCancelledError, WorkersLostError
from coordinator.events import Finished, Progress, Stage, Started
from coordinator.fleet import WorkerFleet
from coordinator.job import Job
from coordinator.spec import JobSpec
from service.errors import RetryableError, RunCancelledError, RunError
from service.store import JobRow

#: Stages whose counts are frames (joining counts segments; probing and loading count nothing).
FRAME_STAGES = {Stage.EXTRACTING.value, Stage.UPSCALING.value, Stage.ENCODING.value}


@dataclass(frozen=True)
class Began:
    """The job has its directory and knows its size (an upscaling job, once probed)."""

    frames_total: int
    job_dir: Path


@dataclass(frozen=True)
class Advanced:
    """Progress within ``stage``: ``done`` of ``total`` (frames, when ``counts_frames``)."""

    stage: str
    done: int
    total: int
    counts_frames: bool
    fps: float | None = None
    eta_s: float | None = None


RunEvent = Began | Advanced


@dataclass(frozen=True)
class RunResult:
    """What a finished run did: ``done`` (the job's ``frames_done``: frames, or a comparison's
    models) and ``frames_upscaled`` (for the service's frame counter)."""

    done: int
    frames_upscaled: int


class JobRunner(Protocol):
    """One run of one job. ``on_start``: the values stored as it starts running."""

    on_start: Mapping[str, Any]

    async def start(self) -> None: ...

    def events(self) -> AsyncIterator[RunEvent]:
        """What happens, in order, until the run ends (then :meth:`wait` says how)."""
        ...

    async def cancel(self) -> None:
        """Stop the run (at any instant, before it starts too); :meth:`wait` then raises
        :class:`RunCancelledError`. Returns once it has stopped."""
        ...

    async def wait(self) -> RunResult: ...


class UpscaleRunner:
    """An upscaling job: the coordinator's job engine on the shared fleet."""

    on_start: Mapping[str, Any] = {"stage": None, "fps": None, "eta_s": None}

    def __init__(self, row: JobRow, fleet: WorkerFleet, progress_interval_s: float) -> None:
        self.row, self.fleet, self.progress_interval_s = row, fleet, progress_interval_s
        self.job: Job | None = None
        self.cancelled = False

    async def start(self) -> None:
        """Start the job; raises :class:`RunError` for a stored spec this version cannot read."""
        if self.cancelled:
            raise RunCancelledError(f"job {self.row.id} was cancelled before it started")
        try:
            spec = JobSpec.from_dict(self.row.spec_dict)
        except EXPECTED_ERRORS as exc:
            raise RunError(str(exc)) from None
        self.job = Job(spec, self.fleet, progress_interval_s=self.progress_interval_s).start()

    async def events(self) -> AsyncIterator[RunEvent]:
        assert self.job is not None, "start() first"
        try:
            async for event in self.job.events():
                if isinstance(event, Started):
                    yield Began(event.frames, event.job_dir)
                elif isinstance(event, Progress):
                    counts = event.stage in FRAME_STAGES
                    fps = event.fps or None
                    yield Advanced(event.stage, event.done, event.total, counts, fps, event.eta_s)
                elif isinstance(event, Finished):
                    return
        except EXPECTED_ERRORS as exc:
            raise self._run_error(exc) from exc

    async def cancel(self) -> None:
        self.cancelled = True
        if self.job is not None:
            await self.job.cancel()

    async def wait(self) -> RunResult:
        assert self.job is not None, "start() first"
        try:
            result = await self.job.wait()
        except EXPECTED_ERRORS as exc:
            raise self._run_error(exc) from exc
        return RunResult(done=result.frames, frames_upscaled=result.frames)

    def _run_error(self, exc: Exception) -> RunError:
        """The coordinator's error as the service's: cancelled, retryable (the workers failed it: a
        :class:`FleetError`, or :class:`WorkersLostError`: none left, or a batch failing with no other
        worker to retry it) or final."""
        if isinstance(exc, JobCancelledError):
            return RunCancelledError(str(exc))
        if isinstance(exc, FleetError | WorkersLostError):
            return RetryableError(str(exc))
        return RunError(str(exc))
