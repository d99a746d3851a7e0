"""HTTP client for the worker service: the one module of the coordinator that speaks HTTP."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from coordinator.errors import CoordinatorError

log = logging.getLogger(__name__)


class WorkerRequestError(CoordinatorError):
    """A worker answered, but not with what was asked for (or did not answer at all)."""

    def __init__(self, url: str, what: str, status: int | None, detail: str) -> None:
        self.url, self.what, self.status, self.detail = url, what, status, detail
        code = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"worker {url}: {what} failed ({code}): {detail}")


class WorkerBusyError(WorkerRequestError):
    """409: the worker is already processing a manifest."""


@dataclass
class HttpWorkerClient:
    """One worker's HTTP API (:class:`coordinator.fleet.WorkerClient`). ``timeout_s`` bounds every request."""

    url: str
    session: aiohttp.ClientSession
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _request(self, method: str, path: str, what: str, json: Any = None) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.request(
                method, self.url + path, json=json, headers=self._headers(), timeout=timeout
            ) as response:
                try:
                    body: Any = await response.json(content_type=None)
                except ValueError:
                    body = {"error": (await response.text())[:300]}
                return response.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WorkerRequestError(self.url, what, None, f"{type(exc).__name__}: {exc}".strip()) from exc

    async def health(self) -> dict[str, Any]:
        """The worker's /health document; raises unless it is 200 (model loaded, serving)."""
        status, body = await self._request("GET", "/health", "health check")
        if status != 200:
            raise WorkerRequestError(self.url, "health check", status, _detail(body))
        return dict(body)

    async def process_manifest(self, manifest_path: str) -> None:
        status, body = await self._request(
            "POST", "/process_manifest", "process_manifest", json={"manifest_path": manifest_path}
        )
        if status == 409:
            raise WorkerBusyError(self.url, "process_manifest", status, _detail(body))
        if status != 202:
            raise WorkerRequestError(self.url, "process_manifest", status, _detail(body))

    async def reset(self) -> None:
        status, body = await self._request("POST", "/reset", "reset", json={})
        if status >= 400:
            raise WorkerRequestError(self.url, "reset", status, _detail(body))


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if key in body:
                return str(body[key])
    return str(body)[:300]
