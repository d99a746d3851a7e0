"""What a running job tells whoever drives it: typed events, each one JSON-able.

``job.events()`` yields them in order; the last one is :class:`Finished`, :class:`Failed` or
:class:`Cancelled`. Progress is throttled (:class:`manifests.progress.ProgressThrottle`): a new
stage at once, the end of a stage once, otherwise a few times a second. ``esrfarm upscale --events
jsonl`` prints them one JSON object per line: ``{"event": "progress", "stage": "upscaling", ...}``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


class Stage(enum.StrEnum):
    """The stages a job shows, in order (extraction, upscaling and encoding overlap: a job is
    "upscaling" while any batch is left, then "encoding" while any segment is)."""

    PROBING = "probing"
    LOADING = "loading model"
    EXTRACTING = "extracting"
    UPSCALING = "upscaling"
    ENCODING = "encoding"
    JOINING = "joining"


@dataclass(frozen=True)
class JobResult:
    """A finished job: the output written, and where the time went."""

    job_id: str
    output: Path
    frames: int
    resumed: bool
    stats: dict[str, float]  # stage timings in seconds (see README: --stats)
    frames_found: int = 0  # of ``frames``, those an earlier run had upscaled already (a resumed job)

    @property
    def frames_upscaled(self) -> int:
        """Frames this run upscaled itself (what its rate counts)."""
        return self.frames - self.frames_found

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "output": str(self.output), "frames": self.frames,
            "resumed": self.resumed, "frames_found": self.frames_found, "stats": self.stats,
        }  # fmt: skip


@dataclass(frozen=True)
class JobEvent:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"event": self.kind}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, JobResult):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            values[item.name] = value
        return values


@dataclass(frozen=True)
class Started(JobEvent):
    """The job has its directory: ``frames`` in all; ``run`` counts the runs of this job (above 1: it
    resumes an earlier run's work, kept in ``job_dir``)."""

    kind: ClassVar[str] = "started"
    job_id: str
    job_dir: Path
    frames: int
    run: int


@dataclass(frozen=True)
class Progress(JobEvent):
    kind: ClassVar[str] = "progress"
    stage: str
    done: int
    total: int
    fps: float
    eta_s: float | None


@dataclass(frozen=True)
class WorkerLost(JobEvent):
    kind: ClassVar[str] = "worker_lost"
    worker: str
    reason: str
    batches_returned: int


@dataclass(frozen=True)
class BatchFailed(JobEvent):
    kind: ClassVar[str] = "batch_failed"
    batch_id: int
    frame: int | None
    worker: str
    reason: str


@dataclass(frozen=True)
class SegmentDone(JobEvent):
    kind: ClassVar[str] = "segment_done"
    index: int
    first_frame: int
    last_frame: int


@dataclass(frozen=True)
class Finished(JobEvent):
    kind: ClassVar[str] = "finished"
    result: JobResult


@dataclass(frozen=True)
class Failed(JobEvent):
    """The job failed: ``message`` is the one-line reason; the rest, where it applies, the
    ledger's failure data (the batch, its frames, each worker's reason)."""

    kind: ClassVar[str] = "failed"
    message: str
    job_dir: Path | None
    resumable: bool
    batch_id: int | None = None
    frames: tuple[int, ...] = ()
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Cancelled(JobEvent):
    kind: ClassVar[str] = "cancelled"
    job_dir: Path | None


TERMINAL = (Finished, Failed, Cancelled)
