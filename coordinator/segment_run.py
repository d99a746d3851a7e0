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
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict

import msgspec

from coordinator.dispatch import Dispatcher
from coordinator.errors import JobError
from coordinator.events import SegmentDone, Stage
from coordinator.fleet import WorkerHandle
from coordinator.media import VideoMedia, segment_path
from coordinator.plan import RunPlan, RunTools
from coordinator.source_share import share_source
from manifests.atomic import leftover_temp_files
from manifests.chunks import Chunk
from manifests.errors import DocumentError, PlanningError
from manifests.jobrecord import SegmentsRecord
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout
from manifests.ledger import JobLedger
from manifests.manifest import Batch, Manifest
from manifests.ranges import RangePlan, plan_ranges
from manifests.segment import ENCODER_PARAM_OPTIONS, SEGMENTS_TRANSPORT, SegmentEncode, SegmentWork
from manifests.status import Status, WorkerState
from media.encode import PART_SUFFIX, EncodeSettings

log = logging.getLogger(__name__)


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


class RangeDispatcher(Dispatcher):
    """The dispatcher over ranges: one range per manifest, only to workers that support segments,
    its partial segment deleted before it is dealt, and done when its worker's status says completed
    and its segment file is whole (else it failed on that worker, and is redone from its start)."""

    unit, units = "range", "ranges"
    manifest_letter = "s"
    dispatch_log_level = logging.INFO

    def __init__(
        self,
        plan: RunPlan,
        tools: RunTools,
        ledger: JobLedger,
        ranges: RangePlan,
        *,
        source: str,
        encode: SegmentEncode,
    ) -> None:
        super().__init__(plan, tools.fleet, ledger, threads=tools.threads, emit=tools.emit, stats=tools.stats)
        self._ranges, self._source, self._encode = ranges, source, encode
        # The decoded frames reach the model as the job's frame files would (YUV, or RGB as npy: no
        # PNG is involved when no frame file is written).
        fmt = plan.frame_format
        self._frame_format = FrameFormat.NPY if fmt is FrameFormat.PNG else fmt
        self._progress: dict[str, int] = {}  # manifest id -> frames its status claims
        self._refused: set[str] = set()

    @property
    def frames_in_progress(self) -> int:
        """Frames of ranges not done yet that their workers' status files claim."""
        return sum(self._progress.values())

    def serves(self, handle: WorkerHandle) -> bool:
        """Workers without the segment transport are refused (and logged once)."""
        if SEGMENTS_TRANSPORT in handle.transports:
            return True
        if handle.url not in self._refused:
            self._refused.add(handle.url)
            with contextlib.suppress(TransportError):
                refuse_workers_without_segments([handle])
        return False

    def share(self, pending: int, serving: int) -> int:
        return 1

    async def prepare(self, batches: tuple[Batch, ...]) -> None:
        (unit,) = batches
        await self._threads.run(remove_partial, self._plan.layout, self._ranges.ranges[unit.id])

    def manifest(self, manifest_id: str, handle: WorkerHandle, batches: tuple[Batch, ...]) -> Manifest:
        (unit,) = batches
        chunk, layout = self._ranges.ranges[unit.id], self._plan.layout
        file = str(segment_path(layout, chunk).relative_to(layout.job_dir))
        work = SegmentWork(self._source, chunk.first, chunk.count, file, self._encode)
        own = self._ranges.batches[chunk.index]
        return self._plan.manifest(
            manifest_id, handle.worker_id, own, segment=work, frame_format=self._frame_format
        )

    async def take_status(self, manifest_id: str, handle: WorkerHandle, status: Status) -> None:
        (unit,) = self._ledger.held_by(manifest_id)
        chunk = self._ranges.ranges[unit.id]
        sizes = {b.id: len(b) for b in self._ranges.batches[chunk.index]}
        self._progress[manifest_id] = sum(sizes.get(b, 0) for b in status.done_batches)
        if not status.state.is_final:
            return
        whole = status.state is WorkerState.COMPLETED and await self._threads.run(
            self._plan.media.part_done, self._plan.layout, chunk
        )
        if whole:
            self._ledger.record_done(manifest_id)
            self._emit(SegmentDone(chunk.index, chunk.first, chunk.last))
            log.info(
                "segment %d (frames %d-%d) done by %s", chunk.index, chunk.first, chunk.last, handle.worker_id
            )
            return
        reason = (
            "; ".join(str(e) for e in status.errors) or status.message or f"it ended {status.state.value}"
        )
        if status.state is WorkerState.COMPLETED:
            reason = "its segment file is missing or not whole although its status says completed"
        self._ledger.record_failure(handle.url, chunk.index, reason)
        log.error(
            "range %d (frames %d-%d) failed on %s: %s",
            chunk.index,
            chunk.first,
            chunk.last,
            handle.worker_id,
            reason,
        )
        await self._threads.run(remove_partial, self._plan.layout, chunk)

    def _end_manifest(self, manifest_id: str) -> None:
        super()._end_manifest(manifest_id)
        self._progress.pop(manifest_id, None)


def remove_partial(layout: JobLayout, chunk: Chunk) -> None:
    """A range about to be (re)done starts from nothing: its segment and any temporary file of it."""
    segment_path(layout, chunk).unlink(missing_ok=True)
    remove_temp_files(layout, [chunk])


def remove_temp_files(layout: JobLayout, chunks: Iterable[Chunk]) -> None:
    """The temporary files of the ranges' segments that a killed (or lost) worker left behind."""
    for chunk in chunks:
        for leftover in leftover_temp_files(segment_path(layout, chunk), PART_SUFFIX):
            leftover.unlink(missing_ok=True)


