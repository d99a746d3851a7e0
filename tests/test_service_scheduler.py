"""The service's scheduler in process, on a real store and the coordinator's job engine over
in-process workers (tests/fakeworkers.py): a cancel works at every instant of a job's life, from
the moment it is queued to its end; a job outlives a database that another process locks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from coordinator.errors import JobCancelledError
from coordinator.events import Cancelled
from coordinator.fleet import WorkerFleet
from coordinator.job import Job
from service.scheduler import Scheduler, SchedulerSettings
from service.store import JobRow, JobState, Store, new_job, now
from tests import clips
from tests.fakeworkers import FakeWorker, fake_farm
from tests.test_job_engine import farm, spec
from tests.test_service_store import HeldLock

pytestmark = pytest.mark.timeout(300)

DEADLINE_S = 60.0  # generous: nothing here waits on a timer, only on the job's end


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clips.video(tmp_path_factory.mktemp("scheduler") / "clip.mp4", size="32x24", frames=12)


def queued_job(job_id: str, source: Path, output: Path) -> JobRow:
    job_spec = spec(source, output)
    return new_job(
        job_id=job_id, batch_id="b", input=str(source), output=str(output), spec=job_spec.to_dict(),
        model="fake", scale=None, codec="ffv1", priority=0, now=now(),
    )  # fmt: skip


@contextlib.asynccontextmanager
async def scheduler_on(
    tmp_path: Path,
    *,
    lock_timeout_s: float = 10.0,
    settings: SchedulerSettings | None = None,
    remote: bool = False,
    **workers: Any,
) -> AsyncIterator[tuple[Scheduler, Store]]:
    """A started scheduler over in-process workers (``workers``: their options) and a real store.
    ``remote``: the workers are the farm's (as ``--workers`` gives them), never replaced by local ones."""
    clients = fake_farm(tmp_path / "root", **workers)
    if remote:  # the farm's URLs are http; these clients are in process, never reached over a network
        clients = [FakeWorker(f"http://127.0.0.1/fake-{i}", tmp_path / "root", **workers) for i in range(2)]
    farm_settings = farm(tmp_path / "root", workers=tuple(c.url for c in clients) if remote else ())
    store = Store(tmp_path / "jobs.db", lock_timeout_s=lock_timeout_s)
    await store.open()
    scheduler = Scheduler(store, farm_settings, settings or SchedulerSettings())
    fleet = WorkerFleet(farm_settings, clients=clients)
    scheduler._use_fleet(fleet, "fake")
    await scheduler.start()
    try:
        yield scheduler, store
    finally:
        await asyncio.wait_for(scheduler.close(), DEADLINE_S)
        await store.close()


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "right-after-start"])
def test_a_job_cancelled_before_its_first_step_ends_cancelled(
    clip: Path, tmp_path: Path, started: bool
) -> None:
    async def scenario() -> None:
        settings = farm(tmp_path / "root")
        async with WorkerFleet(settings, clients=fake_farm(settings.shared_root)) as fleet:
            job = Job(spec(clip, tmp_path / "out.mkv"), fleet)
            if started:
                job.start()  # its task exists, its first step has not run
            await job.cancel()  # called right here (a task around it would let the job step first)

            async def all_events() -> list[object]:
                return [event async for event in job.events()]

            events = await asyncio.wait_for(all_events(), DEADLINE_S)
            assert isinstance(events[-1], Cancelled), events
            with pytest.raises(JobCancelledError):
                await asyncio.wait_for(job.wait(), DEADLINE_S)
        assert not (tmp_path / "out.mkv").exists()

    asyncio.run(scenario())


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 8, 13, 40])
def test_cancel_right_after_submit_ends_cancelled(clip: Path, tmp_path: Path, steps: int) -> None:
    """The job is queued and the scheduler woken, as a submit does; the cancel comes ``steps``
    turns of the event loop later (each value lands at another point of the job's start)."""

    async def scenario() -> None:
        async with scheduler_on(tmp_path) as (scheduler, store):
            output = tmp_path / "out.mkv"
            await store.add_jobs([queued_job("j1", clip, output)])
            scheduler.wake()
            for _ in range(steps):
                await asyncio.sleep(0)
            row = await asyncio.wait_for(scheduler.cancel("j1"), DEADLINE_S)
            assert row is not None and row.state == JobState.CANCELLED, row
            while scheduler.is_running("j1"):  # a start that lost the race to the cancel ends
                await asyncio.sleep(0.01)
            after = await store.get("j1")
            assert after is not None and after.state == JobState.CANCELLED, after
            assert not output.exists(), "a cancelled job publishes no output"

    asyncio.run(scenario())


