"""The segment transport's coordinator side (``--transport segments``): only compressed video
crosses the shared storage.

::

    source --(hard link or copy: coordinator.source_share)--> input/source.mp4
    plan ranges (manifests.ranges) --> one manifest per range (a frames manifest with ``segment``)
    worker: decode the range from input/source.mp4, upscale it batch by batch, encode
            segments/<index>.mp4 (temporary name, renamed when whole); status per batch
    coordinator: watch status files --> a range is done when its status is completed and its
            segment is whole (media.segments.segment_is_complete) --> join (media.segments.join_segments,
            no re-encoding; audio, subtitles, chapters, colour carried from the source)

Each range is one unit of the job's :class:`~manifests.ledger.JobLedger`: dealt to one idle worker
at a time, given back when its worker is lost (or its status file stalls) and redone from its start
by another (any partial segment deleted first), never dealt again to a worker it failed on; the
job fails when a range failed on two workers or no worker is left. A coordinator killed even by
SIGKILL leaves finished segments that the next run keeps (same ranges and encoder settings,
``segments/segments.json``); workers still busy with its manifests are reset.

Segment files are named as the frames design's chunks' (``segments/<index:06d>.mp4``), so
:class:`~coordinator.media.VideoMedia` checks and joins them for both transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict
from typing import Any

import msgspec

from coordinator.errors import JobError
from coordinator.events import BatchFailed, JobEvent, SegmentDone, Stage, WorkerLost
from coordinator.fleet import Dispatch, WorkerFleet, WorkerHandle
from coordinator.media import VideoMedia, segment_path
from coordinator.plan import RunPlan, RunTools
from coordinator.source_share import share_source
from coordinator.spec import JobSpec
from manifests.atomic import leftover_temp_files
from manifests.chunks import Chunk
from manifests.colour import YuvSpec
from manifests.errors import DocumentError, FormatVersionError, PlanningError
from manifests.jobrecord import SegmentsRecord
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout
from manifests.ledger import JobLedger
from manifests.manifest import Manifest
from manifests.ranges import RangePlan, plan_ranges
from manifests.segment import ENCODER_PARAM_OPTIONS, SEGMENTS_TRANSPORT, SegmentEncode, SegmentWork
from manifests.status import Status, WorkerState
from media.encode import PART_SUFFIX, EncodeSettings

log = logging.getLogger(__name__)

Report = Callable[..., None]
InThread = Callable[..., Coroutine[Any, Any, Any]]


class TransportError(JobError):
    """No worker of the job supports the segment transport (each one's /health names its transports)."""


def segment_encode(settings: EncodeSettings) -> SegmentEncode:
    """The job's encoder settings as a segment manifest carries them; raises :class:`JobError` for
    ffmpeg arguments a manifest may not pass (anything but an encoder's own parameter string)."""
    args = tuple(settings.extra_args)
    pairs = tuple(zip(args[::2], args[1::2], strict=False))
    if len(args) % 2 or any(option not in ENCODER_PARAM_OPTIONS for option, _value in pairs):
        raise JobError(
            f"cannot start: --transport segments passes the workers only {', '.join(ENCODER_PARAM_OPTIONS)} "
            f"(each with one value), not {' '.join(args)} (use --transport frames for other encoder options)",
            resumable=False,
        )
    try:
        return SegmentEncode(settings.codec, settings.crf, settings.preset, settings.pix_fmt, pairs)
    except (ValueError, msgspec.ValidationError) as exc:
        raise JobError(f"cannot start: --transport segments: {exc}", resumable=False) from exc


def refuse_workers_without_segments(handles: list[WorkerHandle]) -> list[WorkerHandle]:
    """The workers that support the segment transport; the others are logged by name, and if none
    is left :class:`TransportError` says which workers were refused and why."""
    able = [h for h in handles if SEGMENTS_TRANSPORT in h.transports]
    refused = [h for h in handles if h not in able]
    for handle in refused:
        log.warning(
            "not using worker %s for this segments job: its /health names transports %s (a worker of a "
            "release without the segment transport)",
            handle.worker_id,
            ", ".join(handle.transports),
        )
    if not able:
        named = "; ".join(f"{h.worker_id} supports {', '.join(h.transports)}" for h in refused)
        raise TransportError(
            f"no worker supports the segments transport ({named}): upgrade the workers, or run the job "
            "with --transport frames",
            resumable=False,
        )
    return able


class SegmentRun:
    """One job's ranges through the fleet, then the join. Built and awaited by :class:`coordinator.job.Job`
    once the input is probed and the job directory is open."""

    def __init__(
        self,
        spec: JobSpec,
        fleet: WorkerFleet,
        layout: JobLayout,
        media: VideoMedia,
        run_number: int,
        *,
        frame_format: FrameFormat,
        yuv: YuvSpec | None,
        emit: Callable[[JobEvent], None],
        report: Report,
        in_thread: InThread,
        stats: dict[str, float],
    ) -> None:
        self.spec, self.fleet, self.farm = spec, fleet, fleet.farm
        self.layout, self.media, self.run_number = layout, media, run_number
        # The decoded frames reach the model as the job's frame files would (YUV, or RGB as npy: no
        # PNG is involved when no frame file is written).
        self.frame_format = FrameFormat.NPY if frame_format is FrameFormat.PNG else frame_format
        self.yuv = yuv
        self._emit, self._report, self._in_thread, self.stats = emit, report, in_thread, stats
        self.encode = segment_encode(media.encode)
        self.plan: RangePlan | None = None
        self.scale: float | None = spec.scale
        self.frames_found = 0  # frames of segments an earlier run finished
        self._source = ""
        self._ledger = JobLedger.for_batches([])
        self._holders: dict[str, WorkerHandle] = {}  # manifest id -> worker
        self._range_of: dict[str, int] = {}  # manifest id -> range index
        self._progress: dict[str, int] = {}  # manifest id -> frames its status claims
        self._last_status: dict[str, bytes] = {}
        self._last_change: dict[str, float] = {}
        self._reported_errors: set[tuple[str, int]] = set()
        self._lost: set[str] = set()
        self._reset_orphans: set[str] = set()
        self._refused: set[str] = set()
        self._count = 0
        self._started_at = 0.0

    # -- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Produce every segment, then join them into the output."""
        ready = asyncio.ensure_future(self.fleet.wait_ready(self.spec.model, self.spec.backend))
        try:
            ranges = await self.produce(ready)
        finally:
            ready.cancel()
        await self._join(ranges)

    async def produce(
        self, ready: Awaitable[list[WorkerHandle]], scale: float | None = None
    ) -> tuple[Chunk, ...]:
        """Share the source, deal the ranges until every segment is on disk, and return the ranges
        in order (what :meth:`VideoMedia.finish` joins). ``ready`` gives the workers once they have
        loaded their model; ``scale``, when known, is the job's (else the workers' model's)."""
        spec, layout = self.spec, self.layout
        if scale is not None:
            self.scale = scale
        succeeded = False
        try:
            started = time.monotonic()
            shared = await self._in_thread(share_source, spec.input, layout, self._copy_progress())
            self._source = str(shared.relative_to(layout.job_dir))
            self.stats["share_source_s"] = time.monotonic() - started
            self._report(Stage.LOADING, 0, 0)
            handles = refuse_workers_without_segments(await ready)
            if self.scale is None:
                self.scale = handles[0].scale
                await self._in_thread(self.media.check_output, self.scale)
            await self._in_thread(self._start)
            self._started_at = asyncio.get_running_loop().time()
            await self._loop()
            succeeded = True
        finally:
            if not succeeded:
                await self._stop()
        assert self.plan is not None
        return self.plan.ranges

    def _copy_progress(self) -> Callable[[int, int], None]:
        """Progress of a copy of the source (a thread) as the job's extracting stage, in frames."""
        loop, frames = asyncio.get_running_loop(), self.media.frame_count

        def copied(done: int, total: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the job is over
                loop.call_soon_threadsafe(
                    self._report, Stage.EXTRACTING, frames * done // max(total, 1), frames
                )

        return copied

    def _start(self) -> None:
        """Plan the ranges and take in the segments an earlier run finished (a thread)."""
        media, layout = self.media, self.layout
        try:
            self.plan = plan = plan_ranges(
                media.frame_count, self.spec.segment_frames, media.batch_size(self.spec.batch_size)
            )
        except PlanningError as exc:
            raise JobError(f"cannot start: {exc}", resumable=False) from exc
        self._check_segments_record(plan)
        done = [c.index for c in plan.ranges if media.part_done(layout, c)]
        for chunk in plan.ranges:
            if chunk.index not in done:
                self._remove_partial(chunk)
        self._ledger = JobLedger.for_batches(plan.units())
        self._ledger.done.update(done)
        self.frames_found = sum(plan.ranges[i].count for i in done)
        if done:
            log.info("resuming: %d of %d segments done", len(done), len(plan.ranges))
        log.info(
            "%d frames in %d range(s) of up to %d frames; the workers decode %s",
            media.frame_count,
            len(plan.ranges),
            plan.segment_frames,
            self._source,
        )

    def _check_segments_record(self, plan: RangePlan) -> None:
        """Segments of an earlier run count only if cut and encoded the same way."""
        record = SegmentsRecord(
            chunk_frames=plan.segment_frames,
            encode={
                "transport": SEGMENTS_TRANSPORT,
                **asdict(self.media.encode),
                "extra_args": list(self.media.encode.extra_args),
            },
        )
        record_file = self.layout.segments_dir / "segments.json"
        previous: SegmentsRecord | None = None
        with contextlib.suppress(OSError, DocumentError):
            previous = SegmentsRecord.from_json(record_file.read_bytes(), source=record_file)
        if previous != record and previous is not None:
            log.info("encoder settings or ranges changed: the earlier segments are encoded again")
            for chunk in plan.ranges:
                segment_path(self.layout, chunk).unlink(missing_ok=True)
        write_json_atomic(record_file, record.to_json())

    def _remove_partial(self, chunk: Chunk) -> None:
        """A range about to be (re)done starts from nothing: its segment and any temporary file of it."""
        target = segment_path(self.layout, chunk)
        target.unlink(missing_ok=True)
        for leftover in leftover_temp_files(target, PART_SUFFIX):
            leftover.unlink(missing_ok=True)

    async def _loop(self) -> None:
        while not self._ledger.complete:
            await self._read_statuses()
            self._account_lost_workers()
            self._lose_stale_workers()
            self._raise_if_stuck()
            await self._deal()
            self._report_progress()
            await asyncio.sleep(self.farm.poll_interval_s)

    async def _stop(self) -> None:
        holders = [h for h in set(self._holders.values()) if h.holding in self._holders]
        await asyncio.gather(*(self.fleet.reset(h) for h in holders))
        for manifest_id, handle in self._holders.items():
            self.fleet.release(handle, manifest_id)

    async def _join(self, ranges: tuple[Chunk, ...]) -> None:
        started = time.monotonic()
        self._report(Stage.JOINING, 0, 1)
        await self._in_thread(self.media.finish, self.layout, ranges)
        self.stats["join_s"] = time.monotonic() - started
        log.info("joined %d segment(s) into %s", len(ranges), self.spec.output)
        self._report(Stage.JOINING, 1, 1)

    # -- workers ----------------------------------------------------------------------------------

    def _serving(self) -> list[WorkerHandle]:
        """Workers of the job's model and backend that support segments (the others are refused once)."""
        serving = []
        for handle in self.fleet.serving(self.spec.model, self.spec.backend):
            if SEGMENTS_TRANSPORT in handle.transports:
                serving.append(handle)
            elif handle.url not in self._refused:
                self._refused.add(handle.url)
                with contextlib.suppress(TransportError):
                    refuse_workers_without_segments([handle])
        return serving

    async def _deal(self) -> None:
        await self._reset_orphaned_manifests()
        serving = {h.url for h in self._serving()}
        idle = [h for h in self.fleet.idle(self.spec.model, self.spec.backend) if h.url in serving]
        if not idle or not self._ledger.pending():
            return
        handles = {h.url: h for h in idle}
        for url, units in self._ledger.deal(list(handles), limit=len(idle)).items():
            await self._dispatch(handles[url], units[0].id)

    async def _reset_orphaned_manifests(self) -> None:
        """A worker still busy with this job's manifest of an earlier, killed run is reset (once)."""
        for handle in self.fleet.serving(self.spec.model, self.spec.backend):
            health = handle.health
            manifest_id = (health.manifest_id if health else None) or ""
            if (
                handle.busy_elsewhere
                and health is not None
                and health.job_id == self.layout.job_id
                and not manifest_id.startswith(f"r{self.run_number:02d}-")
                and handle.url not in self._reset_orphans
            ):
                self._reset_orphans.add(handle.url)
                log.info("resetting %s: it still runs a manifest of an earlier run", handle.worker_id)
                await self.fleet.reset(handle)

    async def _dispatch(self, handle: WorkerHandle, index: int) -> None:
        assert self.plan is not None
        chunk = self.plan.ranges[index]
        await self._in_thread(self._remove_partial, chunk)
        self._count += 1
        manifest_id = f"r{self.run_number:02d}-s{self._count:05d}"
        path = self.layout.manifest_path(manifest_id)
        await self._in_thread(write_json_atomic, path, self._manifest_json(manifest_id, handle, chunk))
        if handle.holding is not None:  # another job on the fleet dealt to it while the file was written
            await self._in_thread(path.unlink, True)
            return
        self._ledger.assign(manifest_id, handle.url, [self.plan.unit(index)])
        self._holders[manifest_id] = handle
        self._range_of[manifest_id] = index
        outcome = await self.fleet.dispatch(
            handle, manifest_id, str(path.relative_to(self.layout.shared_root))
        )
        if outcome is not Dispatch.ACCEPTED:
            self._ledger.release(manifest_id)
            self._forget(manifest_id)
            await self._in_thread(path.unlink, True)
            return
        self._last_change[manifest_id] = asyncio.get_running_loop().time()
        log.info("range %d (frames %d-%d) to %s", index, chunk.first, chunk.last, handle.worker_id)

    def _manifest_json(self, manifest_id: str, handle: WorkerHandle, chunk: Chunk) -> bytes:
        assert self.plan is not None
        work = SegmentWork(
            source=self._source,
            first_frame=chunk.first,
            count=chunk.count,
            file=str(segment_path(self.layout, chunk).relative_to(self.layout.job_dir)),
            encode=self.encode,
        )
        return Manifest(
            job_id=self.layout.job_id,
            manifest_id=manifest_id,
            worker_id=handle.worker_id,
            model=self.spec.model,
            batches=self.plan.batches[chunk.index],
            scale=self.scale,
            tile=self.spec.tile,
            frame_format=self.frame_format,
            png_compression=self.spec.png_compression,
            bit_depth=self.media.bit_depth,
            yuv=self.yuv,
            segment=work,
        ).to_json()

    def _forget(self, manifest_id: str) -> None:
        handle = self._holders.pop(manifest_id)
        self.fleet.release(handle, manifest_id)
        self._range_of.pop(manifest_id, None)
        self._progress.pop(manifest_id, None)
        self._last_status.pop(manifest_id, None)
        self._last_change.pop(manifest_id, None)

    # -- status files -----------------------------------------------------------------------------

    async def _read_statuses(self) -> None:
        manifest_ids = list(self._holders)
        if not manifest_ids:
            return
        raws = await self._in_thread(self._read_status_files, manifest_ids)
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
                raws[manifest_id] = self.layout.status_path(manifest_id).read_bytes()
            except FileNotFoundError:
                raws[manifest_id] = None
        return raws

    async def _take_status(self, manifest_id: str, raw: bytes) -> None:
        assert self.plan is not None
        handle = self._holders[manifest_id]
        path = self.layout.status_path(manifest_id)
        try:
            status = Status.from_json(raw, source=path)
        except FormatVersionError as exc:
            self.fleet.lose(handle, f"it writes status files this coordinator cannot read ({exc})")
            return
        except DocumentError as exc:
            log.warning("ignoring unreadable status file: %s", exc)
            return
        index = self._range_of[manifest_id]
        sizes = {b.id: len(b) for b in self.plan.batches[index]}
        self._progress[manifest_id] = sum(sizes.get(b, 0) for b in status.done_batches)
        for error in status.errors:
            if (manifest_id, error.batch_id) not in self._reported_errors:
                self._reported_errors.add((manifest_id, error.batch_id))
                log.warning("worker %s: %s", handle.worker_id, error)
                self._emit(BatchFailed(error.batch_id, error.frame, handle.worker_id, error.reason))
        if not status.state.is_final:
            return
        chunk = self.plan.ranges[index]
        whole = status.state is WorkerState.COMPLETED and await self._in_thread(
            self.media.part_done, self.layout, chunk
        )
        if whole:
            self._ledger.record_done(manifest_id)
            self._emit(SegmentDone(chunk.index, chunk.first, chunk.last))
            log.info(
                "segment %d (frames %d-%d) done by %s", chunk.index, chunk.first, chunk.last, handle.worker_id
            )
        else:
            reason = (
                "; ".join(str(e) for e in status.errors) or status.message or f"it ended {status.state.value}"
            )
            if status.state is WorkerState.COMPLETED:
                reason = "its segment file is missing or not whole although its status says completed"
            self._ledger.record_failure(handle.url, index, reason)
            log.error(
                "range %d (frames %d-%d) failed on %s: %s",
                index,
                chunk.first,
                chunk.last,
                handle.worker_id,
                reason,
            )
            await self._in_thread(self._remove_partial, chunk)
        self._forget(manifest_id)

    def _account_lost_workers(self) -> None:
        """A worker the fleet lost gives its range back (once); the range is redone from its start."""
        for handle in self.fleet.handles.values():
            if handle.alive or handle.url in self._lost:
                continue
            self._lost.add(handle.url)
            returned = self._ledger.release_worker(handle.url)
            for manifest_id in [m for m, h in self._holders.items() if h is handle]:
                self._forget(manifest_id)
            if returned:
                log.error(
                    "the range(s) %s of lost worker %s go to the others",
                    ",".join(str(b.id) for b in returned),
                    handle.worker_id,
                )
                self._emit(WorkerLost(handle.worker_id, handle.lost_reason or "lost", len(returned)))

    def _lose_stale_workers(self) -> None:
        now = asyncio.get_running_loop().time()
        for manifest_id, handle in list(self._holders.items()):
            still = now - self._last_change.get(manifest_id, now)
            if still > self.farm.stale_after_s:
                self.fleet.lose(handle, f"its status file did not change for {still:.0f} s")

    def _raise_if_stuck(self) -> None:
        alive = [h.url for h in self._serving()] + self.fleet.replacing()
        failure = self._ledger.failure(alive)
        if failure is None:
            return
        unit = failure.batch
        summary = str(failure).replace("batch ", "range ", 1)
        raise JobError(
            f"upscaling failed: {summary}",
            batch_id=unit.id if unit is not None else None,
            frames=unit.frames if unit is not None else (),
            reasons=dict(failure.reasons),
        )

    def _report_progress(self) -> None:
        now = asyncio.get_running_loop().time()
        done = self._ledger.frames_done + sum(self._progress.values())
        this_run = done - self.frames_found
        total = self.media.frame_count
        self._report(Stage.UPSCALING, done, total, this_run=this_run, elapsed_s=now - self._started_at)


async def run_segments(
    plan: RunPlan, tools: RunTools, ready: Awaitable[list[WorkerHandle]]
) -> tuple[Chunk, ...]:
    """The segment transport as a :class:`coordinator.plan.Runner`: the workers decode and encode
    the ranges; the job handle joins the segments it returns."""
    assert isinstance(plan.media, VideoMedia)
    run = SegmentRun(
        plan.spec, tools.fleet, plan.layout, plan.media, plan.run, frame_format=plan.frame_format,
        yuv=plan.yuv, emit=tools.emit, report=tools.meter.report, in_thread=tools.threads.run,
        stats=tools.stats,
    )  # fmt: skip
    try:
        return await run.produce(ready, plan.scale)
    finally:
        tools.meter.frames_found = run.frames_found
