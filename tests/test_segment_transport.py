"""The segment transport (``--transport segments``), coordinator side: range planning, the source
on the shared root, the settings and the refusal of workers without it; then whole jobs with real
ffmpeg and real worker processes, compared frame by frame with the frames design."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.errors import JobError, SpecError
from coordinator.fleet import WorkerHandle
from coordinator.job import job_identity
from coordinator.media import VideoMedia
from coordinator.segment_run import TransportError, refuse_workers_without_segments, segment_encode
from coordinator.source_share import share_source, shared_source_path
from coordinator.spec import JobSpec
from manifests.errors import PlanningError
from manifests.layout import JobLayout
from manifests.ledger import JobLedger
from manifests.planner import plan_batches
from manifests.ranges import plan_ranges
from media.encode import EncodeSettings
from media.probe import probe
from tests import clips

# -- planning ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "segment_frames", "batch", "ranges", "batches"),
    [
        (10, 64, 8, [(1, 10)], [[(0, 1, 8), (1, 9, 2)]]),
        (20, 6, 4, [(1, 8), (9, 8), (17, 4)],  # 6 rounds up to 2 batches
         [[(0, 1, 4), (1, 5, 4)], [(2, 9, 4), (3, 13, 4)], [(4, 17, 4)]]),
        (20, 6, 3, [(1, 6), (7, 6), (13, 6), (19, 2)],
         [[(0, 1, 3), (1, 4, 3)], [(2, 7, 3), (3, 10, 3)], [(4, 13, 3), (5, 16, 3)], [(6, 19, 2)]]),
        (16, 8, 8, [(1, 8), (9, 8)], [[(0, 1, 8)], [(1, 9, 8)]]),
        (3, 1, 1, [(1, 1), (2, 1), (3, 1)], [[(0, 1, 1)], [(1, 2, 1)], [(2, 3, 1)]]),
        (3, 1, 8, [(1, 3)], [[(0, 1, 3)]]),
    ],
)  # fmt: skip
def test_plan_ranges_table(
    frames: int,
    segment_frames: int,
    batch: int,
    ranges: list[tuple[int, int]],
    batches: list[list[tuple[int, int, int]]],
) -> None:
    plan = plan_ranges(frames, segment_frames, batch)
    assert [(c.first, c.count) for c in plan.ranges] == ranges
    assert [[(b.id, b.frames[0], len(b)) for b in own] for own in plan.batches] == batches
    assert [c.index for c in plan.ranges] == list(range(len(ranges)))
    assert [(u.id, u.frames) for u in plan.units()] == [(c.index, tuple(c.frames)) for c in plan.ranges]


@given(st.integers(1, 400), st.integers(1, 70), st.integers(1, 12))
def test_ranges_cover_every_frame_once_in_order(frames: int, segment_frames: int, batch: int) -> None:
    plan = plan_ranges(frames, segment_frames, batch)
    assert [f for c in plan.ranges for f in c.frames] == list(range(1, frames + 1))
    for chunk, own in zip(plan.ranges, plan.batches, strict=True):
        assert [f for b in own for f in b.frames] == list(chunk.frames)  # what a segment manifest needs
        assert all(len(b) <= batch for b in own)
        assert chunk.count <= segment_frames + batch - 1
    # The frames design's batches, ids included: the model sees the same frames together.
    assert [b for own in plan.batches for b in own] == list(plan_batches(frames, batch, ["w"]).batches)


@pytest.mark.parametrize(("frames", "segment_frames", "batch"), [(0, 8, 8), (10, 0, 8), (10, 8, 0)])
def test_plan_ranges_refuses_nonsense(frames: int, segment_frames: int, batch: int) -> None:
    with pytest.raises(PlanningError):
        plan_ranges(frames, segment_frames, batch)


def test_a_range_is_done_when_its_segment_is_whole_and_redone_from_its_start_when_it_fails() -> None:
    plan = plan_ranges(24, 8, 4)
    ledger = JobLedger.for_batches(plan.units())
    ledger.assign("m1", "a", [plan.unit(0)])
    ledger.assign("m2", "b", [plan.unit(1)])
    assert [b.id for b in ledger.record_done("m1")] == [0]
    assert ledger.frames_done == 8 and ledger.done_by[0] == "a"
    ledger.record_failure("b", 1, "killed")
    assert [b.id for b in ledger.pending()] == [1, 2]
    assert ledger.deal(["b"]) == {"b": (plan.unit(2),)}  # never again to the worker it failed on
    assert ledger.deal(["a", "b"])["a"] == (plan.unit(1),)


# -- settings ---------------------------------------------------------------------------------


def test_spec_takes_a_transport_and_refuses_others(tmp_path: Path) -> None:
    spec = JobSpec(tmp_path / "in.mp4", tmp_path / "out.mp4", transport="segments", segment_frames=16)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec(tmp_path / "in.mp4", tmp_path / "out.mp4").transport == "frames"
    with pytest.raises(SpecError, match="transport"):
        JobSpec(tmp_path / "in.mp4", tmp_path / "out.mp4", transport="carrier-pigeon")
    with pytest.raises(SpecError, match="segment_frames"):
        JobSpec(tmp_path / "in.mp4", tmp_path / "out.mp4", transport="segments", segment_frames=0)
    with pytest.raises(SpecError, match="dedup"):
        JobSpec(tmp_path / "in.mp4", tmp_path / "out.mp4", transport="segments", dedup=True)


def test_only_a_segments_job_names_its_transport_in_its_identity(tmp_path: Path) -> None:
    source = clips.video(tmp_path / "in.mp4", frames=3)
    media = VideoMedia(probe(source), tmp_path / "out.mp4", EncodeSettings(), False)
    frames = job_identity(JobSpec(source, tmp_path / "out.mp4"), media)
    segments = job_identity(JobSpec(source, tmp_path / "out.mp4", transport="segments"), media)
    assert "transport" not in frames  # existing job ids do not change
    assert segments == {**frames, "transport": "segments"}


def test_segment_encode_passes_only_encoder_parameter_strings() -> None:
    ok = segment_encode(EncodeSettings("libx265", crf=22, extra_args=("-x265-params", "aq-mode=3")))
    assert (ok.codec, ok.crf, ok.params) == ("libx265", 22, (("-x265-params", "aq-mode=3"),))
    with pytest.raises(JobError, match="-g 12"):
        segment_encode(EncodeSettings(extra_args=("-g", "12")))
    with pytest.raises(JobError, match="--transport frames"):
        segment_encode(EncodeSettings(extra_args=("-x264-params",)))


class _NoClient:
    async def health(self) -> dict[str, Any]:
        raise AssertionError("not asked")

    async def process_manifest(self, manifest_path: str) -> None:
        raise AssertionError("not asked")

    async def reset(self) -> None:
        raise AssertionError("not asked")


def _handle(worker_id: str, **health: Any) -> WorkerHandle:
    return WorkerHandle(f"http://127.0.0.1/{worker_id}", _NoClient(), {"worker_id": worker_id, **health})


def test_workers_without_the_segment_transport_are_refused_by_name() -> None:
    old = _handle("old-host:8090")  # a release before transports: /health names none
    frames_only = _handle("gpu-2:8090", transports=["frames"])
    able = _handle("gpu-3:8090", transports=["frames", "segments"])
    assert old.transports == ("frames",)
    assert refuse_workers_without_segments([old, able, frames_only]) == [able]
    with pytest.raises(TransportError) as refused:
        refuse_workers_without_segments([old, frames_only])
    message = str(refused.value)
    assert "old-host:8090 supports frames" in message and "gpu-2:8090 supports frames" in message
    assert "--transport frames" in message and "\n" not in message


# -- the source on the shared root ------------------------------------------------------------


def test_the_source_is_hard_linked_and_reused_on_resume(tmp_path: Path) -> None:
    source = clips.video(tmp_path / "Clip.MP4", frames=3)
    layout = JobLayout(tmp_path / "root", "job-1")
    layout.create()
    shared = share_source(source, layout)
    assert shared == shared_source_path(layout, source) == layout.input_dir / "source.mp4"
    assert shared.stat().st_ino == source.stat().st_ino  # same file system: no byte copied
    assert share_source(source, layout).stat().st_ino == source.stat().st_ino


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(Path.cwd()).st_dev,
    reason="needs /dev/shm on another file system than the working directory",
)
def test_the_source_is_copied_whole_across_file_systems_and_kept_while_it_matches(tmp_path: Path) -> None:
    source = clips.video(tmp_path / "in.mkv", frames=5)
    shm = Path("/dev/shm") / f"esrfarm-test-{os.getpid()}"
    try:
        layout = JobLayout(shm, "job-2")
        layout.create()
        seen: list[tuple[int, int]] = []
        shared = share_source(source, layout, on_progress=lambda done, total: seen.append((done, total)))
        assert shared.read_bytes() == source.read_bytes()
        assert shared.stat().st_mtime_ns == source.stat().st_mtime_ns
        assert seen[-1] == (source.stat().st_size,) * 2
        assert not [p for p in layout.input_dir.iterdir() if p != shared]  # no temporary file left
        inode = shared.stat().st_ino
        assert share_source(source, layout).stat().st_ino == inode  # size and mtime match: kept
        os.utime(source, ns=(0, 10**18))  # another file now
        assert share_source(source, layout).stat().st_ino != inode
    finally:
        shutil.rmtree(shm, ignore_errors=True)
