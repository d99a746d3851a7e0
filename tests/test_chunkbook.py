"""The chunk book (manifests.chunkbook) and the job's progress arithmetic (manifests.progress)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests.chunkbook import ChunkBook, ChunkStage
from manifests.chunks import plan_chunks
from manifests.planner import plan_batches
from manifests.progress import JobProgress, ProgressThrottle, job_progress


def book_for(frames: int, *, batch: int = 4, budget: int | None = 1000, **kwargs: object) -> ChunkBook:
    """Chunks of 8 frames (two batches of 4 by default); 10 bytes per input frame, 40 per output."""
    plan = plan_chunks(
        frames, batch_size=batch, input_frame_bytes=10, output_frame_bytes=40, max_disk=10**9,
        max_chunk_frames=8,
    )  # fmt: skip
    return ChunkBook(plan, plan_batches(frames, batch, ["all"]).batches, budget=budget, **kwargs)  # type: ignore[arg-type]


def drive(book: ChunkBook) -> None:
    """Extract, upscale and encode the next chunk that can move, the way the job does."""
    chunk = book.next_admission()
    if chunk is not None:
        admission = book.admit(chunk.index)
        for frame in chunk.frames:
            book.frame_extracted(frame)
        ready = book.ready_batches(chunk.index)
        assert {b.id for b, done in ready if done} == set(admission.skip)
        return
    for stage, step in (
        (ChunkStage.UPSCALING, book.upscaled),
        (ChunkStage.UPSCALED, book.encoding_started),
        (ChunkStage.ENCODING, book.encoded),
    ):
        moving = book.in_stage(stage)
        if moving:
            step(moving[0].index)
            return


def test_a_chunk_moves_through_every_stage_and_frees_its_disk() -> None:
    book = book_for(16, budget=400)
    first = book.next_admission()
    assert first is not None and first.index == 0 and book.stage(0) is ChunkStage.WAITING
    book.admit(0)
    assert book.used == 8 * 50 and book.next_admission() is None, "the next chunk does not fit"
    for frame in range(1, 5):
        book.frame_extracted(frame)
    assert [b.id for b, _ in book.ready_batches(0)] == [0]
    assert book.stage(0) is ChunkStage.EXTRACTING, "one batch still being extracted"
    for frame in range(5, 9):
        book.frame_extracted(frame)
    assert [b.id for b, _ in book.ready_batches(0)] == [1]
    assert book.stage(0) is ChunkStage.UPSCALING
    book.upscaled(0)
    assert book.used == 8 * 40, "the input frames are freed once upscaled"
    book.encoding_started(0)
    assert [b.id for b in book.encoded(0)] == [0, 1]
    assert book.used == 0 and book.stage(0) is ChunkStage.ENCODED


def test_resumed_chunks_start_where_the_disk_says() -> None:
    book = book_for(24, encoded=[0], outputs_on_disk={1: [2, 3], 2: [4]})
    assert book.stage(0) is ChunkStage.ENCODED
    assert book.stage(1) is ChunkStage.UPSCALED and book.used == 8 * 40
    assert book.stage(2) is ChunkStage.WAITING
    admission = book.admit(2)
    assert admission.skip == {4}
    ready = book.ready_batches(2)
    assert ready == [(book.batches(2)[0], True)], "a batch found on disk is ready at once, as done"


def test_a_chunk_whose_last_batch_was_found_on_disk_takes_that_batch_s_frames_after_moving_on() -> None:
    """As the extraction bridge drives it: every frame (skipped ones too) is reported, and batches
    are handed on after each. A resumed chunk whose last batch was found on disk hands it on with
    the last extracted frame and moves on; the skipped frames that follow are not an error (CI saw
    'chunk 5 is upscaling, not extracting' when a killed run had finished a later batch first)."""
    book = book_for(24, outputs_on_disk={1: [3]})  # chunk 1: batch 2 (frames 9-12) to do, 3 (13-16) found
    for chunk in (0, 1):
        admission = book.admit(chunk)
        handed = []
        for frame in book.plan.chunks[chunk].frames:
            assert book.frame_extracted(frame) in (chunk, None)
            if book.stage(chunk) is ChunkStage.EXTRACTING:
                handed += [(b.id, done) for b, done in book.ready_batches(chunk)]
        assert book.stage(chunk) is ChunkStage.UPSCALING
    assert admission.skip == {3} and handed == [(3, True), (2, False)]
    assert book.frame_extracted(16) is None, "a found batch's late frame is nothing to wait for"
    with pytest.raises(ValueError, match="upscaling, not extracting"):
        book.frame_extracted(9)  # a frame of a batch that was extracted: it cannot come twice


def test_out_of_order_steps_are_refused() -> None:
    book = book_for(16)
    with pytest.raises(ValueError, match="waiting, not upscaling"):
        book.upscaled(0)
    with pytest.raises(ValueError, match="not the next one"):
        book.admit(1)


@settings(max_examples=60, deadline=None)
@given(
    frames=st.integers(1, 60),
    batch=st.integers(1, 6),
    budget=st.one_of(st.none(), st.integers(300, 2000)),
    steps=st.integers(0, 200),
)
def test_invariants_hold_whatever_happens(frames: int, batch: int, budget: int | None, steps: int) -> None:
    book = book_for(frames, batch=batch, budget=budget)
    previous = [book.stage(i) for i in range(len(book.plan.chunks))]
    for _ in range(steps):
        drive(book)
        now = [book.stage(i) for i in range(len(book.plan.chunks))]
        assert all(a <= b for a, b in zip(previous, now, strict=True)), "a chunk never moves back"
        held = sum(
            book.plan.input_cost(c) * (book.stage(c.index) <= ChunkStage.UPSCALING)
            + book.plan.output_cost(c) * (ChunkStage.EXTRACTING <= book.stage(c.index) <= ChunkStage.ENCODING)
            for c in book.plan.chunks
            if book.stage(c.index) is not ChunkStage.WAITING
        )
        assert book.used == held, "the budget holds exactly what the chunks on disk hold"
        admitted = [c for c in book.plan.chunks if book.stage(c.index) is not ChunkStage.WAITING]
        assert admitted == list(book.plan.chunks[: len(admitted)]), "chunks are admitted in order"
        if budget is not None and len(admitted) - len(book.in_stage(ChunkStage.ENCODED)) > 1:
            assert book.used <= budget, "over the budget only while one chunk alone needs more"
        previous = now
    while not book.all_encoded:
        drive(book)
    assert book.used == 0 and book.frames_in(ChunkStage.ENCODED) == frames


@pytest.mark.parametrize(
    ("done", "this_run", "elapsed", "fps", "eta"),
    [
        (0, 0, 0.0, 0.0, None),  # nothing yet: no rate, no ETA
        (50, 0, 10.0, 0.0, None),  # resumed with 50 found on disk: they are not speed
        (60, 10, 5.0, 2.0, 20.0),  # only this run's 10 frames count towards the rate
        (100, 100, 4.0, 25.0, 0.0),  # done
    ],
)
def test_progress_counts_only_this_runs_work_as_speed(
    done: int, this_run: int, elapsed: float, fps: float, eta: float | None
) -> None:
    assert job_progress("upscaling", done=done, total=100, done_this_run=this_run, elapsed_s=elapsed) == (
        JobProgress("upscaling", done, 100, fps, eta)
    )


def test_the_throttle_passes_news_and_drops_repeats() -> None:
    throttle = ProgressThrottle(interval_s=1.0)

    def at(stage: str, done: int, now: float) -> bool:
        return throttle.admit(JobProgress(stage, done, 10, 1.0, 1.0), now)

    assert at("upscaling", 1, 0.0)
    assert not at("upscaling", 2, 0.5), "within the interval"
    assert at("upscaling", 2, 1.0), "the same report once the interval has passed"
    assert not at("upscaling", 2, 5.0), "nothing new"
    assert at("upscaling", 10, 5.1), "the end of a stage at once"
    assert not at("upscaling", 10, 9.0), "and once"
    assert at("encoding", 3, 9.1), "a new stage at once"
