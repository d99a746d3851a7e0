"""A worker that joins the fleet (a restarted Ray actor's new URL) counts as coming until it answers
/health or ``startup_timeout_s`` passes: a job whose only worker was restarted waits for it instead
of failing for want of workers in the moment between its joining and its first /health answer.

Real worker processes; the pool is a stand-in for :class:`coordinator.ray_fleet.RayWorkerPool` (the
fleet's own :class:`coordinator.fleet.WorkerPool` boundary) that reports URLs as joined."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from coordinator.fleet import WorkerFleet
from coordinator.spec import FarmSettings
from tests.workerutil import start_worker


class JoiningPool:
    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def exited(self) -> dict[str, str]:
        return {}

    def joined(self) -> list[str]:
        urls, self.urls = self.urls, []
        return urls

    def replacing(self) -> list[str]:
        return []

    def kill(self, url: str) -> None:
        pass

    async def stop(self) -> None:
        pass


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_a_joined_worker_is_waited_for_until_it_answers_or_its_startup_time_is_up(
    tmp_path: Path, tiny_model: Path
) -> None:
    first = start_worker(tmp_path, tiny_model, tmp_path / "logs")
    second = start_worker(tmp_path, tiny_model, tmp_path / "logs")
    silent = closed_port_url()

    async def scenario() -> None:
        farm = FarmSettings(workers=(first.url,), shared_root=tmp_path, startup_timeout_s=1.5)
        async with WorkerFleet(farm) as fleet:
            fleet.pool = JoiningPool([second.url, silent])
            await fleet.health_round()
            assert fleet.replacing() == [silent], "the one that answered is ready, the other is coming"
            assert fleet.handles[second.url].ready and not fleet.handles[silent].ready
            await asyncio.sleep(1.6)
            await fleet.health_round()
            assert fleet.replacing() == [], "past its startup time it is no longer waited for"

    try:
        asyncio.run(scenario())
    finally:
        first.stop()
        second.stop()
