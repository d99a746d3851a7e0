"""A job's blocking calls (file I/O, fsync, a decode) on threads, and the job's wait for all of them.

The event loop never blocks: each call runs on a thread (``asyncio.to_thread``, so it keeps the
caller's context, and with it the job's ffmpeg process group). A job cancelled while a call runs
still waits for it (:meth:`JobThreads.settle`) before it lets go of its directory's lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class JobThreads:
    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work on a thread; the job waits for it even when cancelled meanwhile."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return await asyncio.shield(future)

    async def settle(self) -> None:
        """Wait until every call started so far has ended (its outcome is not looked at)."""
        await asyncio.gather(*self._running, return_exceptions=True)
