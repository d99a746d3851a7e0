"""Streaming plan: chunks of whole batches within a disk budget (pure; tables and properties)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests.chunks import frame_file_bytes, parse_size, plan_chunks
from manifests.errors import PlanningError
from manifests.layout import FrameFormat


def test_frame_sizes_are_upper_bounds() -> None:
    assert frame_file_bytes(640, 360, FrameFormat.NPY) == 640 * 360 * 3 + 128
    assert frame_file_bytes(640, 360, FrameFormat.PNG) > 640 * 360 * 3 + 360


@pytest.mark.parametrize(
    ("frames", "budget", "expected_chunk", "expected_count"),
    [
        (1000, 3 * 64 * 10, 64, 16),  # three chunks of 64 frames fit exactly
        (1000, 3 * 64 * 10 - 1, 56, 18),  # one byte less: 56 frames (7 batches) a chunk
        (1000, 10_000_000, 256, 4),  # capped by max_chunk_frames
        (7, 10_000_000, 8, 1),  # a short clip is one chunk
        (1000, 8 * 10, 8, 125),  # room for one batch only: chunks of one batch
        (1000, 2 * 8 * 10, 8, 125),  # room for two batches, not three chunks of one: still 8
    ],
)
def test_chunk_sizes(frames: int, budget: int, expected_chunk: int, expected_count: int) -> None:
    plan = plan_chunks(frames, batch_size=8, input_frame_bytes=4, output_frame_bytes=6, max_disk=budget)
    assert (plan.chunk_frames, len(plan.chunks)) == (expected_chunk, expected_count)


def test_not_even_one_batch_fits() -> None:
    with pytest.raises(
        PlanningError, match=r"does not hold even one batch of 8 frames \(80 B .*raise --max-disk"
    ):
        plan_chunks(100, batch_size=8, input_frame_bytes=4, output_frame_bytes=6, max_disk=79)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4G", 4 << 30), ("512M", 512 << 20), ("2.5GiB", int(2.5 * (1 << 30))), ("1000", 1000)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.integers(1, 5000),
    batch=st.integers(1, 16),
    in_bytes=st.integers(1, 10_000),
    out_bytes=st.integers(1, 100_000),
    budget=st.integers(1, 50_000_000),
    cap=st.integers(1, 600),
)
def test_chunks_partition_the_frames_and_fit(
    frames: int, batch: int, in_bytes: int, out_bytes: int, budget: int, cap: int
) -> None:
    try:
        plan = plan_chunks(
            frames, batch_size=batch, input_frame_bytes=in_bytes, output_frame_bytes=out_bytes,
            max_disk=budget, max_chunk_frames=cap,
        )  # fmt: skip
    except PlanningError:
        assert min(batch, frames) * (in_bytes + out_bytes) > budget
        return
    covered = [f for chunk in plan.chunks for f in chunk.frames]
    assert covered == list(range(1, frames + 1))
    assert [c.index for c in plan.chunks] == list(range(len(plan.chunks)))
    for chunk in plan.chunks:
        assert chunk.first % batch == 1 % batch  # chunk edges are batch edges
        assert plan.input_cost(chunk) + plan.output_cost(chunk) <= budget
        assert plan.chunk_of(chunk.first) == chunk == plan.chunk_of(chunk.last)
    assert plan.chunk_frames % batch == 0
