"""Shared fixtures: a tiny seeded model, a shared root, one real worker process for the session, and
a farm of two for a module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.model_factory import write_tiny_compact
from tests.workerutil import WorkerProcess, cpu_workers, start_worker


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SRVGGNetCompact x4, 8 features, seed 0, in the official key layout."""
    return write_tiny_compact(tmp_path_factory.mktemp("models") / "tiny-x4.pth")


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def worker(
    shared_root: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker process for every test that leaves it idle again."""
    process = start_worker(shared_root, tiny_model, tmp_path_factory.mktemp("worker-logs"))
    yield process
    process.stop()


_outside = iter(range(1_000_000))


@pytest.fixture()
def outside(shared_root: Path) -> Path:
    """A directory beside the shared root, to escape to."""
    directory = shared_root.parent / f"outside-{next(_outside)}"
    directory.mkdir()
    return directory


@pytest.fixture()
def idle_worker(worker: WorkerProcess) -> Iterator[WorkerProcess]:
    """The session worker, checked idle before and after the test."""
    assert worker.get("/health").json()["state"] == "idle", worker.log()
    yield worker
    if worker.get("/health").json()["state"] != "idle":
        worker.post("/reset")


@pytest.fixture(scope="module")
def farm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared root of this module's :func:`farm`."""
    return tmp_path_factory.mktemp("farm")


@pytest.fixture(scope="module")
def farm(
    farm_root: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WorkerProcess]]:
    """Two worker processes sharing one root, as two GPUs of a host would, for one module (its
    tests may kill or stop one)."""
    with cpu_workers(farm_root, tiny_model, tmp_path_factory.mktemp("farm-logs")) as workers:
        yield workers