def test_a_job_outlives_a_database_locked_by_another_process(
    clip: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the write lock longer than the store waits: the job's progress and
    end cannot be stored meanwhile; the job goes on and its end is stored once the lock is gone."""

    async def scenario() -> None:
        patient = SchedulerSettings(store_retry_s=0.05, progress_interval_s=0.01)
        on = scheduler_on(tmp_path, lock_timeout_s=0.2, settings=patient, batch_delay_s=1.0)
        async with on as (scheduler, store):
            await store.add_jobs([queued_job("j1", clip, tmp_path / "out.mkv")])
            scheduler.wake()
            await until(lambda row: row.stage == "upscaling", store, "j1")
            lock = HeldLock(tmp_path / "jobs.db")
            try:
                assert (row := await store.get("j1")) is not None and row.state == JobState.RUNNING
                deadline = asyncio.get_running_loop().time() + DEADLINE_S
                while not any("trying again" in r.getMessage() for r in caplog.records):
                    assert asyncio.get_running_loop().time() < deadline, "the outage was never met"
                    await asyncio.sleep(0.02)
            finally:
                lock.release()
            row = await until(lambda row: row.job_state.finished, store, "j1")
            assert row.state == JobState.DONE and row.error is None, row
            assert (tmp_path / "out.mkv").is_file()

    with caplog.at_level(logging.WARNING, logger="service.scheduler"):
        asyncio.run(scenario())


async def until(predicate: Callable[[JobRow], bool], store: Store, job_id: str) -> JobRow:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while True:
        row = await store.get(job_id)
        if row is not None and predicate(row):
            return row
        assert asyncio.get_running_loop().time() < deadline, f"never reached; last {row}"
        await asyncio.sleep(0.01)


def test_a_directory_named_like_a_video_fails_its_job_in_one_line(tmp_path: Path) -> None:
    """The coordinator's own check (the API refuses it at submit): a folder of images named x.mp4
    is not a video, and its output would not be one."""
    folder = tmp_path / "x.mp4"
    folder.mkdir()
    Image.new("RGB", (8, 6)).save(folder / "frame.png")

    async def scenario() -> None:
        async with scheduler_on(tmp_path) as (scheduler, store):
            await store.add_jobs([queued_job("j1", folder, tmp_path / "out.mp4")])
            scheduler.wake()
            row = await until(lambda row: row.job_state.finished, store, "j1")
            assert row.state == JobState.FAILED and row.attempts == 1, "not retried: not the workers' fault"
            assert row.error == (
                f"input {folder} is a directory, not a video file (a folder of images goes to an output "
                "folder, not out.mp4)"
            )
            assert not (tmp_path / "out.mp4").exists()

    asyncio.run(scenario())


def test_a_job_whose_workers_die_runs_again_then_fails(clip: Path, tmp_path: Path) -> None:
    """Its workers die mid-job: a RetryableError, so the job is queued again; they stay dead, so the
    second run fails too, and with max_attempts=2 that is final, naming the workers."""

    async def scenario() -> None:
        settings = SchedulerSettings(max_attempts=2)
        on = scheduler_on(tmp_path, settings=settings, remote=True, die_after_batches=1)
        async with on as (scheduler, store):
            await store.add_jobs([queued_job("j1", clip, tmp_path / "out.mkv")])
            scheduler.wake()
            row = await until(lambda row: row.job_state.finished, store, "j1")
            assert row.state == JobState.FAILED and row.attempts == 2, row
            assert row.error is not None and "worker" in row.error, row.error
            assert not (tmp_path / "out.mkv").exists()

    asyncio.run(scenario())
