"""The coordinator's job engine, in process, against in-process workers (tests/fakeworkers.py).

Real ffmpeg, real frame files and status files on a real shared root; only the workers are fakes
at the fleet's client boundary, so these tests exercise the job logic (dealing, losing workers,
failures, cancel, resume, events) in seconds, without worker processes or torch.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.errors import JobCancelledError, JobError
from coordinator.events import (
    BatchFailed,
    Cancelled,
    Failed,
    Finished,
    JobEvent,
    Progress,
    SegmentDone,
    Started,
    WorkerLost,
)
from coordinator.fleet import WorkerFleet
from coordinator.job import Job, job_id_for
from coordinator.spec import FarmSettings, JobSpec
from manifests.atomic import temp_path
from manifests.layout import FrameFormat, JobLayout
from media.encode import EncodeSettings
from media.extract import decode_frames
from tests import clips
from tests.fakeworkers import FakeWorker, fake_farm, nearest

FRAMES = 40


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clips.video(tmp_path_factory.mktemp("engine") / "clip.mp4", size="32x24", frames=FRAMES)


@pytest.fixture(scope="module")
def expected(clip: Path) -> list[np.ndarray]:
    return [nearest(frame, 2) for frame in decode_frames(clip)]


def farm(root: Path, **overrides: Any) -> FarmSettings:
    values: dict[str, Any] = {
        "shared_root": root, "poll_interval_s": 0.005, "health_interval_s": 0.05,
        "unreachable_after_s": 0.3, "stale_after_s": 2.0, "busy_backoff_s": 0.02,
    }  # fmt: skip
    return FarmSettings(**{**values, **overrides})


def spec(source: Path, output: Path, **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "model": "fake", "batch_size": 4, "max_disk": 300_000, "encode": EncodeSettings.lossless(),
        "frame_format": FrameFormat.PNG,  # the chunk sizes these tests were measured with
    }  # fmt: skip
    return JobSpec(source, output, **{**values, **overrides})


async def run(
    job_spec: JobSpec,
    workers: list[FakeWorker],
    settings: FarmSettings,
    *,
    during: Callable[[Job, JobEvent], Any] | None = None,
) -> tuple[list[JobEvent], Job, BaseException | None]:
    """Run one job to its end; ``during(job, event)`` is called for every event (may be async)."""
    async with WorkerFleet(settings, clients=workers) as fleet:
        job = Job(job_spec, fleet).start()
        events: list[JobEvent] = []
        async for event in job.events():
            events.append(event)
            if during is not None:
                result = during(job, event)
                if asyncio.iscoroutine(result):
                    await result
        try:
            await job.wait()
        except BaseException as exc:
            return events, job, exc
    return events, job, None


def frames_of(path: Path) -> list[np.ndarray]:
    return list(decode_frames(path))


def assert_same_frames(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert np.array_equal(a, b), f"frame {i + 1} differs"


def test_a_job_runs_to_the_end_and_says_so_in_order(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    events, _, error = asyncio.run(run(spec(clip, output), workers, farm(root)))
    assert error is None
    assert_same_frames(frames_of(output), expected)
    assert isinstance(events[0], Progress) and events[0].stage == "probing"
    assert isinstance(events[-1], Finished) and events[-1].result.frames == FRAMES
    started = next(e for e in events if isinstance(e, Started))
    assert started.frames == FRAMES and started.run == 1
    stages = [e.stage for e in events if isinstance(e, Progress)]
    order = ["probing", "loading model", "extracting", "upscaling", "encoding", "joining"]
    seen = [s for s in dict.fromkeys(stages) if s in order]
    assert seen == sorted(seen, key=order.index), stages
    assert "upscaling" in seen and "joining" in seen
    segments = [e for e in events if isinstance(e, SegmentDone)]
    assert len(segments) > 1, "the budget cut the job into several chunks"
    assert sum(s.last_frame - s.first_frame + 1 for s in segments) == FRAMES
    assert all(w.batches_done for w in workers), "both workers took part"
    assert not (root / "jobs" / started.job_id).exists(), "the job directory is removed after success"
    upscaling = [e for e in events if isinstance(e, Progress) and e.stage == "upscaling"]
    assert all(a.done <= b.done for a, b in itertools.pairwise(upscaling))


def test_a_lost_worker_costs_a_retry_not_a_frame(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    workers = fake_farm(root, 2, batch_delay_s=0.01)
    workers[1].die_after_batches = 1
    events, _, error = asyncio.run(run(spec(clip, output), workers, farm(root)))
    assert error is None, error
    lost = [e for e in events if isinstance(e, WorkerLost)]
    assert len(lost) == 1 and lost[0].worker == "w1" and "unreachable" in lost[0].reason
    assert_same_frames(frames_of(output), expected)


def test_a_frozen_worker_is_lost_when_its_status_stands_still(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    workers[0].freeze_after_batches = 1
    events, _, error = asyncio.run(run(spec(clip, output), workers, farm(root, stale_after_s=0.5)))
    assert error is None, error
    lost = [e for e in events if isinstance(e, WorkerLost)]
    assert [e.worker for e in lost] == ["w0"] and "did not change" in lost[0].reason
    assert_same_frames(frames_of(output), expected)


def test_a_batch_that_fails_everywhere_fails_the_job_with_its_data(clip: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    workers = fake_farm(root, 2, fail_batches={3})
    events, job, error = asyncio.run(run(spec(clip, output), workers, farm(root)))
    assert isinstance(error, JobError)
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.batch_id == 3 and failed.frames == (13, 14, 15, 16)
    assert set(failed.reasons) == {"fake://w0", "fake://w1"}
    assert "batch 3 (frames 13-16) failed on 2 different workers" in failed.message
    assert f"its files are kept in {job.job_dir}" in failed.message and failed.resumable
    assert sorted(e.worker for e in events if isinstance(e, BatchFailed)) == ["w0", "w1"]
    assert not output.exists() and not list(tmp_path.glob(".out.mkv.*"))
    assert job.job_dir is not None and job.job_dir.is_dir()


def test_a_status_file_in_a_newer_format_drops_its_worker_at_once(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    workers[1].status_format = "esrfarm.status/9"
    events, _, error = asyncio.run(run(spec(clip, output), workers, farm(root, stale_after_s=60)))
    assert error is None, error
    lost = [e for e in events if isinstance(e, WorkerLost)]
    assert [e.worker for e in lost] == ["w1"] and "esrfarm.status/9" in lost[0].reason
    assert_same_frames(frames_of(output), expected)


def test_cancel_stops_resets_and_keeps_a_job_that_then_resumes(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    # Each worker stops after 3 of its batches, its manifest in flight until reset: once a segment is
    # done and a worker stands so, the cancel has manifests to reset, however slow the machine.
    workers = fake_farm(root, 2, batch_delay_s=0.02, freeze_after_batches=3)
    cancelling: list[asyncio.Task[None]] = []

    async def cancel_once_a_worker_stands(job: Job) -> None:
        deadline = time.monotonic() + 120
        while not any(w.busy and w.batches_done >= 3 for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await job.cancel()

    async def cancel_half_way(job: Job, event: JobEvent) -> None:
        if isinstance(event, SegmentDone) and not cancelling:
            cancelling.append(asyncio.ensure_future(cancel_once_a_worker_stands(job)))

    settings = farm(root, stale_after_s=120.0)  # the frozen workers are never given up meanwhile
    events, job, error = asyncio.run(run(spec(clip, output), workers, settings, during=cancel_half_way))
    assert isinstance(error, JobCancelledError)
    assert isinstance(events[-1], Cancelled) and events[-1].job_dir == job.job_dir
    assert not output.exists() and not list(tmp_path.glob(".out.mkv.*")), "no partial output"
    assert job.job_dir is not None and any(job.job_dir.glob("segments/*.mp4")), "the job is kept"
    assert sum(w.resets for w in workers) >= 1, "the workers' manifests were reset"
    assert not any(w.busy for w in workers)
    done_by_cancel = sum(w.batches_done for w in workers)

    again = fake_farm(root, 2)
    events, _, error = asyncio.run(run(spec(clip, output), again, farm(root)))
    assert error is None, error
    assert next(e for e in events if isinstance(e, Started)).run == 2
    assert sum(w.batches_done for w in again) < FRAMES / 4, "the finished segments were not redone"
    assert sum(w.batches_done for w in again) + done_by_cancel >= FRAMES / 4
    assert_same_frames(frames_of(output), expected)
    first = next(e for e in events if isinstance(e, Progress) and e.stage == "upscaling")
    assert first.done > 0 and first.fps == 0.0, "work found on disk counts as done, not as speed"


def test_a_damaged_frame_left_by_an_earlier_run_is_upscaled_again(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    job_spec = spec(clip, output, max_disk=10_000_000)  # one chunk: every output frame stays

    async def cancel_when_most_are_done(job: Job, event: JobEvent) -> None:
        if isinstance(event, Progress) and event.stage == "upscaling" and event.done >= FRAMES - 8:
            await job.cancel()

    workers = fake_farm(root, 1, freeze_after_batches=(FRAMES - 8) // 4)
    _, job, error = asyncio.run(run(job_spec, workers, farm(root), during=cancel_when_most_are_done))
    assert isinstance(error, JobCancelledError) and job.job_dir is not None
    frames = sorted(job.job_dir.glob("output/0*"))
    assert len(frames) >= FRAMES - 8
    frames[2].write_bytes(frames[2].read_bytes()[:100])  # truncated, as by a full disk
    frames[5].write_bytes(os.urandom(500))  # garbage
    again = fake_farm(root, 1)
    _, _, error = asyncio.run(run(job_spec, again, farm(root)))
    assert error is None, error
    assert_same_frames(frames_of(output), expected)
    assert {3, 6} <= set(again[0].frames_upscaled)
    assert not {9, 10, 11, 12} & set(again[0].frames_upscaled), "sound frames were kept"


def test_a_busy_worker_backs_off_and_gets_the_same_manifest_again(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    workers = fake_farm(root, 2)
    workers[0].busy_answers = 4
    _, job, error = asyncio.run(run(spec(clip, output, keep_frames=True), workers, farm(root)))
    assert error is None, error
    assert_same_frames(frames_of(output), expected)
    assert job.job_dir is not None
    written = len(list(job.job_dir.glob("manifests/*.json")))
    accepted = sum(len(w.manifests) for w in workers)
    assert written == accepted, f"{written} manifest files for {accepted} manifests used"
    assert workers[0].posts <= accepted + 4


@pytest.mark.parametrize(
    ("name", "stem"),
    [("vidéo.mp4", "video"), ("映画.mp4", "job"), (".hidden.mp4", "hidden"), ("-dash.mp4", "dash"),
     ("a b (1).mp4", "a_b_1")],
)  # fmt: skip
def test_any_file_name_can_be_upscaled(clip: Path, tmp_path: Path, name: str, stem: str) -> None:
    source = tmp_path / name
    source.write_bytes(clip.read_bytes())
    root = tmp_path / "root"
    events, _, error = asyncio.run(run(spec(source, tmp_path / "out.mkv"), fake_farm(root, 1), farm(root)))
    assert error is None, error
    job_id = next(e for e in events if isinstance(e, Started)).job_id
    JobLayout(root, job_id)  # a safe directory name
    assert job_id.rsplit("-", 1)[0] == stem == job_id_for(source, {}).rsplit("-", 1)[0]


def test_a_killed_runs_leftover_beside_the_output_is_removed(clip: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    dead = temp_path(output, ".part")
    dead_pid = 2**22 + 7  # above pid_max: no process has it
    dead = dead.with_name(dead.name.replace(f".{os.getpid()}.", f".{dead_pid}."))
    dead.write_bytes(b"x" * 1000)
    live = temp_path(output, ".part")  # this process's: a run in progress is left alone
    live.write_bytes(b"y")
    _, _, error = asyncio.run(run(spec(clip, output), fake_farm(root, 1), farm(root)))
    assert error is None, error
    assert not dead.exists() and live.exists()


def test_no_worker_with_the_model_fails_with_each_reason(clip: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    workers = fake_farm(root, 2, model="another")
    events, _, error = asyncio.run(run(spec(clip, tmp_path / "out.mkv"), workers, farm(root)))
    assert isinstance(error, JobError)
    assert isinstance(events[-1], Failed)
    assert "no healthy worker to upscale with" in events[-1].message
    assert "runs model 'another', not 'fake'" in events[-1].message


def test_a_job_runs_on_workers_of_its_backend_only(
    clip: Path, expected: list[np.ndarray], tmp_path: Path
) -> None:
    """A mixed fleet (torch and ncnn workers of one model) is allowed; a job uses one backend's workers,
    and its identity (so its directory) names the backend."""
    root = tmp_path / "root"
    torch_worker = FakeWorker("fake://torch", root, backend="torch")
    ncnn_worker = FakeWorker("fake://ncnn", root, backend="ncnn")
    job_ids = []
    for backend, used, unused in (("ncnn", ncnn_worker, torch_worker), ("torch", torch_worker, ncnn_worker)):
        output = tmp_path / f"{backend}.mkv"
        _, job, error = asyncio.run(
            run(spec(clip, output, backend=backend), [torch_worker, ncnn_worker], farm(root))
        )
        assert error is None, error
        assert used.manifests and not unused.manifests, backend
        assert_same_frames(frames_of(output), expected)
        job_ids.append(job.layout.job_id)
        used.manifests.clear()
    assert job_ids[0] != job_ids[1]
    # No worker of the job's backend: the job fails saying why the others were not used.
    output = tmp_path / "none.mkv"
    _, _, error = asyncio.run(run(spec(clip, output, backend="ncnn"), [torch_worker], farm(root)))
    assert isinstance(error, JobError) and "runs the torch backend, not ncnn" in str(error)


def test_ray_refuses_to_start_workers_of_another_backend_than_torch(tmp_path: Path) -> None:
    from coordinator.errors import FleetError
    from coordinator.fleet import LocalWorkerConfig

    fleet = WorkerFleet(farm(tmp_path, ray_address="auto"), local=LocalWorkerConfig("fake", backend="ncnn"))

    async def start() -> None:
        try:
            await fleet.start()
        finally:
            await fleet.close()

    with pytest.raises(FleetError, match="Ray starts torch workers only; for the ncnn backend"):
        asyncio.run(start())
