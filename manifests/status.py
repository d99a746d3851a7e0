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
from pathlib import Path
from typing import Any

import msgspec

from manifests.jsonio import write_json_atomic
from manifests.records import Count, Document, NonEmpty, Record

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


class BatchError(Record):
    """Why a batch failed; ``frame`` is the frame at fault, or None when the whole batch failed."""

    KIND = _KIND

    batch_id: Count
    frame: Count | None
    reason: NonEmpty

    def __str__(self) -> str:
        at = f", frame {self.frame}" if self.frame is not None else ""
        return f"batch {self.batch_id}{at}: {self.reason}"


class WorkerIdentity(Record):
    KIND = _KIND

    worker_id: NonEmpty
    host: NonEmpty
    pid: Count
    gpu: str | None = (
        None  # the GPU as the host names it (CUDA_VISIBLE_DEVICES entry or index); None on the CPU
    )
    device: str | None = None  # human-readable device name


class Status(Document, kw_only=True):
    """What one worker has done with one manifest. ``batches_done`` is written for readers; it is
    always the length of ``done_batches`` (None when built: counted)."""

    KIND = _KIND
    FORMAT = STATUS_FORMAT

    state: WorkerState
    job_id: str | None = None
    manifest_id: str | None = None
    worker: WorkerIdentity
    batches_total: Count = 0
    batches_done: Count | None = None
    done_batches: tuple[Count, ...] = ()
    current_batch: Count | None = None
    frames_total: Count = 0
    frames_done: Count = 0
    errors: tuple[BatchError, ...] = ()
    started_at: float | None = None
    updated_at: float
    finished_at: float | None = None
    message: str | None = None

    def _check(self) -> None:
        self.state = WorkerState(self.state)
        self.done_batches, self.errors = tuple(self.done_batches), tuple(self.errors)
        done = len(self.done_batches)
        if self.batches_done is None:
            self.batches_done = done
        elif self.batches_done != done:
            raise self.fail("batches_done", f"is {self.batches_done} but done_batches lists {done} batch(es)")
        if len(set(self.done_batches)) != done:
            raise self.fail("done_batches", "lists a batch twice")
        if done > self.batches_total:
            raise self.fail(
                "done_batches", f"lists {done} batches, more than batches_total ({self.batches_total})"
            )
        if self.frames_done > self.frames_total:
            raise self.fail(
                "frames_done", f"is {self.frames_done}, more than frames_total ({self.frames_total})"
            )
        if self.state is WorkerState.COMPLETED and (done != self.batches_total or self.errors):
            raise self.fail("state", "is completed, but not every batch is done without error")
        if self.state is not WorkerState.IDLE and (self.job_id is None or self.manifest_id is None):
            raise self.fail("job_id", f"must be set when the state is {self.state.value}")
        failed = set(self.failed_batches).intersection(self.done_batches)
        if failed:
            raise self.fail("errors", f"names batch {min(failed)}, which done_batches also lists")

    @property
    def failed_batches(self) -> tuple[int, ...]:
        """Ids of the batches with at least one error, in the order they failed."""
        return tuple(dict.fromkeys(error.batch_id for error in self.errors))

    def evolve(self, **changes: Any) -> Status:
        """A copy with ``changes`` applied (validated again; ``batches_done`` counted again)."""
        return msgspec.structs.replace(self, batches_done=None, **changes)


def read_status(path: str | Path) -> Status:
    """Read and validate a status file.

    Raises ``OSError`` if it cannot be read, :class:`DocumentError` if it is not valid.
    """
    source = Path(path)
    return Status.from_json(source.read_bytes(), source=source)


def write_status_atomic(path: str | Path, status: Status) -> None:
    write_json_atomic(path, status.to_json())
