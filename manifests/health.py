"""A worker's ``GET /health`` answer, declared once: the worker encodes it, the coordinator decodes it.

Fields a worker of an older release does not send take their defaults (``backend``: torch; a worker
that does not say whether it can write the shared root is taken to be able to); fields a newer
worker adds are ignored, so coordinators and workers of neighbouring releases keep talking.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from manifests.manifest import MAX_TILE, MAX_TILE_PAD
from manifests.records import Count, Record


class GpuMemory(Record, forbid_unknown_fields=False):
    """Device memory in bytes; ``used`` is None where the backend cannot tell (Vulkan)."""

    KIND = "health answer"

    used: Count | None = None
    total: Count | None = None
    source: str | None = None  # nvml | torch | vulkan


class Health(Record, forbid_unknown_fields=False, kw_only=True):
    """What a worker says of itself. ``state``: loading | idle | processing | error."""

    KIND = "health answer"

    state: str
    ready: bool = True
    error: str | None = None  # why the model did not load
    backend: str = "torch"
    model: str | None = None
    architecture: str | None = None
    scale: Annotated[float, Meta(gt=0)] | None = None  # None: the model's native scale
    native_scale: Annotated[float, Meta(gt=0)] | None = None
    precision: str | None = None
    device: str | None = None
    gpu: str | None = None  # as the host names it (CUDA_VISIBLE_DEVICES entry); None on the CPU
    gpu_memory: GpuMemory | None = None
    tile: Annotated[int, Meta(ge=0, le=MAX_TILE)] | None = None
    tile_pad: Annotated[int, Meta(ge=0, le=MAX_TILE_PAD)] | None = None
    #: The transports it can run (manifests.segment.TRANSPORTS); a worker from before them: frames.
    transports: tuple[str, ...] = ("frames",)
    storage_writable: bool = True
    storage_error: str | None = None
    job_id: str | None = None  # the manifest it processes now, if any
    manifest_id: str | None = None
    worker_id: str | None = None
    host: str | None = None
    pid: Count | None = None
    uptime_s: Annotated[float, Meta(ge=0)] | None = None
    version: str | None = None
