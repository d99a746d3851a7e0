"""The segment transport (``--transport segments``), coordinator side: range planning, the source
on the shared root, the settings and the refusal of workers without it; then whole jobs with real
ffmpeg and real worker processes, compared frame by frame with the frames design."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.errors import JobCancelledError, JobError, SpecError
from coordinator.events import Failed, Finished, JobEvent, Progress, SegmentDone, Started, WorkerLost
from coordinator.fleet import WorkerHandle
from coordinator.job import Job, job_identity
from coordinator.media import VideoMedia
from coordinator.segment_run import TransportError, refuse_workers_without_segments, segment_encode
from coordinator.source_share import share_source, shared_source_path
from coordinator.spec import JobSpec
from manifests.errors import PlanningError
from manifests.health import Health
from manifests.layout import JobLayout
from manifests.ledger import JobLedger
from manifests.manifest import Manifest, read_manifest
from manifests.planner import plan_batches
from manifests.ranges import plan_ranges
from media.encode import EncodeSettings
from media.extract import decode_frames
from media.ffmpeg import ffmpeg_command
from media.probe import probe
from tests import clips
from tests.fakeworkers import FakeWorker, fake_farm, nearest
from tests.test_job_engine import assert_same_frames, frames_of
from tests.test_job_engine import farm as engine_farm
from tests.test_job_engine import run as run_engine
from tests.test_job_engine import spec as engine_spec
from tests.videocheck import packets
from tests.workerutil import REPO, WorkerProcess, part_way, start_worker

#: H.264 with B-frames and a keyframe every 12 frames.
H264_B_FRAMES = ("-c:v", "libx264", "-preset", "veryfast", "-g", "12", "-pix_fmt", "yuv420p")

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
    answer = Health.from_dict({"state": "idle", "worker_id": worker_id, **health})
    return WorkerHandle(f"http://127.0.0.1/{worker_id}", _NoClient(), answer)


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


ON_ANOTHER_FILE_SYSTEM = pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs /dev/shm on another file system than the temporary directory",
)


@ON_ANOTHER_FILE_SYSTEM
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


# -- the coordinator's side, against in-process workers (tests/fakeworkers.py) ----------------

ENGINE_FRAMES = 40


@pytest.fixture(scope="module")
def engine_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("segment-engine")
    return clips.video(folder / "clip.mp4", size="32x24", frames=ENGINE_FRAMES, codec=H264_B_FRAMES)


@pytest.fixture(scope="module")
def engine_expected(engine_clip: Path) -> list[np.ndarray]:
    return [nearest(frame, 2) for frame in decode_frames(engine_clip)]


def segments_spec(source: Path, output: Path, **overrides: Any) -> JobSpec:
    return engine_spec(source, output, transport="segments", segment_frames=12, **overrides)


def manifests_of(worker: FakeWorker) -> list[Manifest]:
    return [read_manifest(worker.shared_root / path) for path in worker.manifests]


def test_a_segments_job_moves_no_frame_file_and_joins_its_segments(
    engine_clip: Path, engine_expected: list[np.ndarray], tmp_path: Path
) -> None:
    root, output = tmp_path / "root", tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    events, job, error = asyncio.run(
        run_engine(segments_spec(engine_clip, output, keep_frames=True), workers, engine_farm(root))
    )
    assert error is None
    assert_same_frames(frames_of(output), engine_expected)
    done = [(e.index, e.first_frame, e.last_frame) for e in events if isinstance(e, SegmentDone)]
    assert sorted(done) == [(0, 1, 12), (1, 13, 24), (2, 25, 36), (3, 37, 40)]
    assert isinstance(events[-1], Finished) and events[-1].result.frames == ENGINE_FRAMES
    assert job.job_dir is not None
    (source,) = (job.job_dir / "input").iterdir()  # the source, hard-linked: no frame file anywhere
    assert source.name == "source.mp4" and source.stat().st_ino == engine_clip.stat().st_ino
    assert not list((job.job_dir / "output").iterdir())
    segments = sorted(p.name for p in (job.job_dir / "segments").glob("*.mp4"))
    assert segments == ["000000.mp4", "000001.mp4", "000002.mp4", "000003.mp4"]
    manifests = [m for w in workers for m in manifests_of(w)]
    assert sorted(m.segment.first_frame for m in manifests if m.segment is not None) == [1, 13, 25, 37]
    assert all(m.segment is not None and m.segment.source == "input/source.mp4" for m in manifests)
    assert all(manifests_of(w) for w in workers), "both workers got ranges"


def test_a_worker_lost_mid_range_loses_the_whole_range_to_the_other(
    engine_clip: Path, engine_expected: list[np.ndarray], tmp_path: Path
) -> None:
    root, output = tmp_path / "root", tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    workers[1].die_after_batches = 1  # one batch of its first range done, then gone
    job_spec = segments_spec(engine_clip, output, keep_frames=True)  # keeps the manifests
    events, _, error = asyncio.run(run_engine(job_spec, workers, engine_farm(root)))
    assert error is None
    assert_same_frames(frames_of(output), engine_expected)
    lost = [e for e in events if isinstance(e, WorkerLost)]
    assert len(lost) == 1 and lost[0].worker == "w1" and lost[0].batches_returned == 1
    (dead_range,) = [m.segment for m in manifests_of(workers[1]) if m.segment is not None]
    redone = [m for m in manifests_of(workers[0]) if m.segment == dead_range]
    assert len(redone) == 1, "the survivor did the dead worker's range"
    assert [f for b in redone[0].batches for f in b.frames] == list(dead_range.frames), "from its start"


def test_a_range_that_fails_on_two_workers_fails_the_job_naming_it(engine_clip: Path, tmp_path: Path) -> None:
    root, output = tmp_path / "root", tmp_path / "out.mkv"
    workers = fake_farm(root, 2, fail_batches={4})  # batch 4: frames 17-20, in range 1 (13-24)
    events, _, error = asyncio.run(run_engine(segments_spec(engine_clip, output), workers, engine_farm(root)))
    assert isinstance(error, JobError)
    assert "range 1 (frames 13-24) failed on 2 different workers" in str(error)
    assert isinstance(events[-1], Failed) and events[-1].resumable
    assert not output.exists()


def test_a_stopped_segments_job_resumes_keeping_its_finished_segments(
    engine_clip: Path, engine_expected: list[np.ndarray], tmp_path: Path
) -> None:
    root, output = tmp_path / "root", tmp_path / "out.mkv"

    async def cancel_after_first_segment(job: Job, event: JobEvent) -> None:
        if isinstance(event, SegmentDone):
            await job.cancel()

    first = fake_farm(root, 1, batch_delay_s=0.05)
    events, job, error = asyncio.run(
        run_engine(
            segments_spec(engine_clip, output), first, engine_farm(root), during=cancel_after_first_segment
        )
    )
    assert isinstance(error, JobCancelledError) and job.job_dir is not None
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (job.job_dir / "segments").glob("*.mp4")}
    assert 0 < len(kept) < 4
    segments_dir = job.job_dir / "segments"
    # What a worker killed mid-range leaves: a temporary segment (here beside a kept one).
    killed_writer = segments_dir / f".{min(kept)}.999999.0badf00d.part"
    killed_writer.write_bytes(b"half a segment")
    again = fake_farm(root, 2)
    job_spec = segments_spec(engine_clip, output, keep_frames=True)  # keeps the manifests
    events, job, error = asyncio.run(run_engine(job_spec, again, engine_farm(root)))
    assert error is None
    assert not killed_writer.exists() and not list(segments_dir.glob(".*")), "no temporary segment is left"
    assert_same_frames(frames_of(output), engine_expected)
    assert next(e for e in events if isinstance(e, Started)).run == 2
    firsts = sorted(m.segment.first_frame for w in again for m in manifests_of(w) if m.segment is not None)
    assert len(firsts) == 4 - len(kept), "finished ranges are not dealt again"
    for name in kept:
        assert int(name[:6]) * 12 + 1 not in firsts
    finished = next(e for e in events if isinstance(e, Finished)).result
    assert finished.resumed and finished.frames_found == 12 * len(kept)


@ON_ANOTHER_FILE_SYSTEM
def test_a_source_on_another_file_system_is_copied_and_the_copy_shows_as_progress(
    engine_clip: Path, engine_expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = Path("/dev/shm") / f"esrfarm-test-{os.getpid()}-job"
    try:
        output = tmp_path / "out.mkv"
        workers = fake_farm(root, 2)
        events, job, error = asyncio.run(
            run_engine(segments_spec(engine_clip, output, keep_frames=True), workers, engine_farm(root))
        )
        assert error is None
        assert_same_frames(frames_of(output), engine_expected)
        assert job.job_dir is not None
        copy = job.job_dir / "input" / "source.mp4"
        assert (
            copy.read_bytes() == engine_clip.read_bytes() and copy.stat().st_ino != engine_clip.stat().st_ino
        )
        copying = [e for e in events if isinstance(e, Progress) and e.stage == "extracting"]
        assert copying and copying[-1].done == copying[-1].total == ENGINE_FRAMES
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_workers_without_segments_get_no_range_and_none_at_all_is_one_line(
    engine_clip: Path, engine_expected: list[np.ndarray], tmp_path: Path
) -> None:
    root, output = tmp_path / "root", tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    workers[0].transports = ("frames",)
    _, _, error = asyncio.run(run_engine(segments_spec(engine_clip, output), workers, engine_farm(root)))
    assert error is None and not workers[0].manifests and workers[1].manifests
    assert_same_frames(frames_of(output), engine_expected)
    old = fake_farm(tmp_path / "root2", 1, transports=("frames",))
    _, _, error = asyncio.run(
        run_engine(segments_spec(engine_clip, tmp_path / "out2.mkv"), old, engine_farm(tmp_path / "root2"))
    )
    assert isinstance(error, TransportError)
    assert str(error).startswith("no worker supports the segments transport (w0 supports frames)")
    assert not [p for p in (tmp_path / "root2" / "jobs").iterdir() if p.is_dir()], "no job directory is left"


# -- whole jobs: frames against segments ------------------------------------------------------

#: Ranges of 6 frames in batches of 2: most ranges start at a frame that is not a keyframe.
SMALL_RANGES = ("--segment-frames", "6", "--batch-size", "2")

CASES: dict[str, Callable[[Path], Path]] = {
    "h264-cfr.mp4": lambda p: clips.video(p, frames=23, rate="30000/1001", codec=H264_B_FRAMES),
    "hevc-open-gop.mkv": lambda p: clips.hevc_open_gop_video(p, frames=26, keyint=8),
    "vfr.mp4": lambda p: clips.vfr_video(p, frames=24),
    "hdr10.mkv": lambda p: clips.hdr10_video(p, frames=13),
    "late-start.mp4": lambda p: clips.late_start_video(p, frames=17, start_s=1.5, keyint=5),
    "audio.mp4": lambda p: clips.video_with_audio(p, rate="25", seconds=0.84),
}


def esrfarm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *map(str, args)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip


def framemd5(path: Path) -> list[str]:
    """ffmpeg's framemd5 of the video: every frame's timestamps, size and pixel hash, as decoded
    (``passthrough``: no frame dropped or repeated to make a VFR stream constant)."""
    args = ["-v", "error", "-i", str(path), "-map", "0:v", "-fps_mode", "passthrough", "-f", "framemd5", "-"]
    command = ffmpeg_command(args)
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    return [line for line in result.stdout.splitlines() if not line.startswith("#")]


def audio_bytes(path: Path) -> list[list[bytes]]:
    """Every audio stream's packets (their timestamps are the container's: MKV keeps milliseconds)."""
    return [[data for _, data in stream] for stream in packets(path, "audio")]


def upscale_args(
    source: Path, output: Path, root: Path, model: Path, workers: list[WorkerProcess]
) -> list[str]:
    return [
        "upscale", str(source), str(output), "--model", str(model), "--scale", "2", "--codec", "ffv1",
        "--workers", ",".join(w.url for w in workers), "--shared-root", str(root),
        "--unreachable-timeout", "3",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def segment_farm(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[Path, list[WorkerProcess]]]:
    root = tmp_path_factory.mktemp("segment-farm")
    logs = tmp_path_factory.mktemp("segment-farm-logs")
    workers = [start_worker(root, tiny_model, logs) for _ in range(2)]
    yield root, workers
    for worker in workers:
        if worker.process.poll() is None:
            worker.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_segments_are_frame_identical_to_frames(
    name: str, tmp_path: Path, tiny_model: Path, segment_farm: tuple[Path, list[WorkerProcess]]
) -> None:
    root, workers = segment_farm
    source = CASES[name](tmp_path / name)
    outputs = {}
    for transport in ("frames", "segments"):
        output = outputs[transport] = tmp_path / f"{transport}.mkv"
        result = esrfarm(*upscale_args(source, output, root, tiny_model, workers), "--transport", transport,
                         *SMALL_RANGES)  # fmt: skip
        assert result.returncode == 0, result.stderr
    frames, segments = framemd5(outputs["frames"]), framemd5(outputs["segments"])
    assert len(frames) == probe(source).video.frame_count
    assert segments == frames
    assert packets(outputs["segments"], "audio") == packets(outputs["frames"], "audio")
    assert audio_bytes(outputs["segments"]) == audio_bytes(source)  # copied, not re-encoded
    assert not list((root / "jobs").iterdir()), "each job directory is removed after success"


def _coordinator(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip


def _wait_for(what: str, condition: Callable[[], bool], coordinator: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if coordinator.poll() is not None or time.monotonic() > deadline:
            coordinator.kill()
            _, stderr = coordinator.communicate(timeout=60)
            raise AssertionError(f"{what} never happened:\n{stderr}")
        time.sleep(0.005)


def test_a_worker_killed_mid_range_costs_that_range_a_retry(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    workers = [start_worker(root, tiny_model, tmp_path / "logs") for _ in range(2)]
    victim = workers[1]
    try:
        source = clips.video(tmp_path / "in.mp4", size="96x54", frames=60, codec=H264_B_FRAMES)
        output = tmp_path / "segments.mkv"
        args = upscale_args(source, output, root, tiny_model, workers)
        coordinator = _coordinator(
            [*args, "--transport", "segments", "--segment-frames", "20", "--batch-size", "2"]
        )

        def victim_part_way() -> bool:
            if part_way(root, victim.pid):
                os.kill(victim.pid, signal.SIGKILL)
                return True
            return False

        _wait_for("the second worker part way through its range", victim_part_way, coordinator)
        _, stderr = coordinator.communicate(timeout=600)
        assert coordinator.returncode == 0, stderr
        assert "lost worker" in stderr and "go to the others" in stderr
        reference = tmp_path / "frames.mkv"
        frames = esrfarm(*upscale_args(source, reference, root, tiny_model, workers[:1]))
        assert frames.returncode == 0, frames.stderr
        assert framemd5(output) == framemd5(reference)
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.stop()


def test_a_coordinator_killed_mid_job_resumes_keeping_its_finished_segments(
    tmp_path: Path, tiny_model: Path, segment_farm: tuple[Path, list[WorkerProcess]]
) -> None:
    root, workers = segment_farm
    source = clips.video(tmp_path / "in.mp4", size="96x54", frames=48, codec=H264_B_FRAMES)
    output = tmp_path / "segments.mkv"
    args = [*upscale_args(source, output, root, tiny_model, workers), "--transport", "segments",
            "--segment-frames", "8", "--batch-size", "2", "--keep-frames", "-v"]  # fmt: skip
    coordinator = _coordinator(args)

    def some_segments() -> bool:
        return bool(list(root.glob("jobs/*/segments/0*.mp4")))

    _wait_for("a finished segment", some_segments, coordinator)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.communicate(timeout=60)
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("jobs/*/segments/0*.mp4")}
    assert 0 < len(kept) < 6, "killed part way"
    rerun = esrfarm(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming: " in rerun.stderr and "of 6 segments done" in rerun.stderr
    for path, (inode, mtime) in kept.items():
        if path.is_file():  # a segment whole when it was seen is kept as it was
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime), f"{path.name} was redone"
    job_dir = next((root / "jobs").iterdir())
    try:
        reference = tmp_path / "frames.mkv"
        frames = esrfarm(*upscale_args(source, reference, root, tiny_model, workers))
        assert frames.returncode == 0, frames.stderr
        assert framemd5(output) == framemd5(reference)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def test_local_workers_run_a_segments_job(tmp_path: Path, tiny_model: Path) -> None:
    """Without --workers, the workers started here run the segment transport as well."""
    source = clips.video_with_audio(tmp_path / "in.mp4", rate="25", seconds=0.6)
    outputs = {}
    for transport in ("frames", "segments"):
        output = outputs[transport] = tmp_path / f"{transport}.mkv"
        result = esrfarm(
            "upscale", source, output, "--model", tiny_model, "--scale", "2", "--codec", "ffv1",
            "--shared-root", tmp_path / "root", "--local-workers", "1", "--worker-arg=--cpu-threads=1",
            "--transport", transport, *SMALL_RANGES,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert framemd5(outputs["segments"]) == framemd5(outputs["frames"])
    assert audio_bytes(outputs["segments"]) == audio_bytes(source) != []
