"""The frames runner (a :class:`~coordinator.plan.Runner`): a job's frames through shared storage.

The input's frames are cut into chunks (:func:`coordinator.plan.plan_frames`), and each chunk moves
through the chunk book (``manifests.chunkbook``): extraction of chunk k+1 (the extraction bridge,
:mod:`coordinator.extraction`), upscaling of chunk k (the dispatcher, :mod:`coordinator.dispatch`)
and encoding of chunk k-1 (here, on a pool of encoder threads) overlap, and frame data on disk stays
under ``max_disk``. Each chunk becomes its output part (a video-only segment, or its images).

Its loop takes one step every ``poll_interval_s`` until every part is on disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path

from coordinator.dispatch import Dispatcher
from coordinator.events import SegmentDone, Stage
from coordinator.extraction import ExtractionBridge
from coordinator.fleet import WorkerHandle
from coordinator.memory import release_free_memory
from coordinator.plan import FramePlan, RunPlan, RunTools, plan_frames, remove_frames
from manifests.chunkbook import ChunkBook, ChunkStage
from manifests.chunks import Chunk, format_size
from manifests.dedup import chunk_sources
from manifests.layout import frame_filename
from manifests.ledger import JobLedger
from manifests.manifest import Batch

log = logging.getLogger(__name__)


async def run_frames(
    plan: RunPlan, tools: RunTools, ready: Awaitable[list[WorkerHandle]]
) -> tuple[Chunk, ...]:
    """Plan the chunks, then extract, upscale and encode every one; the parts are on disk afterwards."""
    frames = await tools.threads.run(plan_frames, plan, tools.stats)
    await FrameRunner(plan, frames, tools).run(ready)
    return frames.chunks.chunks


class FrameRunner:
    def __init__(self, plan: RunPlan, frames: FramePlan, tools: RunTools) -> None:
        self._plan, self._frames, self._tools = plan, frames, tools
        spec = plan.spec
        # Kept output frames stay on disk: the budget then cannot hold, and is not enforced.
        budget = None if spec.keep_frames else spec.max_disk
        self._book = book = ChunkBook(
            frames.chunks,
            frames.batches,
            budget=budget,
            encoded=frames.encoded,
            outputs_on_disk=frames.outputs_on_disk,
            held=frames.held,
        )
        self._ledger = JobLedger.for_batches([])
        self._extraction = ExtractionBridge(plan, frames, book, self._ledger, tools.meter, tools.stats)
        self._dispatcher = Dispatcher(
            plan, tools.fleet, self._ledger, threads=tools.threads, emit=tools.emit, stats=tools.stats
        )
        self._encoding: dict[int, asyncio.Future[None]] = {}
        self._encode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._take_in_earlier_runs()

    def _take_in_earlier_runs(self) -> None:
        """Progress counts what earlier runs finished as found; say what that is, and the chunking."""
        book, chunks, held, meter = self._book, self._frames.chunks, self._frames.held, self._tools.meter
        meter.frames_found = book.frames_in(ChunkStage.UPSCALED, ChunkStage.ENCODED)
        if self._plan.run > 1:
            log.info(
                "resuming: %d of %d segments done, %d more chunks upscaled",
                len(self._frames.encoded),
                len(chunks.chunks),
                len(book.in_stage(ChunkStage.UPSCALED)),
            )
        log.info(
            "%d frames in %d chunk(s) of up to %d frames; frame data kept under %s",
            self._plan.media.frame_count,
            len(chunks.chunks),
            chunks.chunk_frames,
            format_size(self._plan.spec.max_disk),
        )
        if held:  # held frames are upscaled by no worker: progress counts the upscaled frames
            found = book.in_stage(ChunkStage.UPSCALED) + book.in_stage(ChunkStage.ENCODED)
            meter.frames_found -= sum(1 for chunk in found for frame in chunk.frames if frame in held)

    async def run(self, ready: Awaitable[list[WorkerHandle]]) -> None:
        tools = self._tools
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(self._plan.spec.encoder_count, "segment")
        succeeded = False
        try:
            self._extraction.start(tools.threads)
            tools.meter.report(Stage.LOADING, 0, 0)
            await ready
            tools.meter.workers_ready(asyncio.get_running_loop().time())
            await self._loop()
            await self._extraction.wait()
            succeeded = True
        finally:
            await self._stop(succeeded)

    async def _loop(self) -> None:
        """The job, one step after another every ``poll_interval_s``, until every segment is encoded."""
        book, extraction, dispatcher = self._book, self._extraction, self._dispatcher
        while not book.all_encoded:
            extraction.raise_if_failed()
            extraction.admit_chunks()
            await dispatcher.watch()
            await self._collect_upscaled_chunks()
            self._start_encoders()
            await self._collect_segments()
            dispatcher.raise_if_stuck()
            await dispatcher.deal()
            self._show_progress()
            await asyncio.sleep(self._tools.fleet.farm.poll_interval_s)
        log.info(
            "upscaled and encoded %d frames; frame data admitted at most %s",
            self._ledger.frames_done,
            format_size(book.peak),
        )

    async def _stop(self, succeeded: bool) -> None:
        """Whatever way the run ends: extraction and encoders stopped, workers reset if it failed."""
        self._extraction.stop()
        if not succeeded:
            self._tools.processes.kill_all()
            await self._dispatcher.abandon()
        waits = [f for f in (self._extraction.future, *self._encoding.values()) if f is not None]
        await asyncio.gather(*waits, return_exceptions=True)
        if self._encode_pool is not None:
            await asyncio.to_thread(self._encode_pool.shutdown, True, cancel_futures=True)

    def _show_progress(self) -> None:
        now = asyncio.get_running_loop().time()
        self._dispatcher.count_idle(now)
        total, dedup = self._plan.media.frame_count, self._frames.dedup
        upscaled = dedup.upscaled_count if dedup is not None else total
        self._tools.meter.show(self._book, self._ledger, total=total, upscaled=upscaled, now=now)

    # -- chunks -----------------------------------------------------------------------------------

    async def _collect_upscaled_chunks(self) -> None:
        """A chunk whose batches are all done (and on disk) frees its input frames."""
        for chunk in self._book.in_stage(ChunkStage.UPSCALING):
            batches = self._book.batches(chunk.index)
            if not all(b.id in self._ledger.done for b in batches):
                continue
            missing = await self._tools.threads.run(self._missing_outputs, batches)
            for batch in missing:
                worker = self._ledger.done_by.get(batch.id, "")
                self._ledger.record_failure(
                    worker, batch.id, "its output frames are missing although it was done"
                )
            if missing:
                continue
            self._book.upscaled(chunk.index)
            await self._remove_frames(chunk, self._plan.layout.input_dir)

    def _missing_outputs(self, batches: Iterable[Batch]) -> list[Batch]:
        out, fmt = self._plan.layout.output_dir, self._plan.frame_format
        return [b for b in batches if not all((out / frame_filename(f, fmt)).is_file() for f in b.frames)]

    async def _remove_frames(self, chunk: Chunk, directory: Path) -> None:
        await self._tools.threads.run(remove_frames, chunk, directory, self._plan.frame_format)

    def _start_encoders(self) -> None:
        assert self._encode_pool is not None
        loop = asyncio.get_running_loop()
        for chunk in self._book.in_stage(ChunkStage.UPSCALED):
            self._book.encoding_started(chunk.index)
            context = contextvars.copy_context()  # the encoder's ffmpeg joins this job's process group
            self._encoding[chunk.index] = loop.run_in_executor(
                self._encode_pool, context.run, self._make_part, chunk
            )

    def _make_part(self, chunk: Chunk) -> None:
        started = time.monotonic()
        try:
            dedup = self._frames.dedup
            sources = chunk_sources(chunk, dedup) if dedup is not None else None
            self._plan.media.make_part(self._plan.layout, chunk, self._plan.frame_format, sources)
        finally:
            # The segment's frame arrays and buffers are freed: hand the pages back, so that heap
            # fragmentation cannot raise the RSS step by step over a long job (coordinator.memory).
            release_free_memory()
            self._tools.stats["segment_encode_s"] += time.monotonic() - started

    async def _collect_segments(self) -> None:
        for index, future in list(self._encoding.items()):
            if not future.done():
                continue
            del self._encoding[index]
            future.result()  # raises the encoder's error: the job fails, the frames stay
            batches = self._book.encoded(index)
            self._ledger.forget(b.id for b in batches if b.id in self._ledger.batches)
            chunk = self._frames.chunks.chunks[index]
            if not self._plan.spec.keep_frames:
                await self._remove_frames(chunk, self._plan.layout.output_dir)
            log.info("segment %d (frames %d-%d) encoded", chunk.index, chunk.first, chunk.last)
            self._tools.emit(SegmentDone(chunk.index, chunk.first, chunk.last))
