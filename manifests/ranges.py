"""The segment transport's plan (``--transport segments``): a job's frames cut into contiguous
ranges, one segment file each, and each range cut into batches for per-batch progress.

Pure functions of their arguments. A range is a :class:`~manifests.chunks.Chunk` (frames
``first .. first + count - 1``, encoded as segment ``index``), so the frames design's segment
names, checks and join serve both transports. Batch ids number the batches of the whole job from
0 in frame order, as :func:`~manifests.planner.plan_batches` does, so a range's batches keep their
ids when the range goes to another worker.

Range edges fall on batch edges (``--segment-frames`` is rounded up to whole batches), so a
segment job's batches are the frames design's: the model sees the same frames together, and the
outputs of both transports are the same frame for frame.

How long a range should be (``--segment-frames``, default :data:`DEFAULT_SEGMENT_FRAMES`): each
range costs its worker a seek to the keyframe before its first frame (up to a GOP of frames
decoded and dropped: 250 for x264's default; decoding is a few ms a frame against tens to
hundreds for the model), an encoder start, and one extra IDR frame in the output (a few per cent
of a 64-frame segment's bits at the same quality). A range is also what a failure costs (it is
redone from its start) and the unit of balance between workers (the last ranges decide when the
job ends). 64 frames (8 batches of 8) keeps the overheads small against the upscaling of 64
frames, a retry under a few seconds of GPU time, and a 10 s clip in 5 ranges; long videos on many
hosts may take longer ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifests.chunks import Chunk
from manifests.errors import PlanningError
from manifests.layout import DEFAULT_FIRST_FRAME
from manifests.manifest import Batch
from manifests.planner import plan_batches

DEFAULT_SEGMENT_FRAMES = 64


@dataclass(frozen=True)
class RangePlan:
    """Every range of a job in frame order, with the batches of each (ids count across the job)."""

    ranges: tuple[Chunk, ...]
    batches: tuple[tuple[Batch, ...], ...]  # batches[i]: range i's, contiguous, covering it exactly

    @property
    def segment_frames(self) -> int:
        return self.ranges[0].count if self.ranges else 0

    def unit(self, index: int) -> Batch:
        """Range ``index`` as one batch of the job's ledger (id ``index``): the unit that is dealt,
        retried from its start, and done when its segment file is whole."""
        chunk = self.ranges[index]
        return Batch.range(index, chunk.first, chunk.first + chunk.count)

    def units(self) -> tuple[Batch, ...]:
        return tuple(self.unit(index) for index in range(len(self.ranges)))


def plan_ranges(
    frame_count: int, segment_frames: int, batch_size: int, *, first_frame: int = DEFAULT_FIRST_FRAME
) -> RangePlan:
    """Cut frames ``first_frame .. first_frame + frame_count - 1`` into ranges of ``segment_frames``
    rounded up to a whole number of batches (the last range may be shorter), and each range into
    batches of ``batch_size``. Range edges fall on batch edges, so the batches are the frames
    design's (:func:`~manifests.planner.plan_batches`), ids included: the model sees the same
    frames together whichever the transport."""
    if frame_count < 1:
        raise PlanningError(f"a segment job needs at least one frame, not {frame_count}")
    if segment_frames < 1:
        raise PlanningError(f"segment frames must be at least 1, not {segment_frames}")
    # plan_batches refuses a batch size under 1, before it divides anything here
    every = plan_batches(frame_count, batch_size, ["all"], first_frame=first_frame).batches
    per_range = -(-segment_frames // batch_size)  # whole batches per range
    batches = tuple(every[at : at + per_range] for at in range(0, len(every), per_range))
    ranges = tuple(
        Chunk(index, own[0].frames[0], sum(len(batch) for batch in own)) for index, own in enumerate(batches)
    )
    return RangePlan(ranges, batches)
