"""The job service's memory: one SQLite database (WAL) of jobs and of the events sent about them.

Every sqlite call runs on one writer thread of its own (:class:`Store` is used from the event
loop through ``await``), so the loop never waits on the disk and the connection is never shared
between threads. The schema has a version (``PRAGMA user_version``); a database of a newer version
is refused, an older one is migrated.

- ``jobs``: one row per job (its spec as JSON, its state, stage and progress, its error, times).
- ``events``: one row per change a client is told about, the job's record at that moment; the row id
  is the SSE event id, so a client that reconnects with ``Last-Event-ID`` gets what it missed.
  Only the newest ``max_events`` rows are kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from manifests.dedup import STRICT
from service.errors import StoreError, StoreUnavailableError

T = TypeVar("T")

SCHEMA_VERSION = 1
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_LOCK_TIMEOUT_S = 10.0  # how long a call waits for another process's lock on the database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL,
    spec TEXT NOT NULL,
    model TEXT NOT NULL,
    scale REAL,
    codec TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    stage TEXT,
    frames_done INTEGER NOT NULL DEFAULT 0,
    frames_total INTEGER NOT NULL DEFAULT 0,
    fps REAL,
    eta_s REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    job_dir TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, priority DESC, created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    data BLOB NOT NULL
);
"""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in {JobState.DONE, JobState.FAILED, JobState.CANCELLED}


@dataclass(frozen=True)
class JobRow:
    """One job as stored."""

    id: str
    batch_id: str
    input: str
    output: str
    spec: str  # the coordinator's JobSpec.to_dict(), or a comparison's spec (its "kind"), as JSON
    model: str
    scale: float | None
    codec: str
    priority: int
    state: str
    stage: str | None
    frames_done: int
    frames_total: int
    fps: float | None
    eta_s: float | None
    error: str | None
    attempts: int
    job_dir: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    @property
    def spec_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.spec)
        return value

    @functools.cached_property
    def kind(self) -> str:
        """``upscale`` (the spec is a coordinator JobSpec) or ``compare`` (:mod:`service.comparisons`)."""
        return str(self.spec_dict.get("kind", "upscale"))

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round(self.finished_at - self.started_at, 3)

    def to_json(self) -> dict[str, Any]:
        """The job's record, as events store it; the API adds its URLs (``service.api.shown_job``)."""
        return {
            "id": self.id, "kind": self.kind, "batch_id": self.batch_id, "input": self.input,
            "output": self.output, "model": self.model, "scale": self.scale, "codec": self.codec,
            "priority": self.priority, "dedup": bool(self.spec_dict.get("dedup", False)),
            "dedup_level": self.spec_dict.get("dedup_level", STRICT),
            "state": self.state, "stage": self.stage, "frames_done": self.frames_done,
            "frames_total": self.frames_total, "fps": self.fps, "eta_s": self.eta_s, "error": self.error,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_s": self.duration_s,
        }  # fmt: skip


_COLUMNS = tuple(f.name for f in fields(JobRow))
#: The columns an update may set (the identity of a job never changes).
_MUTABLE = frozenset(_COLUMNS) - {"id", "batch_id", "input", "output", "spec", "model", "scale", "codec"}


def new_job(
    *,
    job_id: str,
    batch_id: str,
    input: str,
    output: str,
    spec: dict[str, Any],
    model: str,
    scale: float | None,
    codec: str,
    priority: int,
    now: float,
) -> JobRow:
    """A queued job, not yet stored."""
    return JobRow(
        id=job_id, batch_id=batch_id, input=input, output=output, spec=orjson.dumps(spec).decode(),
        model=model, scale=scale, codec=codec, priority=priority, state=JobState.QUEUED, stage=None,
        frames_done=0, frames_total=0, fps=None, eta_s=None, error=None, attempts=0, job_dir=None,
        created_at=now, started_at=None, finished_at=None,
    )  # fmt: skip


