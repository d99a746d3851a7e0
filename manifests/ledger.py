"""The coordinator's book of batches: who has what, what is done, what failed where.

Pure state, no I/O: the coordinator feeds it what it reads (status files, lost workers) and asks it
what to deal next. A batch is

- *pending* until it is dealt to a worker,
- *assigned* while a manifest dealt to a worker holds it,
- *done* once a status file claims it (the coordinator also checks the frames are on disk).

A failed batch goes back to pending, but is never dealt again to a worker it failed on. The job
fails when one batch has failed on ``max_failures`` different workers (2 by default), or when a
pending batch has no worker left that may take it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from manifests.manifest import Batch
from manifests.planner import redeal
from manifests.status import Status


@dataclass(frozen=True)
class JobFailure:
    """Why a job cannot finish. ``str`` reads as a sentence naming the batch, frames and reasons."""

    batch: Batch | None
    reasons: Mapping[str, str]  # worker id -> reason
    summary: str
    #: No worker is left to take the work (as opposed to work failing on every worker it was tried
    #: on): other workers, or the same ones restarted, may well finish it.
    workers_gone: bool = False

    def __str__(self) -> str:
        return self.summary


def _frames_text(batch: Batch) -> str:
    if batch.is_contiguous and len(batch) > 1:
        return f"frames {batch.frames[0]}-{batch.frames[-1]}"
    return "frame" + ("s " if len(batch) > 1 else " ") + ", ".join(map(str, batch.frames))


@dataclass
class JobLedger:
    batches: dict[int, Batch]
    max_failures: int = 2
    done: set[int] = field(default_factory=set)
    assigned: dict[int, str] = field(default_factory=dict)  # batch id -> manifest id
    manifests: dict[str, str] = field(default_factory=dict)  # manifest id -> worker id
    failures: dict[int, dict[str, str]] = field(default_factory=dict)  # batch id -> worker -> reason
    done_by: dict[int, str] = field(default_factory=dict)  # batch id -> worker id
    frames_forgotten: int = 0  # frames of done batches dropped by forget()

    @classmethod
    def for_batches(cls, batches: Iterable[Batch], *, max_failures: int = 2) -> JobLedger:
        table = {batch.id: batch for batch in batches}
        return cls(batches=table, max_failures=max_failures)

    # -- questions --------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.batches)

    @property
    def frames_total(self) -> int:
        return self.frames_forgotten + sum(len(batch) for batch in self.batches.values())

    @property
    def frames_done(self) -> int:
        return self.frames_forgotten + sum(len(self.batches[batch_id]) for batch_id in self.done)

    def pending(self) -> list[Batch]:
        """Batches neither done nor held by a worker, in batch-id order."""
        return [b for i, b in sorted(self.batches.items()) if i not in self.done and i not in self.assigned]

    def held_by(self, manifest_id: str) -> list[Batch]:
        return [self.batches[i] for i, m in sorted(self.assigned.items()) if m == manifest_id]

    def open_manifests(self, worker_id: str | None = None) -> list[str]:
        """Manifests that still hold batches, of one worker or of all."""
        held = set(self.assigned.values())
        return [m for m, w in self.manifests.items() if m in held and worker_id in (None, w)]

    def failure(self, alive_workers: Sequence[str]) -> JobFailure | None:
        """The reason the job cannot finish with ``alive_workers``, or None while it still can."""
        for batch_id, reasons in sorted(self.failures.items()):
            if batch_id in self.done:
                continue
            if len(reasons) >= self.max_failures:
                return self._failed(batch_id, f"failed on {len(reasons)} different workers")
        pending = self.pending()
        if pending and not alive_workers:
            summary = f"no worker is left to upscale the remaining {len(pending)} batch(es)"
            return JobFailure(None, {}, summary, workers_gone=True)
        for batch in pending:
            if not [w for w in alive_workers if w not in self.failures.get(batch.id, {})]:
                return self._failed(
                    batch.id, "failed, and no other worker is left to retry it", workers_gone=True
                )
        return None

    def _failed(self, batch_id: int, how: str, *, workers_gone: bool = False) -> JobFailure:
        batch = self.batches[batch_id]
        reasons = dict(self.failures.get(batch_id, {}))
        because = "; ".join(f"on {worker}: {reason}" for worker, reason in reasons.items())
        summary = f"batch {batch_id} ({_frames_text(batch)}) {how} ({because})"
        return JobFailure(batch, reasons, summary, workers_gone=workers_gone)

    # -- events -----------------------------------------------------------------------------------

    def add(self, batches: Iterable[Batch], *, done: Iterable[int] = ()) -> None:
        """Take in more batches (a streaming job's next chunk); ``done`` ones are already on disk."""
        for batch in batches:
            if batch.id in self.batches:
                raise ValueError(f"batch {batch.id} is in the ledger already")
            self.batches[batch.id] = batch
        for batch_id in done:
            self.done.add(batch_id)
            self.done_by[batch_id] = "(found on disk)"

    def assign(self, manifest_id: str, worker_id: str, batches: Iterable[Batch]) -> None:
        """Deal ``batches`` to ``worker_id`` in ``manifest_id``. A manifest that was dealt and holds
        nothing (its worker answered busy) may be dealt again, to the same worker only."""
        if manifest_id in self.manifests and (
            self.manifests[manifest_id] != worker_id or manifest_id in self.assigned.values()
        ):
            raise ValueError(f"manifest {manifest_id} was dealt already")
        self.manifests[manifest_id] = worker_id
        for batch in batches:
            if batch.id in self.done or batch.id in self.assigned:
                raise ValueError(f"batch {batch.id} is already done or assigned")
            self.assigned[batch.id] = manifest_id

    def record_status(self, status: Status) -> list[int]:
        """Take in the status file of a dealt manifest; returns the batch ids newly done.

        Reading the same status twice changes nothing. A final status (completed, failed,
        cancelled) releases whatever its manifest still holds.
        """
        manifest_id = status.manifest_id
        if manifest_id is None:  # an idle worker's status names no manifest
            return []
        worker_id = self.manifests.get(manifest_id)
        if worker_id is None:
            raise ValueError(f"status of manifest {manifest_id}, which was never dealt")
        newly = []
        for batch_id in status.done_batches:
            if self.assigned.get(batch_id) == manifest_id:
                self.done.add(batch_id)
                self.done_by[batch_id] = worker_id
                del self.assigned[batch_id]
                newly.append(batch_id)
        for error in status.errors:
            if self.assigned.get(error.batch_id) == manifest_id:
                at = f"frame {error.frame}: " if error.frame is not None else ""
                self.failures.setdefault(error.batch_id, {})[worker_id] = at + error.reason
                del self.assigned[error.batch_id]
        if status.state.is_final:
            self.release(manifest_id)
        return newly

    def record_done(self, manifest_id: str) -> list[Batch]:
        """Every batch ``manifest_id`` holds is done (checked on disk by the caller, not read from a
        status file: a segment job's unit is its range, done when its segment file is whole)."""
        worker_id = self.manifests[manifest_id]
        finished = self.held_by(manifest_id)
        for batch in finished:
            del self.assigned[batch.id]
            self.done.add(batch.id)
            self.done_by[batch.id] = worker_id
        return finished

    def release(self, manifest_id: str) -> list[Batch]:
        """A manifest holds nothing any more (it ended, or its worker is lost): its batches go back."""
        returned = self.held_by(manifest_id)
        for batch in returned:
            del self.assigned[batch.id]
        return returned

    def release_worker(self, worker_id: str) -> list[Batch]:
        """A worker is lost: every batch its manifests hold goes back to pending."""
        return [batch for m in self.open_manifests(worker_id) for batch in self.release(m)]

    def record_failure(self, worker_id: str, batch_id: int, reason: str) -> None:
        """A batch failed outside any status file (e.g. its output frames are missing after 'done')."""
        self.done.discard(batch_id)
        self.done_by.pop(batch_id, None)
        self.failures.setdefault(batch_id, {})[worker_id] = reason
        self.assigned.pop(batch_id, None)

    def forget(self, batch_ids: Iterable[int]) -> None:
        """Drop done batches the job no longer needs to remember (a streaming job's encoded chunks),
        and the manifests that hold nothing any more, so a long job's ledger does not grow."""
        for batch_id in batch_ids:
            if batch_id not in self.done:
                raise ValueError(f"batch {batch_id} is not done")
            self.done.discard(batch_id)
            self.done_by.pop(batch_id, None)
            self.failures.pop(batch_id, None)
            self.frames_forgotten += len(self.batches.pop(batch_id))
        held = set(self.assigned.values())
        for manifest_id in [m for m in self.manifests if m not in held]:
            del self.manifests[manifest_id]

    # -- dealing ----------------------------------------------------------------------------------

    def deal(self, idle_workers: Sequence[str], *, limit: int | None = None) -> dict[str, tuple[Batch, ...]]:
        """Deal pending batches to ``idle_workers``, none to a worker it failed on. Does not assign.

        ``limit`` caps the batches dealt now, lowest ids first (a streaming job deals each worker
        its share of what is pending, keeping the rest for workers that free up later).
        """
        dealt: dict[str, list[Batch]] = {}
        groups: dict[tuple[str, ...], list[Batch]] = {}
        for batch in self.pending()[:limit]:
            eligible = tuple(w for w in idle_workers if w not in self.failures.get(batch.id, {}))
            if eligible:
                groups.setdefault(eligible, []).append(batch)
        loads: dict[str, int] = {}
        for eligible, batches in groups.items():
            sub_loads = {w: loads.get(w, 0) for w in eligible}
            for worker, share in redeal(batches, eligible, loads=sub_loads).items():
                dealt.setdefault(worker, []).extend(share)
                loads[worker] = loads.get(worker, 0) + len(share)
        return {w: tuple(sorted(b, key=lambda batch: batch.id)) for w, b in dealt.items() if b}
