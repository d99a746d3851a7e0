"""HTTP client for the worker service: the one module of the coordinator that speaks HTTP."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from coordinator.errors import CoordinatorError
from manifests.errors import DocumentError
from manifests.health import Health

log = logging.getLogger(__name__)


class WorkerRequestError(CoordinatorError):
    """A worker answered, but not with what was asked for (or did not answer at all)."""

    def __init__(self, url: str, what: str, status: int | None, detail: str) -> None:
        self.url, self.what, self.status, self.detail = url, what, status, detail
        code = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"worker {url}: {what} failed ({code}): {detail}")


class WorkerBusyError(WorkerRequestError):
    """409: the worker is already processing a manifest; or 503 with ``Retry-After``: it cannot take
    one for now (too many connections, its shared storage not writable), and still did after
    the client's retries."""


RETRIES = 2  # a 503 with Retry-After is asked again this many times
MAX_RETRY_AFTER_S = 5.0  # the longest wait between them, whatever Retry-After says


@dataclass
class HttpWorkerClient:
    """One worker's HTTP API (:class:`coordinator.fleet.WorkerClient`). ``timeout_s`` bounds every request."""

    url: str
    session: aiohttp.ClientSession
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0
    retries: int = RETRIES

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _request(self, method: str, path: str, what: str, json: Any = None) -> tuple[int, Any, bool]:
        """(status, body, whether the answer was a 503 that asked to be retried later). A 503 with
        ``Retry-After`` (the worker shedding load) is asked again up to ``retries`` times."""
        for attempt in range(self.retries + 1):
            status, body, retry_after = await self._request_once(method, path, what, json)
            if status != 503 or retry_after is None:
                return status, body, False
            if attempt < self.retries:
                log.debug("worker %s: %s answered 503, retrying in %g s", self.url, what, retry_after)
                await asyncio.sleep(retry_after)
        return status, body, True

    async def _request_once(
        self, method: str, path: str, what: str, json: Any
    ) -> tuple[int, Any, float | None]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.request(
                method, self.url + path, json=json, headers=self._headers(), timeout=timeout
            ) as response:
                try:
                    body: Any = await response.json(content_type=None)
                except ValueError:
                    body = {"error": (await response.text())[:300]}
                return response.status, body, _retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WorkerRequestError(self.url, what, None, f"{type(exc).__name__}: {exc}".strip()) from exc

    async def health(self) -> Health:
        """The worker's /health answer; raises unless it is 200 (model loaded, serving) and readable."""
        status, body, _ = await self._request("GET", "/health", "health check")
        if status != 200:
            raise WorkerRequestError(self.url, "health check", status, _detail(body))
        try:
            return Health.from_dict(body, source=self.url)
        except DocumentError as exc:
            raise WorkerRequestError(self.url, "health check", status, str(exc)) from None

    async def process_manifest(self, manifest_path: str) -> None:
        status, body, retry_later = await self._request(
            "POST", "/process_manifest", "process_manifest", json={"manifest_path": manifest_path}
        )
        if status == 409 or retry_later:
            raise WorkerBusyError(self.url, "process_manifest", status, _detail(body))
        if status != 202:
            raise WorkerRequestError(self.url, "process_manifest", status, _detail(body))

    async def reset(self) -> None:
        status, body, _ = await self._request("POST", "/reset", "reset", json={})
        if status >= 400:
            raise WorkerRequestError(self.url, "reset", status, _detail(body))


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` of seconds, capped at :data:`MAX_RETRY_AFTER_S`; None if absent or a date."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if key in body:
                return str(body[key])
    return str(body)[:300]