class Store:
    """The database, used from the event loop; see the module docstring. ``await open()`` first."""

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.max_events = max_events
        self.lock_timeout_s = lock_timeout_s
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "esrfarm-store")
        self._db: sqlite3.Connection | None = None
        self._new_event = asyncio.Event()
        self._inserted = 0

    # -- plumbing ---------------------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        """``fn`` in one transaction on the store's thread. A write takes the write lock first
        (waiting up to the lock timeout for another process's), so it never fails half-way."""

        def run() -> T:
            db = self._db
            if db is None:
                raise StoreUnavailableError(f"the database {self.path} is not open")
            try:
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = fn(db)
                except BaseException:
                    if db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise
            except sqlite3.DatabaseError as exc:  # locked, full, I/O error, corrupt
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise StoreUnavailableError(f"the database {self.path} is unavailable: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    async def open(self) -> None:
        """Raises :class:`StoreError` (one line) when the database cannot be used: a newer schema,
        a file that is not a database or is corrupt, a lock held past the lock timeout."""

        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self.lock_timeout_s
            )
            db.row_factory = sqlite3.Row
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database {self.path} has schema version {version}; this esrfarm knows "
                        f"{SCHEMA_VERSION} at most (upgrade esrfarm)"
                    )
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(f"the integrity check says: {check}")
            except sqlite3.DatabaseError as exc:
                db.close()
                raise StoreError(f"the database {self.path} cannot be used: {exc}") from None
            except BaseException:
                db.close()
                raise
            return db

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._thread, connect)
        except OSError as exc:  # its directory cannot be made
            raise StoreError(f"the database {self.path} cannot be used: {exc.strerror or exc}") from None

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)

    # -- jobs -------------------------------------------------------------------------------------

    async def add_jobs(self, jobs: Iterable[JobRow]) -> list[int]:
        """Store new jobs, each with an event; returns the event ids."""
        rows = list(jobs)

        def insert(db: sqlite3.Connection) -> list[int]:
            marks = ", ".join("?" for _ in _COLUMNS)
            ids = []
            for job in rows:
                db.execute(
                    f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})",
                    [getattr(job, c) for c in _COLUMNS],
                )
                ids.append(self._insert_event(db, job))
            return ids

        ids = await self._call(insert, write=True)
        self._notify()
        return ids

    async def get(self, job_id: str) -> JobRow | None:
        return await self._call(lambda db: _one(db, job_id))

    async def with_prefix(self, prefix: str, limit: int = 5) -> list[JobRow]:
        """Jobs whose id starts with ``prefix`` (at most ``limit``), oldest first."""

        def select(db: sqlite3.Connection) -> list[JobRow]:
            cursor = db.execute(
                "SELECT * FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY created_at, rowid LIMIT ?",
                (len(prefix), prefix, limit),
            )
            return [_row(r) for r in cursor]

        return await self._call(select)

    async def jobs(self, state: str | None = None) -> list[JobRow]:
        """Jobs in the order they run: priority (highest first), then age."""
        order = "ORDER BY priority DESC, created_at, rowid"

        def select(db: sqlite3.Connection) -> list[JobRow]:
            if state is None:
                cursor = db.execute(f"SELECT * FROM jobs {order}")
            else:
                cursor = db.execute(f"SELECT * FROM jobs WHERE state = ? {order}", (state,))
            return [_row(r) for r in cursor]

        return await self._call(select)

    async def update(
        self, job_id: str, *, only_if: Iterable[str] | None = None, event: bool = True, **values: Any
    ) -> JobRow | None:
        """Set ``values`` on the job (in one of the states ``only_if``, when given); records an
        event with the job's new JSON unless ``event`` is false. Returns the new row, or None when
        the job is gone or was in another state."""
        bad = set(values) - _MUTABLE
        if bad:
            raise ValueError(f"cannot update {sorted(bad)}")
        states = list(only_if) if only_if is not None else None

        def apply(db: sqlite3.Connection) -> JobRow | None:
            current = _one(db, job_id)
            if current is None or (states is not None and current.state not in states):
                return None
            new = replace(current, **values)
            if new == current:
                return new
            sets = ", ".join(f"{name} = ?" for name in values)
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*values.values(), job_id])
            if event:
                self._insert_event(db, new)
            return new

        row = await self._call(apply, write=True)
        if row is not None and event:
            self._notify()
        return row

    async def delete(self, job_id: str) -> None:
        await self._call(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)), write=True)

    async def requeue_running(self) -> list[str]:
        """Jobs a stopped service left running go back to the queue (they resume). Returns their ids."""

        def requeue(db: sqlite3.Connection) -> list[str]:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = ?", (JobState.RUNNING,))]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = ?, fps = NULL, eta_s = NULL WHERE id = ?",
                    (JobState.QUEUED, job_id),
                )
                row = _one(db, job_id)
                assert row is not None
                self._insert_event(db, row)
            return ids

        ids = await self._call(requeue, write=True)
        self._notify()
        return ids

    async def counts(self) -> dict[str, int]:
        """Jobs in each state (every state named, 0 where none)."""

        def count(db: sqlite3.Connection) -> dict[str, int]:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            return {state.value: int(found.get(state.value, 0)) for state in JobState}

        return await self._call(count)

    # -- events -----------------------------------------------------------------------------------

    def _insert_event(self, db: sqlite3.Connection, job: JobRow) -> int:
        cursor = db.execute(
            "INSERT INTO events (job_id, data) VALUES (?, ?)", (job.id, orjson.dumps(job.to_json()))
        )
        event_id = int(cursor.lastrowid or 0)
        self._inserted += 1
        if self._inserted % 100 == 0:
            db.execute("DELETE FROM events WHERE id <= ?", (event_id - self.max_events,))
        return event_id

    def _notify(self) -> None:
        event, self._new_event = self._new_event, asyncio.Event()
        event.set()

    def next_event(self) -> asyncio.Event:
        """Set once an event newer than now is stored: take it *before* reading :meth:`events_after`,
        so that nothing stored in between is missed."""
        return self._new_event

    async def events_after(self, last_id: int, limit: int = 500) -> list[tuple[int, bytes]]:
        """Stored events with an id above ``last_id``, oldest first: (id, job JSON as bytes)."""

        def select(db: sqlite3.Connection) -> list[tuple[int, bytes]]:
            cursor = db.execute(
                "SELECT id, data FROM events WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
            )
            return [(int(r["id"]), bytes(r["data"])) for r in cursor]

        return await self._call(select)

    async def last_event_id(self) -> int:
        def select(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

        return await self._call(select)


def _one(db: sqlite3.Connection, job_id: str) -> JobRow | None:
    row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return _row(row) if row is not None else None


def _row(row: sqlite3.Row) -> JobRow:
    return JobRow(**{name: row[name] for name in _COLUMNS})


def now() -> float:
    return round(time.time(), 3)
