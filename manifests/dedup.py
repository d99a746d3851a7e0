"""Held frames upscaled once (``--dedup``): the duplicate map of a job, and the batches it leaves.

The coordinator decides, frame by frame, whether a decoded frame repeats the last frame that was
upscaled (:mod:`coordinator.dedup` measures it). A frame that does is a *duplicate*: it is not
extracted, not given to any worker, and its output is its *reference*'s upscaled frame (the encoder
reads that file for it). The map is decided once per job, before any frame is extracted, and kept
in the job directory as ``dedup.json``, so a run that resumes after a kill deals the same batches::

    {"format": "esrfarm.dedup/1", "frames": 132, "chunk_frames": 256, "threshold": 2.0,
     "block": 16, "duplicates": [[2, 1], [3, 1], [5, 4]]}

A reference always lies in its duplicate's chunk (the comparison starts afresh at each chunk's first
frame), so a chunk's segment needs only its own output frames: chunks, ``--max-disk`` and the removal
of a chunk's frames once its segment is encoded work as without ``--dedup``. The map is valid only
for the chunk size it was made for (``chunk_frames``); another one is made for another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from manifests._fields import Fields, check_format, decode
from manifests.chunks import Chunk, ChunkPlan
from manifests.jsonio import dumps
from manifests.manifest import Batch

DEDUP_FORMAT = "esrfarm.dedup/1"
DEDUP_FILE = "dedup.json"
_KIND = "duplicate map"


@dataclass(frozen=True)
class DuplicateMap:
    """Which frames of a job repeat an upscaled one: ``duplicates`` maps a frame to its reference
    (a frame upscaled, earlier in the same chunk). Frames not in it are upscaled."""

    frames: int
    chunk_frames: int
    threshold: float
    block: int
    duplicates: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "duplicates", MappingProxyType(dict(sorted(self.duplicates.items()))))
        if self.frames < 1 or self.chunk_frames < 1 or self.block < 1:
            raise ValueError("a duplicate map needs at least one frame, one frame per chunk and a block")
        for frame, reference in self.duplicates.items():
            if not 1 <= reference < frame <= self.frames:
                raise ValueError(f"frame {frame} cannot repeat frame {reference}")
            if reference in self.duplicates:
                raise ValueError(f"frame {frame}'s reference {reference} is itself a duplicate")
            if (frame - 1) // self.chunk_frames != (reference - 1) // self.chunk_frames:
                raise ValueError(f"frame {frame} repeats frame {reference} of another chunk")

    def source(self, frame: int) -> int:
        """The frame whose upscaled output is frame ``frame``'s output (itself unless a duplicate)."""
        return self.duplicates.get(frame, frame)

    @property
    def upscaled_count(self) -> int:
        return self.frames - len(self.duplicates)

    def matches(self, frames: int, chunk_frames: int) -> bool:
        """Whether this map was made for a job of ``frames`` frames cut in chunks of ``chunk_frames``."""
        return self.frames == frames and self.chunk_frames == chunk_frames

    def to_json(self) -> bytes:
        return dumps(
            {
                "format": DEDUP_FORMAT,
                "frames": self.frames,
                "chunk_frames": self.chunk_frames,
                "threshold": self.threshold,
                "block": self.block,
                "duplicates": [[frame, reference] for frame, reference in self.duplicates.items()],
            }
        )

    @classmethod
    def from_json(cls, data: bytes, *, source: str | Path | None = None) -> DuplicateMap:
        """Parse and validate; raises :class:`DocumentError` (or :class:`FormatVersionError`)."""
        document = decode(_KIND, data, source)
        check_format(_KIND, document, DEDUP_FORMAT, source)
        f = Fields(_KIND, document, source=source)
        f.reject_unknown({"format", "frames", "chunk_frames", "threshold", "block", "duplicates"})
        pairs = f.data.get("duplicates")
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in pairs
        ):
            f.fail("duplicates", "must be a list of [frame, reference] pairs of integers")
        threshold = f.opt_number("threshold")
        try:
            return cls(
                frames=f.integer("frames", minimum=1),
                chunk_frames=f.integer("chunk_frames", minimum=1),
                threshold=0.0 if threshold is None else threshold,
                block=f.integer("block", minimum=1),
                duplicates={frame: reference for frame, reference in pairs},
            )
        except ValueError as exc:
            f.fail("duplicates", str(exc))


def plan_unique_batches(plan: ChunkPlan, dedup: DuplicateMap | None, batch_size: int) -> tuple[Batch, ...]:
    """The job's batches: each chunk's upscaled frames (all of them without ``dedup``) in runs of
    ``batch_size``, in frame order, numbered from 0. A batch never spans two chunks."""
    batches: list[Batch] = []
    for chunk in plan.chunks:
        frames = [f for f in chunk.frames if dedup is None or f not in dedup.duplicates]
        for start in range(0, len(frames), batch_size):
            batches.append(Batch(len(batches), tuple(frames[start : start + batch_size])))
    return tuple(batches)


def chunk_sources(chunk: Chunk, dedup: DuplicateMap | None) -> list[int]:
    """For each frame of ``chunk`` in order, the frame whose output file it is encoded from."""
    if dedup is None:
        return list(chunk.frames)
    return [dedup.source(frame) for frame in chunk.frames]
