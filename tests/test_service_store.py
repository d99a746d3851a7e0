"""The service's SQLite store: schema version, state changes with their events, the event bound,
jobs left running queued again."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from service.store import SCHEMA_VERSION, JobRow, JobState, Store, StoreError, StoreUnavailableError, new_job


def job(job_id: str, priority: int = 0, created: float = 1.0) -> JobRow:
    return new_job(
        job_id=job_id, batch_id="b", input=f"/in/{job_id}.mp4", output=f"/out/{job_id}.mp4", spec={"x": 1},
        model="m", scale=2.0, codec="libx264", priority=priority, now=created,
    )  # fmt: skip


def test_jobs_events_and_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = Store(tmp_path / "jobs.db", max_events=150)
        await store.open()
        ids = await store.add_jobs([job("a", 0, 1.0), job("b", 5, 2.0), job("c", 0, 0.5)])
        assert ids == sorted(ids)
        assert [j.id for j in await store.jobs()] == ["b", "c", "a"]  # priority, then age
        running = await store.update("a", only_if=[JobState.QUEUED], state=JobState.RUNNING)
        assert running is not None and running.state == "running"
        assert await store.update("a", only_if=[JobState.QUEUED], state=JobState.DONE) is None
        events = await store.events_after(ids[-1])
        assert [orjson.loads(data)["state"] for _, data in events] == ["running"]
        for done in range(200):
            await store.update("b", frames_done=done)
        assert len(await store.events_after(0, limit=10_000)) <= 150 + 100
        assert (await store.counts())["running"] == 1
        await store.close()
        again = Store(tmp_path / "jobs.db")
        await again.open()
        assert await again.requeue_running() == ["a"]
        row = await again.get("a")
        assert row is not None and row.state == "queued"
        await again.close()

    asyncio.run(scenario())


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()

    async def scenario() -> None:
        store = Store(path)
        with pytest.raises(StoreError, match="schema version"):
            await store.open()
        await store.close()

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "fresh.db") as db:
        pass
    db.close()

    async def fresh() -> None:
        store = Store(tmp_path / "fresh.db")
        await store.open()
        await store.close()

    asyncio.run(fresh())
    with sqlite3.connect(tmp_path / "fresh.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


class HeldLock:
    """Another process's write lock on the database (another connection holding BEGIN IMMEDIATE)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


def test_a_lock_is_waited_for_then_the_store_is_unavailable_not_broken(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = Store(tmp_path / "jobs.db", lock_timeout_s=0.3)
        await store.open()
        await store.add_jobs([job("a")])
        lock = HeldLock(tmp_path / "jobs.db")
        with pytest.raises(StoreUnavailableError, match=r"jobs\.db is unavailable: database is locked"):
            await store.update("a", priority=3)  # past the lock timeout: nothing changed, one line
        assert (await store.get("a")) == job("a"), "reads go on while another process writes"
        lock.release()
        await store.update("a", priority=3)  # and the store works again
        assert (row := await store.get("a")) is not None and row.priority == 3
        await store.close()

        patient = Store(tmp_path / "jobs.db", lock_timeout_s=60)
        await patient.open()
        lock = HeldLock(tmp_path / "jobs.db")
        waiting = asyncio.ensure_future(patient.update("a", priority=4))
        await asyncio.sleep(0.2)  # it waits meanwhile (up to its 60 s)
        lock.release()
        assert (row := await waiting) is not None and row.priority == 4  # it waited for the lock
        await patient.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "locked"])
def test_a_database_that_cannot_be_used_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "jobs.db"

    async def make() -> None:
        store = Store(path)
        await store.open()
        await store.add_jobs([job(f"j{i}") for i in range(300)])
        await store.close()

    asyncio.run(make())
    lock = None
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 400)
    elif damage == "truncated":
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])
    else:
        lock = HeldLock(path)
        lock.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        lock.db.execute("UPDATE jobs SET priority = 1")

    async def scenario() -> None:
        store = Store(path, lock_timeout_s=0.3)
        with pytest.raises(StoreError) as raised:
            await store.open()
        await store.close()
        message = str(raised.value)
        assert message.startswith(f"the database {path} cannot be used: ") and "\n" not in message, message

    asyncio.run(scenario())
    if lock is not None:
        lock.release()


def test_a_full_database_is_unavailable_not_broken(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" (here: a page limit, as a full disk gives it) is the
    store being unavailable: nothing half-written, and it works again once there is room."""

    async def scenario() -> None:
        store = Store(tmp_path / "jobs.db")
        await store.open()
        pages = await store._call(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await store._call(lambda db: db.execute(f"PRAGMA max_page_count={pages + 1}"))
        big = [replace(job(f"j{i}"), error="x" * 4000) for i in range(20)]
        with pytest.raises(StoreUnavailableError, match="database or disk is full"):
            await store.add_jobs(big)
        assert await store.jobs() == [], "none of them half-stored"
        await store._call(lambda db: db.execute("PRAGMA max_page_count=1000000"))
        await store.add_jobs(big)
        assert len(await store.jobs()) == 20
        await store.close()

    asyncio.run(scenario())
