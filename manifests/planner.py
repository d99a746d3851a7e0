"""Batch planning: contiguous batches dealt round-robin to workers, and re-dealing leftovers.

Pure functions of their arguments. Batch ids number the batches of a job from 0 in frame order,
so a batch keeps its id when it moves to another worker.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from manifests.errors import PlanningError
from manifests.layout import DEFAULT_FIRST_FRAME
from manifests.manifest import Batch, Manifest
from manifests.status import Status

DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class Plan:
    """All batches of a job in frame order, and which worker gets which (in processing order)."""

    batches: tuple[Batch, ...]
    assignments: Mapping[str, tuple[Batch, ...]]

    def for_worker(self, worker_id: str) -> tuple[Batch, ...]:
        return self.assignments[worker_id]


def plan_batches(
    frame_count: int,
    batch_size: int,
    worker_ids: Sequence[str],
    *,
    first_frame: int = DEFAULT_FIRST_FRAME,
) -> Plan:
    """Cut frames ``first_frame .. first_frame + frame_count - 1`` into contiguous batches of
    ``batch_size`` (the last may be shorter) and deal them round-robin: batch ``i`` goes to
    ``worker_ids[i % len(worker_ids)]``. Every worker gets a key, possibly with no batches.
    """
    if frame_count < 0:
        raise PlanningError(f"frame count must be 0 or more, not {frame_count}")
    if batch_size < 1:
        raise PlanningError(f"batch size must be at least 1, not {batch_size}")
    if first_frame < 0:
        raise PlanningError(f"first frame must be 0 or more, not {first_frame}")
    workers = _check_workers(worker_ids)
    end = first_frame + frame_count
    batches = tuple(
        Batch.range(batch_id, start, min(start + batch_size, end))
        for batch_id, start in enumerate(range(first_frame, end, batch_size))
    )
    dealt: dict[str, list[Batch]] = {worker: [] for worker in workers}
    for index, batch in enumerate(batches):
        dealt[workers[index % len(workers)]].append(batch)
    return Plan(batches, {worker: tuple(assigned) for worker, assigned in dealt.items()})


def redeal(
    batches: Iterable[Batch],
    alive_worker_ids: Sequence[str],
    *,
    loads: Mapping[str, int] | None = None,
) -> dict[str, tuple[Batch, ...]]:
    """Deal leftover ``batches`` (in batch-id order) to the workers still alive.

    Each batch goes to the worker with the fewest batches so far, counting ``loads`` (batches a
    worker still has queued), ties to the earlier worker in ``alive_worker_ids``. Without
    ``loads`` this is plain round-robin. Raises :class:`PlanningError` if no worker is alive.
    """
    workers = _check_workers(alive_worker_ids)
    known = set(workers)
    if loads is not None and not known.issuperset(loads):
        raise PlanningError(f"loads name workers that are not alive: {', '.join(sorted(set(loads) - known))}")
    ordered = sorted(batches, key=lambda batch: batch.id)
    ids = [batch.id for batch in ordered]
    if len(set(ids)) != len(ids):
        raise PlanningError("the leftover batches repeat a batch id")
    heap = [((loads or {}).get(worker, 0), position, worker) for position, worker in enumerate(workers)]
    heapq.heapify(heap)
    dealt: dict[str, list[Batch]] = {worker: [] for worker in workers}
    for batch in ordered:
        load, position, worker = heapq.heappop(heap)
        dealt[worker].append(batch)
        heapq.heappush(heap, (load + 1, position, worker))
    return {worker: tuple(assigned) for worker, assigned in dealt.items()}


def leftover_batches(manifest: Manifest, status: Status | None) -> tuple[Batch, ...]:
    """The batches of ``manifest`` that ``status`` does not claim as done (all of them if None)."""
    if status is None:
        return manifest.batches
    if status.job_id != manifest.job_id or status.manifest_id != manifest.manifest_id:
        raise PlanningError(
            f"status of {status.job_id}/{status.manifest_id} does not belong to manifest "
            f"{manifest.job_id}/{manifest.manifest_id}"
        )
    done = set(status.done_batches)
    return tuple(batch for batch in manifest.batches if batch.id not in done)


def _check_workers(worker_ids: Sequence[str]) -> list[str]:
    workers = list(worker_ids)
    if not workers:
        raise PlanningError("there are no workers to deal batches to")
    if len(set(workers)) != len(workers):
        raise PlanningError("worker ids must be distinct")
    return workers
