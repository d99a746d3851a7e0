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
