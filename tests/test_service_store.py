"""The service's SQLite store: schema version, state changes with their events, the event bound,
jobs left running queued again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from service.store import SCHEMA_VERSION, JobRow, JobState, Store, StoreError, new_job


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
