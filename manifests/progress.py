"""Progress of a job from its status files: frames done and total, throughput, time left."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from manifests.status import Status


@dataclass(frozen=True)
class Progress:
    done: int  # frames on disk, claimed by a status file
    total: int
    fps: float  # frames per second since the earliest start; 0.0 before any frame is done
    eta_s: float | None  # seconds left at that rate; 0.0 when done, None when unknown

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def progress(statuses: Iterable[Status], now: float, *, total: int | None = None) -> Progress:
    """Sum the frames of ``statuses`` and extrapolate.

    ``total`` overrides the sum of the statuses' ``frames_total``; pass the job's frame count when
    batches were re-dealt (their frames then appear in two manifests). The rate runs from the
    earliest ``started_at`` to ``now``, or to the last ``finished_at`` once every status is final.
    """
    items = list(statuses)
    done = sum(status.frames_done for status in items)
    total = sum(status.frames_total for status in items) if total is None else total
    remaining = max(total - done, 0)
    starts = [status.started_at for status in items if status.started_at is not None]
    fps = 0.0
    if starts and done:
        finished = [status.finished_at for status in items if status.finished_at is not None]
        all_final = len(finished) == len(items) and all(status.state.is_final for status in items)
        end = max(finished) if all_final else now
        elapsed = end - min(starts)
        if elapsed > 0:
            fps = done / elapsed
    if remaining == 0:
        eta: float | None = 0.0
    elif fps > 0:
        eta = remaining / fps
    else:
        eta = None
    return Progress(done=done, total=total, fps=fps, eta_s=eta)


@dataclass(frozen=True)
class JobProgress:
    """How far one job is in its current stage."""

    stage: str
    done: int  # units of the stage done (frames upscaled, frames encoded, segments joined)
    total: int
    fps: float  # frames per second of this run's own work; 0.0 before any
    eta_s: float | None  # seconds left at that rate; 0.0 when done, None when unknown


def job_progress(stage: str, *, done: int, total: int, done_this_run: int, elapsed_s: float) -> JobProgress:
    """Progress of a job that may have resumed: ``done`` counts what earlier runs did as well, the
    rate only ``done_this_run`` (work found on disk must not make a resumed job look fast)."""
    fps = done_this_run / elapsed_s if done_this_run > 0 and elapsed_s > 0 else 0.0
    remaining = max(total - done, 0)
    eta: float | None = 0.0 if remaining == 0 else (remaining / fps if fps > 0 else None)
    return JobProgress(stage=stage, done=done, total=total, fps=fps, eta_s=eta)


@dataclass
class ProgressThrottle:
    """Decides which progress reports to pass on: a new stage at once, the end of a stage once,
    anything else at most every ``interval_s``; a report that says nothing new never."""

    interval_s: float
    _last: JobProgress | None = None
    _last_at: float = 0.0

    def admit(self, report: JobProgress, now: float) -> bool:
        last = self._last
        if last is not None and last.stage == report.stage:
            if (last.done, last.total) == (report.done, report.total):
                return False
            if report.done < report.total and now - self._last_at < self.interval_s:
                return False
        self._last, self._last_at = report, now
        return True
