"""The shared-storage protocol: job layout, manifest and status formats, planning, progress.

Pure code: stdlib, orjson and msgspec only. No torch, no aiohttp, no subprocess.
"""

from manifests.errors import (
    DocumentError,
    FormatVersionError,
    PathOutsideRootError,
    PlanningError,
    ProtocolError,
)
from manifests.jsonio import write_json_atomic
from manifests.layout import (
    FRAME_DIGITS,
    JOBS_DIR,
    FrameFormat,
    JobLayout,
    frame_filename,
    is_safe_name,
    resolve_within,
)
from manifests.manifest import DEFAULT_PNG_COMPRESSION, MANIFEST_FORMAT, Batch, Manifest, read_manifest
from manifests.planner import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FIRST_FRAME,
    Plan,
    leftover_batches,
    plan_batches,
    redeal,
)
from manifests.progress import Progress, progress
from manifests.status import (
    STATUS_FORMAT,
    BatchError,
    Status,
    WorkerIdentity,
    WorkerState,
    read_status,
    write_status_atomic,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_FIRST_FRAME",
    "DEFAULT_PNG_COMPRESSION",
    "FRAME_DIGITS",
    "JOBS_DIR",
    "MANIFEST_FORMAT",
    "STATUS_FORMAT",
    "Batch",
    "BatchError",
    "DocumentError",
    "FormatVersionError",
    "FrameFormat",
    "JobLayout",
    "Manifest",
    "PathOutsideRootError",
    "Plan",
    "PlanningError",
    "Progress",
    "ProtocolError",
    "Status",
    "WorkerIdentity",
    "WorkerState",
    "frame_filename",
    "is_safe_name",
    "leftover_batches",
    "plan_batches",
    "progress",
    "read_manifest",
    "read_status",
    "redeal",
    "resolve_within",
    "write_json_atomic",
    "write_status_atomic",
]
