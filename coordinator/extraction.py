"""The extraction bridge: one thread decodes the input once, the job's loop lets its chunks in.

The thread (:meth:`JobMedia.extract`) writes the frames of the chunks still to be extracted; at a
chunk's first frame it waits until the chunk book admits the chunk (the disk budget), and skips the
frames of batches whose outputs are on disk already. Each frame written is handed to the loop,
which gives the ledger every batch whose frames are all there: workers start before the whole
chunk is extracted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from coordinator.errors import EXPECTED_ERRORS
from coordinator.plan import FramePlan, RunPlan
from coordinator.progress import ProgressMeter
from coordinator.threads import JobThreads
from manifests.chunkbook import Admission, ChunkBook, ChunkStage
from manifests.ledger import JobLedger

log = logging.getLogger(__name__)


class _Stopped(Exception):
    """Extraction was told to stop (the job is ending)."""


class ExtractionBridge:
    def __init__(
        self,
        plan: RunPlan,
        frames: FramePlan,
        book: ChunkBook,
        ledger: JobLedger,
        meter: ProgressMeter,
        stats: dict[str, float],
    ) -> None:
        self._plan, self._frames, self._book, self._ledger = plan, frames, book, ledger
        self._meter, self._stats = meter, stats
        self._to_extract = frozenset(c.index for c in book.in_stage(ChunkStage.WAITING))
        self._admissions: dict[int, asyncio.Future[Admission | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[None] | None = None  # the thread's run, once started
        self._stopping = False
        self._callback_error: Exception | None = None

    def start(self, threads: JobThreads) -> None:
        self._loop = asyncio.get_running_loop()
        self.future = asyncio.ensure_future(threads.run(self._extract))

    # -- on the loop ------------------------------------------------------------------------------

    def admit_chunks(self) -> None:
        """Let the thread go on with every chunk the book admits now."""
        while (chunk := self._book.next_admission()) is not None and chunk.index in self._admissions:
            future = self._admissions.pop(chunk.index)
            future.set_result(self._book.admit(chunk.index))

    def raise_if_failed(self) -> None:
        if self._callback_error is not None:
            raise self._callback_error
        extraction = self.future
        if extraction is not None and extraction.done() and extraction.exception() is not None:
            extraction.result()

    async def wait(self) -> None:
        """Until the thread has ended (raises its error)."""
        assert self.future is not None
        await self.future

    def stop(self) -> None:
        """The job is ending: the thread stops at its next chunk (its ffmpeg is the caller's to kill)."""
        self._stopping = True
        for future in self._admissions.values():
            if not future.done():
                future.set_result(None)

    async def _admission(self, index: int) -> Admission | None:
        """The extraction thread waits here until the book admits chunk ``index`` (None: stop)."""
        if self._stopping:
            return None
        future = self._admissions[index] = asyncio.get_running_loop().create_future()
        return await future

    def _frame_extracted(self, index: int) -> None:
        """Frame ``index`` is on disk (or not needed): batches whose frames are all there go to the
        ledger at once, so workers start before the whole chunk is extracted."""
        if self._stopping:
            return
        self._meter.frames_extracted += 1
        try:
            chunk = self._book.frame_extracted(index)
            for batch, done in self._book.ready_batches(chunk) if chunk is not None else ():
                self._ledger.add([batch], done=[batch.id] if done else [])
                if done:
                    self._meter.found_batch_frames += len(batch)
        except Exception as exc:  # a callback's error would be lost: the loop raises it
            self._callback_error = exc

    # -- on the thread ----------------------------------------------------------------------------

    def _extract(self) -> None:
        """Decodes the input once, writing the frames of the chunks the book admits."""
        plan, frames, loop = self._plan, self._frames, self._loop
        assert loop is not None
        if not self._to_extract:
            return
        chunks = frames.chunks
        skip: frozenset[int] = frozenset()

        def gate(index: int) -> bool:
            nonlocal skip
            chunk = chunks.chunk_of(index)
            if chunk.index not in self._to_extract:
                return False
            if index == chunk.first:
                admitted = asyncio.run_coroutine_threadsafe(self._admission(chunk.index), loop).result()
                if admitted is None:
                    raise _Stopped
                skip = admitted.skip
            batch = frames.batch_of(index)
            return batch is not None and batch not in skip

        def on_frame(index: int) -> None:
            if chunks.chunk_of(index).index in self._to_extract:
                with contextlib.suppress(RuntimeError):  # the loop closed: the job is over
                    loop.call_soon_threadsafe(self._frame_extracted, index)

        media, started = plan.media, time.monotonic()
        try:
            media.extract(plan.layout.input_dir, plan.frame_format, plan.spec.png_compression, gate, on_frame)
        except _Stopped:
            return
        except EXPECTED_ERRORS:
            if self._stopping:
                return  # killed on purpose: the job is ending for another reason
            raise
        self._stats["extract_s"] = time.monotonic() - started
        log.info("extracted %d frames in %.1f s", media.frame_count, time.monotonic() - started)
