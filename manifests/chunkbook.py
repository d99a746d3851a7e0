"""The coordinator's book of chunks: where each chunk of a streaming job is, and what disk it holds.

Pure state, no I/O, shaped like :class:`manifests.ledger.JobLedger`: the job tells it what happened
(an event method per step) and asks it what may happen next. A chunk moves forward only::

    WAITING ──admit──> EXTRACTING ──all batches handed on──> UPSCALING ──upscaled──> UPSCALED
                                                                                      │ encoding_started
    ENCODED <──encoded── ENCODING <───────────────────────────────────────────────────┘

and a job that resumes enters some chunks further on: a chunk whose segment is on disk starts
``ENCODED``, one whose every output frame is on disk starts ``UPSCALED`` (nothing to extract or
upscale: it only needs its segment encoded).

Disk budget: a chunk holds the upper bound of its input and output frames from admission until it
is upscaled, then its output frames until it is encoded. A chunk is admitted only in order and only
while what is held plus its cost fits the budget, except that a chunk may always be admitted when
nothing is held (one chunk must be able to run). ``budget=None`` enforces nothing (``--keep-frames``).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from manifests.chunks import Chunk, ChunkPlan
from manifests.manifest import Batch


class ChunkStage(enum.IntEnum):
    """Where a chunk is; the order is the order of the pipeline (a chunk never moves back)."""

    WAITING = 0  # its input frames are still to be extracted
    EXTRACTING = 1  # admitted: its input frames are being extracted, its batches handed on
    UPSCALING = 2  # every batch is with the ledger (dealt, done or pending)
    UPSCALED = 3  # every output frame is on disk; the input frames are freed
    ENCODING = 4  # its segment is being encoded
    ENCODED = 5  # its segment is on disk; its frames are freed


@dataclass(frozen=True)
class Admission:
    """A chunk let in for extraction; ``skip`` are the batches whose outputs are on disk already
    (their input frames need not be written)."""

    chunk: Chunk
    skip: frozenset[int]


@dataclass
class _Entry:
    chunk: Chunk
    batches: tuple[Batch, ...]
    stage: ChunkStage
    done_on_disk: frozenset[int] = frozenset()
    handed_on: set[int] = field(default_factory=set)  # batch ids given to the ledger
    frames_left: dict[int, int] = field(default_factory=dict)  # batch id -> frames still to extract
    holds: int = 0  # bytes of the budget it holds


class ChunkBook:
    def __init__(
        self,
        plan: ChunkPlan,
        batches: Sequence[Batch],
        *,
        budget: int | None,
        encoded: Iterable[int] = (),
        outputs_on_disk: Mapping[int, Iterable[int]] | None = None,
        held: Collection[int] = frozenset(),
    ) -> None:
        """``encoded``: chunk indices whose segment exists; ``outputs_on_disk``: chunk index -> ids of
        its batches whose output frames all exist. ``batches`` are the job's, in frame order; they
        cover every frame but the ``held`` ones (``--dedup``: frames that reuse another's output)."""
        self.plan = plan
        self.budget = budget
        self.used = 0
        self.peak = 0
        by_chunk: dict[int, list[Batch]] = {}
        for batch in batches:
            by_chunk.setdefault(plan.chunk_of(batch.frames[0]).index, []).append(batch)
        finished = set(encoded)
        found = outputs_on_disk or {}
        self._entries: list[_Entry] = []
        for chunk in plan.chunks:
            own = tuple(by_chunk.get(chunk.index, ()))
            held_here = sum(1 for f in chunk.frames if f in held) if held else 0
            if sum(len(b) for b in own) + held_here != chunk.count:
                raise ValueError(f"the batches of chunk {chunk.index} do not cover its {chunk.count} frames")
            on_disk = frozenset(found.get(chunk.index, ())) & {b.id for b in own}
            if chunk.index in finished:
                self._entries.append(_Entry(chunk, (), ChunkStage.ENCODED))
            elif len(on_disk) == len(own):
                entry = _Entry(chunk, own, ChunkStage.UPSCALED)
                self._hold(entry, plan.output_cost(chunk))
                self._entries.append(entry)
            else:
                self._entries.append(_Entry(chunk, own, ChunkStage.WAITING, on_disk))

    # -- questions --------------------------------------------------------------------------------

    def stage(self, index: int) -> ChunkStage:
        return self._entries[index].stage

    def batches(self, index: int) -> tuple[Batch, ...]:
        return self._entries[index].batches

    def in_stage(self, stage: ChunkStage) -> list[Chunk]:
        return [e.chunk for e in self._entries if e.stage is stage]

    @property
    def all_encoded(self) -> bool:
        return all(e.stage is ChunkStage.ENCODED for e in self._entries)

    @property
    def all_upscaled(self) -> bool:
        return all(e.stage >= ChunkStage.UPSCALED for e in self._entries)

    @property
    def needs_extraction(self) -> bool:
        return any(e.stage is ChunkStage.WAITING for e in self._entries)

    def frames_in(self, *stages: ChunkStage) -> int:
        return sum(e.chunk.count for e in self._entries if e.stage in stages)

    def next_admission(self) -> Chunk | None:
        """The next chunk to extract, if the budget lets it in now (chunks are admitted in order)."""
        entry = next((e for e in self._entries if e.stage is ChunkStage.WAITING), None)
        if entry is None:
            return None
        cost = self._cost(entry.chunk)
        if self.budget is not None and self.used and self.used + cost > self.budget:
            return None
        return entry.chunk

    # -- events -----------------------------------------------------------------------------------

    def admit(self, index: int) -> Admission:
        """Chunk ``index`` (the one :meth:`next_admission` names) goes to extraction."""
        entry = self._entries[index]
        if entry.chunk != self.next_admission():
            raise ValueError(f"chunk {index} is not the next one the budget admits")
        self._hold(entry, self._cost(entry.chunk))
        entry.stage = ChunkStage.EXTRACTING
        entry.frames_left = {b.id: len(b) for b in entry.batches if b.id not in entry.done_on_disk}
        return Admission(entry.chunk, entry.done_on_disk)

    def ready_batches(self, index: int) -> list[tuple[Batch, bool]]:
        """Batches of an extracting chunk that can go to the ledger now, with whether each is done
        already (found on disk). Batches found on disk are ready at once."""
        entry = self._entries[index]
        self._expect(entry, ChunkStage.EXTRACTING)
        ready = [
            (b, b.id in entry.done_on_disk)
            for b in entry.batches
            if b.id not in entry.handed_on and entry.frames_left.get(b.id, 0) == 0
        ]
        entry.handed_on.update(b.id for b, _ in ready)
        if len(entry.handed_on) == len(entry.batches):
            entry.stage = ChunkStage.UPSCALING
            entry.handed_on.clear()  # per-batch bookkeeping is done: a long job must not keep it
            entry.frames_left.clear()
        return ready

    def frame_extracted(self, frame: int) -> int | None:
        """Frame ``frame`` is on disk (or not needed); returns its chunk's index, or None for a frame
        nothing waits for (held, or of a batch found on disk) once its chunk has moved on."""
        entry = self._entries[self.plan.chunk_of(frame).index]
        batch = self._batch_of(entry, frame) if entry.batches else None
        if entry.stage > ChunkStage.EXTRACTING and (batch is None or batch.id in entry.done_on_disk):
            # Frames that come after their chunk moved on and that nothing waits for: a held frame
            # (an encoded chunk has forgotten its batches), or one of a batch found on disk, which is
            # handed on at once, so a chunk whose last batches were found moves on before them.
            return None
        self._expect(entry, ChunkStage.EXTRACTING)
        if batch is None:
            return None
        if batch.id in entry.frames_left:
            entry.frames_left[batch.id] -= 1
        return entry.chunk.index

    def upscaled(self, index: int) -> None:
        """Every output frame of the chunk is on disk: its input frames are freed."""
        entry = self._entries[index]
        self._expect(entry, ChunkStage.UPSCALING)
        entry.stage = ChunkStage.UPSCALED
        self._release(entry, entry.holds - self.plan.output_cost(entry.chunk))

    def encoding_started(self, index: int) -> None:
        entry = self._entries[index]
        self._expect(entry, ChunkStage.UPSCALED)
        entry.stage = ChunkStage.ENCODING

    def encoded(self, index: int) -> tuple[Batch, ...]:
        """The chunk's segment is on disk: its frames are freed. Returns its batches (to forget)."""
        entry = self._entries[index]
        self._expect(entry, ChunkStage.ENCODING)
        entry.stage = ChunkStage.ENCODED
        self._release(entry, entry.holds)
        batches, entry.batches = entry.batches, ()
        return batches

    # -- internals --------------------------------------------------------------------------------

    @staticmethod
    def _batch_of(entry: _Entry, frame: int) -> Batch | None:
        """The batch of ``entry`` that holds ``frame`` (None: a held frame, in no batch)."""
        firsts = [b.frames[0] for b in entry.batches]
        position = bisect.bisect_right(firsts, frame) - 1
        if position < 0:
            return None
        batch = entry.batches[position]
        return batch if frame in batch.frames else None

    def _cost(self, chunk: Chunk) -> int:
        return self.plan.input_cost(chunk) + self.plan.output_cost(chunk)

    def _hold(self, entry: _Entry, cost: int) -> None:
        entry.holds += cost
        self.used += cost
        self.peak = max(self.peak, self.used)

    def _release(self, entry: _Entry, cost: int) -> None:
        entry.holds -= cost
        self.used -= cost

    @staticmethod
    def _expect(entry: _Entry, stage: ChunkStage) -> None:
        if entry.stage is not stage:
            raise ValueError(
                f"chunk {entry.chunk.index} is {entry.stage.name.lower()}, not {stage.name.lower()}"
            )
