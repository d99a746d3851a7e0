"""What one run of a job does, decided once before its loop and frozen, and what a runner is given.

- :class:`RunPlan`: what every way of running a job needs: the spec, the probed input, the job
  directory and run number, the scale (the job's, else the one the workers' model gives: decided
  once, on one path, by :class:`coordinator.job.Job`) and the frame files' format. A runner is
  handed one and never changes it.
- :class:`FramePlan`: what the frames runner (:mod:`coordinator.frame_runner`: frames through shared
  storage, chunk by chunk) adds: the batch size, the chunks within the disk budget, the batches
  (``--dedup``: only the frames that are upscaled), and what earlier runs left that counts
  (:func:`plan_frames`).
- :class:`RunTools` and :class:`Runner`: what the job handle lends a runner (fleet, progress meter,
  threads, process group, stats), and the shape of a runner: it produces the output's parts, which
  the handle then joins.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from coordinator.dedup import job_duplicate_map
from coordinator.errors import JobError
from coordinator.events import JobEvent
from coordinator.fleet import WorkerFleet, WorkerHandle
from coordinator.media import JobMedia, VideoMedia
from coordinator.progress import ProgressMeter
from coordinator.spec import JobSpec
from coordinator.threads import JobThreads
from manifests.chunks import Chunk, ChunkPlan, plan_chunks
from manifests.colour import YuvSpec
from manifests.dedup import DuplicateMap, dedup_level, plan_unique_batches
from manifests.errors import DocumentError, PlanningError
from manifests.frames import frame_file_is_sound
from manifests.jobrecord import SegmentsRecord
from manifests.jsonio import write_json_atomic
from manifests.layout import FrameFormat, JobLayout, frame_filename
from manifests.manifest import Batch, Manifest
from manifests.planner import plan_batches
from manifests.segment import SegmentWork
from media.encode import PART_SUFFIX
from media.ffmpeg import ProcessGroup
from media.segments import SEGMENT_SUFFIX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """One run of a job, as decided before its loop."""

    spec: JobSpec
    media: JobMedia
    layout: JobLayout
    run: int  # this run's number (above 1: it resumes what earlier runs left)
    scale: float
    frame_format: FrameFormat
    yuv: YuvSpec | None  # YUV frames: the conversion the workers apply

    def manifest(
        self,
        manifest_id: str,
        worker_id: str,
        batches: tuple[Batch, ...],
        *,
        segment: SegmentWork | None = None,
        frame_format: FrameFormat | None = None,
    ) -> Manifest:
        """The manifest that hands ``batches`` to worker ``worker_id``: as frame files, or as a
        ``segment`` to decode and encode (its frames reach the model as ``frame_format``)."""
        spec = self.spec
        return Manifest(
            job_id=self.layout.job_id,
            manifest_id=manifest_id,
            worker_id=worker_id,
            model=spec.model,
            batches=batches,
            scale=self.scale,
            tile=spec.tile,
            frame_format=frame_format or self.frame_format,
            png_compression=spec.png_compression,
            bit_depth=self.media.bit_depth,
            yuv=self.yuv,
            segment=segment,
        )


@dataclass(frozen=True)
class FramePlan:
    """How the frames runner cuts the job, and what earlier runs left that it takes in."""

    batch_size: int
    chunks: ChunkPlan
    batches: tuple[Batch, ...]
    dedup: DuplicateMap | None  # --dedup: which frames reuse another's upscale
    encoded: frozenset[int]  # chunks whose part (segment) an earlier run finished
    outputs_on_disk: Mapping[int, frozenset[int]]  # chunk -> its batches whose output frames are sound
    batch_ids: Mapping[int, int] = field(default_factory=dict)  # --dedup: upscaled frame -> its batch

    @property
    def held(self) -> Collection[int]:
        """Frames no worker upscales (--dedup: their reference's output is theirs)."""
        return self.dedup.duplicates.keys() if self.dedup is not None else frozenset()

    def batch_of(self, frame: int) -> int | None:
        """The batch that upscales ``frame``; None for a held frame."""
        if self.dedup is None:
            return (frame - 1) // self.batch_size
        return self.batch_ids.get(frame)


def plan_frames(run: RunPlan, stats: dict[str, float]) -> FramePlan:
    """Cut the job into chunks and batches, and take in what earlier runs left (blocking: it reads
    the job directory, and ``--dedup`` decodes the whole video once unless an earlier run kept the
    map: its time goes to ``stats``). Raises :class:`JobError` when no chunk fits the disk budget."""
    spec, media, layout = run.spec, run.media, run.layout
    input_bytes, output_bytes = media.frame_bytes(run.scale, run.frame_format)
    batch_size = media.batch_size(spec.batch_size)
    try:
        chunks = plan_chunks(
            media.frame_count,
            batch_size=batch_size,
            input_frame_bytes=input_bytes,
            output_frame_bytes=output_bytes,
            max_disk=spec.max_disk,
            max_chunk_frames=spec.max_chunk_frames,
        )
    except PlanningError as exc:
        if run.run == 1:  # nothing of this job is on disk: leave nothing behind
            shutil.rmtree(layout.job_dir, True)
        raise JobError(f"cannot start: {exc}", resumable=False) from exc
    dedup: DuplicateMap | None = None
    batch_ids: dict[int, int] = {}
    if spec.dedup:
        started = time.monotonic()
        dedup = _duplicate_map(run, chunks)
        stats["dedup_s"] = time.monotonic() - started
        stats["frames_upscaled"] = dedup.upscaled_count
        batches = plan_unique_batches(chunks, dedup, batch_size)
        batch_ids = {frame: b.id for b in batches for frame in b.frames}
    else:
        batches = plan_batches(media.frame_count, batch_size, ["all"]).batches
    encoded, on_disk = _scan_earlier_runs(run, chunks, batches)
    return FramePlan(batch_size, chunks, tuple(batches), dedup, encoded, on_disk, batch_ids)


def _duplicate_map(run: RunPlan, chunks: ChunkPlan) -> DuplicateMap:
    """--dedup: the map an earlier run kept, or one found now (a decode of the whole video)."""
    media = run.media
    assert isinstance(media, VideoMedia)
    bits = run.yuv.bits if run.yuv is not None else media.bit_depth
    level = dedup_level(run.spec.dedup_level)
    return job_duplicate_map(
        run.layout.job_dir, media.info, chunks, yuv=run.yuv is not None, bits=bits, level=level
    )


def _scan_earlier_runs(
    run: RunPlan, chunks: ChunkPlan, batches: Iterable[Batch]
) -> tuple[frozenset[int], dict[int, frozenset[int]]]:
    """What earlier runs left that can be trusted: complete segments, and batches whose output
    frames are all whole and of the right size (a damaged frame is deleted and redone)."""
    layout, media, fmt = run.layout, run.media, run.frame_format
    _check_segments_record(run, chunks)
    for leftover in layout.segments_dir.glob(f".*{PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)  # a killed encoder's; this coordinator holds the job lock
    encoded = frozenset(c.index for c in chunks.chunks if media.part_done(layout, c))
    on_disk: dict[int, set[int]] = {}
    for batch in batches:
        chunk = chunks.chunk_of(batch.frames[0])
        if chunk.index in encoded:
            continue
        paths = [layout.output_dir / frame_filename(f, fmt) for f in batch.frames]
        if not all(path.is_file() for path in paths):
            continue
        damaged = [
            path
            for frame, path in zip(batch.frames, paths, strict=True)
            if not frame_file_is_sound(
                path, fmt, *media.output_size(frame, run.scale), bit_depth=media.bit_depth
            )
        ]
        for path in damaged:
            log.warning("output frame %s of an earlier run is damaged; its batch is upscaled again", path)
            path.unlink(missing_ok=True)
        if not damaged:
            on_disk.setdefault(chunk.index, set()).add(batch.id)
    for chunk in chunks.chunks:
        if chunk.index in encoded:
            remove_frames(chunk, layout.input_dir, fmt)
            if not run.spec.keep_frames:
                remove_frames(chunk, layout.output_dir, fmt)
    return encoded, {index: frozenset(ids) for index, ids in on_disk.items()}


def _check_segments_record(run: RunPlan, chunks: ChunkPlan) -> None:
    """Segments of an earlier run count only if cut and encoded the same way."""
    segments_dir, encode = run.layout.segments_dir, run.spec.encode
    record = SegmentsRecord(
        chunk_frames=chunks.chunk_frames, encode={**asdict(encode), "extra_args": list(encode.extra_args)}
    )
    record_file = segments_dir / "segments.json"
    previous: SegmentsRecord | None = None
    with contextlib.suppress(OSError, DocumentError):
        previous = SegmentsRecord.from_json(record_file.read_bytes(), source=record_file)
    if previous != record and any(segments_dir.glob(f"*{SEGMENT_SUFFIX}")):
        log.info("encoder settings or chunking changed: the earlier segments are encoded again")
        for segment in segments_dir.glob(f"*{SEGMENT_SUFFIX}"):
            segment.unlink()
    write_json_atomic(record_file, record.to_json())


def remove_frames(chunk: Chunk, directory: Path, frame_format: FrameFormat) -> None:
    for frame in chunk.frames:
        (directory / frame_filename(frame, frame_format)).unlink(missing_ok=True)


# -- what a runner gets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTools:
    """What the job handle lends the runner of one run: the fleet, where progress and stats go, the
    job's threads (waited for before the job lets go of its lock) and its ffmpeg processes (killed
    at once on cancel)."""

    fleet: WorkerFleet
    meter: ProgressMeter
    emit: Callable[[JobEvent], None]
    threads: JobThreads
    processes: ProcessGroup
    stats: dict[str, float]  # stage timings (see README: --stats); a runner adds its own


class Runner(Protocol):
    """A way of running a planned job on the workers (the frames runner is one): it produces the
    output's parts and returns the chunks, in order, that :meth:`JobMedia.finish` joins. ``ready``
    gives the workers once they have loaded their model (it raises if none has)."""

    async def __call__(
        self, plan: RunPlan, tools: RunTools, ready: Awaitable[list[WorkerHandle]]
    ) -> tuple[Chunk, ...]: ...
