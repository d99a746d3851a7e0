"""Held frames upscaled once (``--dedup``): the duplicate map of a job, and the batches it leaves.

The coordinator decides, frame by frame, whether a decoded frame repeats the last frame that was
upscaled (:mod:`coordinator.dedup` measures it). A frame that does is a *duplicate*: it is not
extracted, not given to any worker, and its output is its *reference*'s upscaled frame (the encoder
reads that file for it). The map is decided once per job, before any frame is extracted, and kept
in the job directory as ``dedup.json``, so a run that resumes after a kill deals the same batches::

    {"format": "esrfarm.dedup/1", "frames": 132, "chunk_frames": 256, "level": "strict",
     "threshold": 3.0, "block": 16, "duplicates": [[2, 1], [3, 1], [5, 4]]}

How close is close enough is a :class:`DedupLevel` (``--dedup-level``): ``strict`` (the default) or
``loose``, each measured (RESULTS.md "Held frames"); a map is kept only for the level it was made
for.

A reference always lies in its duplicate's chunk (the comparison starts afresh at each chunk's first
frame), so a chunk's segment needs only its own output frames: chunks, ``--max-disk`` and the removal
of a chunk's frames once its segment is encoded work as without ``--dedup``. The map is valid only
for the chunk size it was made for (``chunk_frames``); another one is made for another.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import msgspec

from manifests.chunks import Chunk, ChunkPlan
from manifests.manifest import Batch
from manifests.records import Document, Positive

DEDUP_FORMAT = "esrfarm.dedup/1"
#: The side of the detector's luma windows, in samples (chroma planes of 4:2:0 frames: half of it).
DEDUP_BLOCK = 16
DEDUP_FILE = "dedup.json"
_KIND = "duplicate map"


class DedupLevel(msgspec.Struct, frozen=True):
    """How close a frame must come to the last upscaled frame to reuse its upscale.

    The score of a pair is the largest mean absolute difference over windows of :data:`DEDUP_BLOCK`
    samples, taken of the signed difference averaged over ``blur`` x ``blur`` cells first (1: none);
    a repeat scores at most ``threshold`` and moves no plane's mean by more than ``shift_threshold``
    (8-bit levels). The values are measured (``benchmarks/dedup.py``, RESULTS.md "Held frames"):

    - ``strict`` (the default): never reused a frame that differs in any clip measured, a 16x16 box
      at 10 % included; re-encoded at CRF 28 (heavy compression), some noisy repeats are upscaled
      again (held 2 and 3: 0.65 and 0.48 of the frames upscaled, not 1/2 and 1/3).
    - ``loose``: for heavily compressed sources: catches those repeats (1/2 and 1/3 at CRF 28), and
      still never reuses a step of a 1-pixel pan, a fade or a 16x16 box at 30 %, but reuses a change
      as faint as a 16x16 box at 10 % (about 3 levels over the box) even in a clean source.
    """

    name: str
    blur: int
    threshold: float
    shift_threshold: float

    def identity(self) -> dict[str, object]:
        """What the job's identity keeps of the level (strict: as before levels existed)."""
        named: dict[str, object] = {"block": DEDUP_BLOCK, "threshold": self.threshold}
        if self.name != STRICT:
            named.update(level=self.name, blur=self.blur, shift_threshold=self.shift_threshold)
        return named


STRICT = "strict"
#: The levels of ``--dedup-level``, by name.
DEDUP_LEVELS: Mapping[str, DedupLevel] = MappingProxyType(
    {
        STRICT: DedupLevel(STRICT, blur=1, threshold=3.0, shift_threshold=0.2),
        "loose": DedupLevel("loose", blur=2, threshold=4.0, shift_threshold=0.2),
    }
)


def dedup_level(name: str) -> DedupLevel:
    """The level called ``name`` (ValueError names the levels there are)."""
    try:
        return DEDUP_LEVELS[name]
    except KeyError:
        raise ValueError(f"no --dedup-level {name!r}: choose one of {', '.join(DEDUP_LEVELS)}") from None


def dedup_level_problem(dedup: bool, name: str) -> str | None:
    """What is wrong with asking for level ``name`` with ``dedup`` on or off, in a field error's words
    (None: nothing); the rule of every spec that takes a level (an upscale job's, a comparison's)."""
    if name not in DEDUP_LEVELS:
        return f"must be one of {', '.join(DEDUP_LEVELS)}, not {name!r}"
    if name != STRICT and not dedup:
        return "is for --dedup: say --dedup as well"
    return None


class DuplicateMap(Document, kw_only=True, dict=True):
    """Which frames of a job repeat an upscaled one: ``pairs`` (``"duplicates"`` in the file) maps a
    frame to its reference (a frame upscaled, earlier in the same chunk); :attr:`duplicates` is the
    same as a mapping. Frames not in it are upscaled."""

    KIND = _KIND
    FORMAT = DEDUP_FORMAT

    frames: Positive
    chunk_frames: Positive
    level: str = STRICT  # the DedupLevel it was made with (maps kept before levels: strict)
    threshold: float = 0.0
    block: Positive
    pairs: tuple[tuple[Positive, Positive], ...] = msgspec.field(default=(), name="duplicates")

    def _check(self) -> None:
        self.pairs = tuple(sorted((frame, reference) for frame, reference in self.pairs))
        duplicates = dict(self.pairs)
        if len(duplicates) != len(self.pairs):
            raise self.fail("duplicates", "names a frame twice")
        for frame, reference in self.pairs:
            if not 1 <= reference < frame <= self.frames:
                raise self.fail("duplicates", f"frame {frame} cannot repeat frame {reference}")
            if reference in duplicates:
                raise self.fail("duplicates", f"frame {frame}'s reference {reference} is itself a duplicate")
            if (frame - 1) // self.chunk_frames != (reference - 1) // self.chunk_frames:
                raise self.fail("duplicates", f"frame {frame} repeats frame {reference} of another chunk")

    @classmethod
    def of(
        cls, frames: int, chunk_frames: int, level: DedupLevel, duplicates: Mapping[int, int]
    ) -> DuplicateMap:
        """The map of ``duplicates`` (frame: reference), found at ``level``."""
        return cls(
            frames=frames, chunk_frames=chunk_frames, level=level.name, threshold=level.threshold,
            block=DEDUP_BLOCK, pairs=tuple(duplicates.items()),
        )  # fmt: skip

    @functools.cached_property
    def duplicates(self) -> Mapping[int, int]:
        """Each duplicate frame's reference."""
        return MappingProxyType(dict(self.pairs))

    def source(self, frame: int) -> int:
        """The frame whose upscaled output is frame ``frame``'s output (itself unless a duplicate)."""
        return self.duplicates.get(frame, frame)

    @property
    def upscaled_count(self) -> int:
        return self.frames - len(self.pairs)

    def matches(self, frames: int, chunk_frames: int, level: DedupLevel) -> bool:
        """Whether this map was made for a job of ``frames`` frames cut in chunks of ``chunk_frames``,
        at ``level`` (as it is now: a level's threshold may be measured again)."""
        return (
            self.frames == frames
            and self.chunk_frames == chunk_frames
            and self.level == level.name
            and self.threshold == level.threshold
            and self.block == DEDUP_BLOCK
        )


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