class SegmentRun:
    """One run's ranges through the fleet (:class:`RangeDispatcher`); the job handle joins them."""

    def __init__(self, plan: RunPlan, tools: RunTools) -> None:
        assert isinstance(plan.media, VideoMedia)
        self._plan, self._tools, self._media = plan, tools, plan.media
        self.frames_found = 0  # frames of segments an earlier run finished
        self._dispatcher: RangeDispatcher | None = None
        self._started_at = 0.0

    async def produce(self, ready: Awaitable[list[WorkerHandle]]) -> tuple[Chunk, ...]:
        """Share the source, deal the ranges until every segment is on disk, and return the ranges
        in order (what :meth:`VideoMedia.finish` joins). ``ready`` gives the workers once they have
        loaded their model."""
        tools, layout = self._tools, self._plan.layout
        succeeded = False
        try:
            encode = segment_encode(self._media.encode)  # refused before anything is shared
            started = time.monotonic()
            shared = await tools.threads.run(
                share_source, self._plan.spec.input, layout, self._copy_progress()
            )
            tools.stats["share_source_s"] = time.monotonic() - started
            tools.meter.report(Stage.LOADING, 0, 0)
            refuse_workers_without_segments(await ready)
            source = str(shared.relative_to(layout.job_dir))
            ranges, ledger = await tools.threads.run(self._start, source)
            self._dispatcher = RangeDispatcher(
                self._plan, tools, ledger, ranges, source=source, encode=encode
            )
            self._started_at = asyncio.get_running_loop().time()
            await self._loop(ledger)
            # A lost worker may have left a temporary segment after its range was dealt again.
            await tools.threads.run(remove_temp_files, layout, ranges.ranges)
            succeeded = True
        except JobError as exc:
            if not exc.resumable and self._plan.run == 1:  # nothing of this job is worth keeping
                await tools.threads.run(shutil.rmtree, layout.job_dir, True)
            raise
        finally:
            if not succeeded and self._dispatcher is not None:
                await self._dispatcher.abandon()
        return ranges.ranges

    def _copy_progress(self) -> Callable[[int, int], None]:
        """Progress of a copy of the source (a thread) as the job's extracting stage, in frames."""
        loop, frames, report = asyncio.get_running_loop(), self._media.frame_count, self._tools.meter.report

        def copied(done: int, total: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the job is over
                loop.call_soon_threadsafe(report, Stage.EXTRACTING, frames * done // max(total, 1), frames)

        return copied

    def _start(self, source: str) -> tuple[RangePlan, JobLedger]:
        """Plan the ranges and take in the segments an earlier run finished (a thread)."""
        media, layout, spec = self._media, self._plan.layout, self._plan.spec
        try:
            plan = plan_ranges(media.frame_count, spec.segment_frames, media.batch_size(spec.batch_size))
        except PlanningError as exc:
            raise JobError(f"cannot start: {exc}", resumable=False) from exc
        self._check_segments_record(plan)
        done = [c.index for c in plan.ranges if media.part_done(layout, c)]
        remove_temp_files(layout, (c for c in plan.ranges if c.index in done))
        for chunk in plan.ranges:
            if chunk.index not in done:
                remove_partial(layout, chunk)
        ledger = JobLedger.for_batches(plan.units())
        ledger.done.update(done)
        self.frames_found = sum(plan.ranges[i].count for i in done)
        if done:
            log.info("resuming: %d of %d segments done", len(done), len(plan.ranges))
        log.info(
            "%d frames in %d range(s) of up to %d frames; the workers decode %s",
            media.frame_count,
            len(plan.ranges),
            plan.segment_frames,
            source,
        )
        return plan, ledger

    def _check_segments_record(self, plan: RangePlan) -> None:
        """Segments of an earlier run count only if cut and encoded the same way."""
        encode = self._media.encode
        record = SegmentsRecord(
            chunk_frames=plan.segment_frames,
            encode={"transport": SEGMENTS_TRANSPORT, **asdict(encode), "extra_args": list(encode.extra_args)},
        )
        record_file = self._plan.layout.segments_dir / "segments.json"
        previous: SegmentsRecord | None = None
        with contextlib.suppress(OSError, DocumentError):
            previous = SegmentsRecord.from_json(record_file.read_bytes(), source=record_file)
        if previous != record and previous is not None:
            log.info("encoder settings or ranges changed: the earlier segments are encoded again")
            for chunk in plan.ranges:
                segment_path(self._plan.layout, chunk).unlink(missing_ok=True)
        write_json_atomic(record_file, record.to_json())

    async def _loop(self, ledger: JobLedger) -> None:
        dispatcher = self._dispatcher
        assert dispatcher is not None
        while not ledger.complete:
            await dispatcher.watch()
            dispatcher.raise_if_stuck()
            await dispatcher.deal()
            now = asyncio.get_running_loop().time()
            dispatcher.count_idle(now)
            done = ledger.frames_done + dispatcher.frames_in_progress
            self._tools.meter.report(
                Stage.UPSCALING,
                done,
                self._media.frame_count,
                this_run=done - self.frames_found,
                elapsed_s=now - self._started_at,
            )
            await asyncio.sleep(self._tools.fleet.farm.poll_interval_s)


async def run_segments(
    plan: RunPlan, tools: RunTools, ready: Awaitable[list[WorkerHandle]]
) -> tuple[Chunk, ...]:
    """The segment transport as a :class:`coordinator.plan.Runner`: the workers decode and encode
    the ranges; the job handle joins the segments it returns."""
    run = SegmentRun(plan, tools)
    try:
        return await run.produce(ready)
    finally:
        tools.meter.frames_found = run.frames_found
