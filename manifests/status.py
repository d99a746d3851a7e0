"""The status file: what one worker has done with one manifest, replaced after every batch.

Example::

    {
      "format": "esrfarm.status/1",
      "state": "processing",            # idle | processing | completed | failed | cancelled
      "job_id": "clip-2024", "manifest_id": "w0",
      "worker": {"worker_id": "gpu-host-1:8090", "host": "gpu-host-1", "pid": 4242, "gpu": "0",
                 "device": "NVIDIA H100 80GB HBM3"},
      "batches_total": 12, "batches_done": 2, "done_batches": [0, 3],
      "current_batch": 6,
      "frames_total": 96, "frames_done": 16,
      "errors": [{"batch_id": 9, "frame": 73, "reason": "input frame input/00000073.png is missing"}],
      "started_at": 1718000000.0, "updated_at": 1718000004.2, "finished_at": null,
      "message": null
    }

A batch id appears in ``done_batches`` only once all its output frames are on disk.
``completed`` means every batch of the manifest is done; any failed batch makes the end state
``failed``; a manifest stopped early (``/reset``, SIGTERM) ends ``cancelled``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from manifests._fields import Fields, check_format, decode
from manifests.errors import DocumentError
from manifests.jsonio import dumps, write_json_atomic

STATUS_FORMAT = "esrfarm.status/1"
_KIND = "status"


class WorkerState(enum.StrEnum):
    IDLE = "idle"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in {WorkerState.COMPLETED, WorkerState.FAILED, WorkerState.CANCELLED}


@dataclass(frozen=True)
class BatchError:
    """Why a batch failed; ``frame`` is the frame at fault, or None when the whole batch failed."""

    batch_id: int
    frame: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "frame": self.frame, "reason": self.reason}

    def __str__(self) -> str:
        at = f", frame {self.frame}" if self.frame is not None else ""
        return f"batch {self.batch_id}{at}: {self.reason}"


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    host: str
    pid: int
    gpu: str | None = (
        None  # the GPU as the host names it (CUDA_VISIBLE_DEVICES entry or index); None on the CPU
    )
    device: str | None = None  # human-readable device name

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "gpu": self.gpu,
            "device": self.device,
        }


@dataclass(frozen=True)
class Status:
    state: WorkerState
    worker: WorkerIdentity
    updated_at: float
    job_id: str | None = None
    manifest_id: str | None = None
    batches_total: int = 0
    done_batches: tuple[int, ...] = ()
    current_batch: int | None = None
    frames_total: int = 0
    frames_done: int = 0
    errors: tuple[BatchError, ...] = ()
    started_at: float | None = None
    finished_at: float | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", WorkerState(self.state))
        object.__setattr__(self, "done_batches", tuple(self.done_batches))
        object.__setattr__(self, "errors", tuple(self.errors))
        _validate(self, source=None)

    @property
    def batches_done(self) -> int:
        return len(self.done_batches)

    @property
    def failed_batches(self) -> tuple[int, ...]:
        """Ids of the batches with at least one error, in the order they failed."""
        return tuple(dict.fromkeys(error.batch_id for error in self.errors))

    def evolve(self, **changes: Any) -> Status:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATUS_FORMAT,
            "state": self.state.value,
            "job_id": self.job_id,
            "manifest_id": self.manifest_id,
            "worker": self.worker.to_dict(),
            "batches_total": self.batches_total,
            "batches_done": self.batches_done,
            "done_batches": list(self.done_batches),
            "current_batch": self.current_batch,
            "frames_total": self.frames_total,
            "frames_done": self.frames_done,
            "errors": [error.to_dict() for error in self.errors],
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "message": self.message,
        }

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str | Path | None = None) -> Status:
        """Parse and validate; raises :class:`DocumentError` (or its :class:`FormatVersionError`)."""
        return cls.from_dict(decode(_KIND, data, source), source=source)

    @classmethod
    def from_dict(cls, document: dict[str, Any], *, source: str | Path | None = None) -> Status:
        check_format(_KIND, document, STATUS_FORMAT, source)
        f = Fields(_KIND, document, source=source)
        f.reject_unknown(
            {
                "format", "state", "job_id", "manifest_id", "worker", "batches_total", "batches_done",
                "done_batches", "current_batch", "frames_total", "frames_done", "errors", "started_at",
                "updated_at", "finished_at", "message",
            }
        )  # fmt: skip
        state = f.string("state")
        if state not in {member.value for member in WorkerState}:
            f.fail("state", f"must be one of {', '.join(m.value for m in WorkerState)}, not {state!r}")
        w = f.child("worker")
        w.reject_unknown({"worker_id", "host", "pid", "gpu", "device"})
        worker = WorkerIdentity(
            worker_id=w.string("worker_id"),
            host=w.string("host"),
            pid=w.integer("pid", minimum=0),
            gpu=w.opt_string("gpu"),
            device=w.opt_string("device"),
        )
        errors = []
        for e in f.objects("errors"):
            e.reject_unknown({"batch_id", "frame", "reason"})
            errors.append(
                BatchError(
                    e.integer("batch_id", minimum=0), e.opt_integer("frame", minimum=0), e.string("reason")
                )
            )
        done = f.int_list("done_batches")
        batches_done = f.opt_integer("batches_done")
        if batches_done is not None and batches_done != len(done):
            f.fail("batches_done", f"is {batches_done} but done_batches lists {len(done)} batch(es)")
        updated_at = f.opt_number("updated_at")
        if updated_at is None:
            f.fail("updated_at", "is missing")
        values = {
            "state": WorkerState(state),
            "worker": worker,
            "updated_at": updated_at,
            "job_id": f.opt_string("job_id"),
            "manifest_id": f.opt_string("manifest_id"),
            "batches_total": f.integer("batches_total", minimum=0),
            "done_batches": done,
            "current_batch": f.opt_integer("current_batch", minimum=0),
            "frames_total": f.integer("frames_total", minimum=0),
            "frames_done": f.integer("frames_done", minimum=0),
            "errors": tuple(errors),
            "started_at": f.opt_number("started_at"),
            "finished_at": f.opt_number("finished_at"),
            "message": f.opt_string("message"),
        }
        status = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(status, name, value)
        _validate(status, source=source)
        return status


def read_status(path: str | Path) -> Status:
    """Read and validate a status file.

    Raises ``OSError`` if it cannot be read, :class:`DocumentError` if it is not valid.
    """
    source = Path(path)
    return Status.from_json(source.read_bytes(), source=source)


def write_status_atomic(path: str | Path, status: Status) -> None:
    write_json_atomic(path, status.to_json())


def _validate(status: Status, *, source: str | Path | None) -> None:
    def fail(name: str, problem: str) -> None:
        raise DocumentError(_KIND, problem, source=source, field=name)

    if len(set(status.done_batches)) != len(status.done_batches):
        fail("done_batches", "lists a batch twice")
    if status.batches_done > status.batches_total:
        fail(
            "done_batches",
            f"lists {status.batches_done} batches, more than batches_total ({status.batches_total})",
        )
    if status.frames_done > status.frames_total:
        fail("frames_done", f"is {status.frames_done}, more than frames_total ({status.frames_total})")
    if status.state is WorkerState.COMPLETED and (
        status.batches_done != status.batches_total or status.errors
    ):
        fail("state", "is completed, but not every batch is done without error")
    if status.state is not WorkerState.IDLE and (status.job_id is None or status.manifest_id is None):
        fail("job_id", f"must be set when the state is {status.state.value}")
    failed = set(status.failed_batches).intersection(status.done_batches)
    if failed:
        fail("errors", f"names batch {min(failed)}, which done_batches also lists")
