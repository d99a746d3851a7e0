"""The dispatcher: which of a job's batches goes to which worker, and what the workers say back.

It deals the ledger's pending batches to the fleet's idle workers, a manifest file each; reads the
status file of every manifest a worker holds; and takes batches back from a worker the fleet lost,
one that cannot write the shared root, or one whose status file did not change for
``stale_after_s`` (that one is lost). A manifest a worker refused as busy (409) is parked and sent
again, not written anew, while its batches wait. The ledger (:class:`manifests.ledger.JobLedger`)
is the book; the dispatcher is its I/O.

A unit of work is a batch here (the frames runner's: a manifest takes a worker's share of the
pending batches, and a batch is done when a status file says so). The segment transport's
dispatcher (:class:`coordinator.segment_run.RangeDispatcher`) deals ranges instead, through the
hooks at the end of the class: which workers serve, how many units a manifest takes, the manifest,
what is done before it is written, and what a status file means.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import JobError, WorkersLostError
from coordinator.events import BatchFailed, JobEvent, WorkerLost
from coordinator.fleet import Dispatch, WorkerFleet, WorkerHandle
from coordinator.plan import RunPlan
from coordinator.threads import JobThreads
from manifests.errors import DocumentError, FormatVersionError
from manifests.jsonio import write_json_atomic
from manifests.ledger import JobLedger
from manifests.manifest import Batch, Manifest
from manifests.status import Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Parked:
    """A manifest a worker refused as busy (409), kept to be sent again instead of a new file."""

    manifest_id: str
    batches: tuple[Batch, ...]


class Dispatcher:
    unit, units = "batch", "batches"  # what the job's ledger holds, as logs and errors name it
    dispatch_log_level = logging.DEBUG  # one line per manifest dealt
    manifest_letter = "m"  # in manifest ids: r<run>-<letter><count>

    def __init__(
        self,
        plan: RunPlan,
        fleet: WorkerFleet,
        ledger: JobLedger,
        *,
        threads: JobThreads,
        emit: Callable[[JobEvent], None],
        stats: dict[str, float],
    ) -> None:
        self._plan, self._fleet, self._ledger = plan, fleet, ledger
        self._threads, self._emit, self._stats = threads, emit, stats
        self._model, self._backend = plan.spec.model, plan.spec.backend
        self._holders: dict[str, WorkerHandle] = {}  # open manifest id -> the worker holding it
        self._last_status: dict[str, bytes] = {}
        self._last_change: dict[str, float] = {}
        self._reported_errors: set[tuple[str, int]] = set()
        self._parked: dict[str, _Parked] = {}
        self._lost: set[str] = set()
        self._reset_orphans: set[str] = set()
        self._manifest_count = 0
        self._last_tick: float | None = None

    # -- watching ---------------------------------------------------------------------------------

    async def watch(self) -> None:
        """What the workers did since the last step: status files read, batches taken back from
        workers lost, unable to write the shared root, or silent for too long."""
        await self._read_statuses()
        self._account_lost_workers()
        await self._take_back_from_unwritable_workers()
        self._lose_stale_workers()

    async def _read_statuses(self) -> None:
        """The status file of every manifest a worker holds for this job, until it is final (a
        manifest whose batches are all done still holds its worker until then)."""
        manifest_ids = list(self._holders)
        if not manifest_ids:
            return
        raws = await self._threads.run(self._read_status_files, manifest_ids)
        now = asyncio.get_running_loop().time()
        for manifest_id, raw in raws.items():
            if raw is not None and raw != self._last_status.get(manifest_id) and manifest_id in self._holders:
                self._last_status[manifest_id] = raw
                self._last_change[manifest_id] = now
                await self._take_status(manifest_id, raw)

    def _read_status_files(self, manifest_ids: list[str]) -> dict[str, bytes | None]:
        raws: dict[str, bytes | None] = {}
        for manifest_id in manifest_ids:
            try:
                raws[manifest_id] = self._plan.layout.status_path(manifest_id).read_bytes()
            except FileNotFoundError:
                raws[manifest_id] = None
        return raws

    async def _take_status(self, manifest_id: str, raw: bytes) -> None:
        handle = self._holders[manifest_id]
        path = self._plan.layout.status_path(manifest_id)
        try:
            status = Status.from_json(raw, source=path)
        except FormatVersionError as exc:
            self._fleet.lose(handle, f"it writes status files this coordinator cannot read ({exc})")
            return
        except DocumentError as exc:
            log.warning("ignoring unreadable status file: %s", exc)
            return
        for error in status.errors:
            if (manifest_id, error.batch_id) not in self._reported_errors:
                self._reported_errors.add((manifest_id, error.batch_id))
                log.warning("worker %s: %s", handle.worker_id, error)
                self._emit(BatchFailed(error.batch_id, error.frame, handle.worker_id, error.reason))
        await self.take_status(manifest_id, handle, status)
        if status.state.is_final:
            self._end_manifest(manifest_id)

    def _end_manifest(self, manifest_id: str) -> None:
        handle = self._holders.pop(manifest_id)
        self._fleet.release(handle, manifest_id)
        self._last_status.pop(manifest_id, None)
        self._last_change.pop(manifest_id, None)

    def _account_lost_workers(self) -> None:
        """A worker the fleet lost gives its batches back (once)."""
        for handle in self._fleet.handles.values():
            if handle.alive or handle.url in self._lost:
                continue
            self._lost.add(handle.url)
            returned = self._ledger.release_worker(handle.url)
            for manifest_id in [m for m, h in self._holders.items() if h is handle]:
                self._end_manifest(manifest_id)
            if returned or (handle.serves(self._model, self._backend) and self.serves(handle)):
                ids = ",".join(str(b.id) for b in returned) or "none"
                log.error("%s %s of lost worker %s go to the others", self.units, ids, handle.worker_id)
                self._emit(WorkerLost(handle.worker_id, handle.lost_reason or "lost", len(returned)))

    async def _take_back_from_unwritable_workers(self) -> None:
        """A worker whose /health says it cannot write the shared root would never update its status
        file: its manifests end now and their batches go to the others. It is not lost: the fleet
        deals to it again once it can write."""
        for manifest_id, handle in list(self._holders.items()):
            reason = handle.storage_error
            if reason is None:
                continue
            returned = self._ledger.release(manifest_id)
            self._end_manifest(manifest_id)
            await self._fleet.reset(handle)
            log.error(
                "worker %s cannot write the shared storage (%s): its %d %s go to the others, and it "
                "gets no more until it can",
                handle.worker_id,
                reason,
                len(returned),
                self.units,
            )

    def _lose_stale_workers(self) -> None:
        now = asyncio.get_running_loop().time()
        for manifest_id, handle in list(self._holders.items()):
            still = now - self._last_change.get(manifest_id, now)
            if still > self._fleet.farm.stale_after_s:
                self._fleet.lose(handle, f"its status file did not change for {still:.0f} s")

    def raise_if_stuck(self) -> None:
        """The job fails when no worker is left for a unit, or one unit failed on two workers."""
        # A worker being restarted (a Ray actor) counts: it comes back as a new worker.
        alive = [h.url for h in self._serving()] + self._fleet.replacing()
        failure = self._ledger.failure(alive)
        if failure is not None:
            batch = failure.batch
            summary = str(failure).replace("batch ", f"{self.unit} ", 1)
            kind = WorkersLostError if failure.workers_gone else JobError
            raise kind(
                f"upscaling failed: {summary}",
                batch_id=batch.id if batch is not None else None,
                frames=batch.frames if batch is not None else (),
                reasons=dict(failure.reasons),
            )

    def count_idle(self, now: float) -> None:
        """Adds the time since the last call (loop time ``now``) of every worker holding nothing to
        the ``worker_idle_s`` stat."""
        idle = sum(1 for h in self._serving() if h.holding is None)
        self._stats["worker_idle_s"] += idle * (now - (self._last_tick or now))
        self._last_tick = now

    # -- dealing ----------------------------------------------------------------------------------

    async def deal(self) -> None:
        """Each idle worker gets its share of the pending batches; the rest waits for the next one."""
        await self._reset_orphaned_manifests()
        await self._drop_stale_parked_manifests()
        pending = len(self._ledger.pending())
        serving = self._serving()
        idle = [h for h in self._fleet.idle(self._model, self._backend) if h in serving]
        if not pending or not idle:
            return
        share = self.share(pending, len(serving))
        handles = {h.url: h for h in idle}
        for url, batches in self._ledger.deal(list(handles), limit=share * len(idle)).items():
            await self._dispatch(handles[url], batches[:share])

    async def abandon(self) -> None:
        """The job failed or was cancelled: the workers holding its manifests are reset and let go."""
        holders = [h for h in set(self._holders.values()) if h.holding in self._holders]
        await asyncio.gather(*(self._fleet.reset(h) for h in holders))
        for manifest_id, handle in self._holders.items():
            self._fleet.release(handle, manifest_id)

    async def _reset_orphaned_manifests(self) -> None:
        """A worker still busy with this job's manifest of an earlier, killed run is reset (once)."""
        run_prefix = f"r{self._plan.run:02d}-"
        for handle in self._fleet.serving(self._model, self._backend):
            health = handle.health
            manifest_id = (health.manifest_id if health else None) or ""
            if (
                handle.busy_elsewhere
                and health is not None
                and health.job_id == self._plan.layout.job_id
                and not manifest_id.startswith(run_prefix)
                and handle.url not in self._reset_orphans
            ):
                self._reset_orphans.add(handle.url)
                log.info("resetting %s: it still runs a manifest of an earlier run", handle.worker_id)
                await self._fleet.reset(handle)

    async def _drop_stale_parked_manifests(self) -> None:
        """A manifest refused as busy is kept for its worker while its batches wait; once any of them
        went elsewhere, its file is deleted."""
        pending = {b.id for b in self._ledger.pending()}
        for url, parked in list(self._parked.items()):
            if not all(b.id in pending for b in parked.batches):
                del self._parked[url]
                await self._threads.run(self._plan.layout.manifest_path(parked.manifest_id).unlink, True)

    async def _dispatch(self, handle: WorkerHandle, batches: tuple[Batch, ...]) -> None:
        layout = self._plan.layout
        await self.prepare(batches)
        parked = self._parked.pop(handle.url, None)
        if parked is not None and parked.batches == batches:
            manifest_id = parked.manifest_id  # the same file again: nothing new is written
        else:
            if parked is not None:
                await self._threads.run(layout.manifest_path(parked.manifest_id).unlink, True)
            self._manifest_count += 1
            manifest_id = f"r{self._plan.run:02d}-{self.manifest_letter}{self._manifest_count:05d}"
            manifest = self.manifest(manifest_id, handle, batches)
            await self._threads.run(write_json_atomic, layout.manifest_path(manifest_id), manifest.to_json())
        if handle.holding is not None:  # another job on the fleet dealt to it while the file was written
            self._parked[handle.url] = _Parked(manifest_id, batches)
            return
        self._ledger.assign(manifest_id, handle.url, batches)
        self._holders[manifest_id] = handle
        path = layout.manifest_path(manifest_id).relative_to(layout.shared_root)
        outcome = await self._fleet.dispatch(handle, manifest_id, str(path))
        if outcome is not Dispatch.ACCEPTED:
            self._ledger.release(manifest_id)
            del self._holders[manifest_id]
            if outcome is Dispatch.BUSY:
                self._parked[handle.url] = _Parked(manifest_id, batches)
            return
        self._last_change[manifest_id] = asyncio.get_running_loop().time()
        log.log(
            self.dispatch_log_level,
            "dispatched %s (%s %s) to %s",
            manifest_id,
            self.units,
            ",".join(str(b.id) for b in batches),
            handle.worker_id,
        )

    def _serving(self) -> list[WorkerHandle]:
        return [h for h in self._fleet.serving(self._model, self._backend) if self.serves(h)]

    # -- what a unit of work is (the hooks a transport's dispatcher changes) ----------------------

    def serves(self, handle: WorkerHandle) -> bool:
        """Whether ``handle``, a worker of the job's model and backend, takes this job's units."""
        return True

    def share(self, pending: int, serving: int) -> int:
        """How many of ``pending`` units a manifest takes when ``serving`` workers serve the job."""
        return -(-pending // max(1, serving))

    async def prepare(self, batches: tuple[Batch, ...]) -> None:
        """What is done on disk before ``batches`` are dealt (nothing for frames)."""

    def manifest(self, manifest_id: str, handle: WorkerHandle, batches: tuple[Batch, ...]) -> Manifest:
        return self._plan.manifest(manifest_id, handle.worker_id, batches)

    async def take_status(self, manifest_id: str, handle: WorkerHandle, status: Status) -> None:
        """A new status file of ``manifest_id`` (held by ``handle``) in the ledger: its batches done."""
        if manifest_id in self._ledger.manifests:  # else its batches are encoded and forgotten already
            self._ledger.record_status(status)
