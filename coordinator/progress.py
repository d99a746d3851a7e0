"""A job's progress meter: the counts a run keeps of its frames, and the throttled Progress events.

A job is "extracting" until its first batch reaches the ledger, "upscaling" while any batch is left,
then "encoding" while any segment is; each stage's rate (fps, ETA: :func:`manifests.progress.job_progress`)
counts only the frames of this run, from when that stage began. The frames runner keeps the counts
(:mod:`coordinator.frame_runner`, :mod:`coordinator.extraction`); the handle reports its own stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from coordinator.events import JobEvent, Progress, Stage
from manifests.chunkbook import ChunkBook, ChunkStage
from manifests.ledger import JobLedger
from manifests.progress import ProgressThrottle, job_progress


class ProgressMeter:
    def __init__(self, emit: Callable[[JobEvent], None], interval_s: float) -> None:
        self._emit = emit
        self._throttle = ProgressThrottle(interval_s)
        self.frames_found = 0  # frames of chunks an earlier run finished (upscaled or encoded)
        self.found_batch_frames = 0  # frames of batches found on disk and added to the ledger done
        self.frames_extracted = 0
        self._started_at = 0.0  # loop time the workers were ready
        self._encoding_from: tuple[float, int] | None = None  # (loop time, frames encoded) at its start

    @property
    def found(self) -> int:
        """Frames an earlier run had upscaled already."""
        return self.frames_found + self.found_batch_frames

    def report(
        self, stage: Stage, done: int, total: int, *, this_run: int = 0, elapsed_s: float = 0.0
    ) -> None:
        report = job_progress(
            stage.value, done=done, total=total, done_this_run=this_run, elapsed_s=elapsed_s
        )
        if self._throttle.admit(report, time.monotonic()):
            self._emit(Progress(report.stage, report.done, report.total, report.fps, report.eta_s))

    def workers_ready(self, now: float) -> None:
        """The upscaling rate counts from ``now`` (loop time): the workers have their model."""
        self._started_at = now

    def show(self, book: ChunkBook, ledger: JobLedger, *, total: int, upscaled: int, now: float) -> None:
        """Where the frames runner is: ``total`` frames in all, ``upscaled`` of them by the workers
        (fewer with --dedup); ``now`` is loop time."""
        if not book.all_upscaled:
            if not ledger.batches and not ledger.frames_forgotten and not self.frames_found:
                self.report(Stage.EXTRACTING, self.frames_extracted, total)
                return
            done = self.frames_found + ledger.frames_done
            this_run = ledger.frames_done - self.found_batch_frames
            self.report(Stage.UPSCALING, done, upscaled, this_run=this_run, elapsed_s=now - self._started_at)
        else:
            # The encoding stage's own rate: from when it began, not the upscaling's over the whole run.
            encoded = book.frames_in(ChunkStage.ENCODED)
            if self._encoding_from is None:
                self._encoding_from = (now, encoded)
            since, before = self._encoding_from
            self.report(Stage.ENCODING, encoded, total, this_run=encoded - before, elapsed_s=now - since)
