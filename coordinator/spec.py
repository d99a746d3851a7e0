"""What a job is and what farm it runs on: two frozen settings types, each validated once.

- :class:`JobSpec`: one video (input, output, model, scale, encoder, ...), a msgspec record with
  its limits beside its fields. It serialises to JSON (:meth:`JobSpec.to_dict` /
  :meth:`JobSpec.from_dict`), so a queue can store it; its errors (:class:`SpecError`) name
  fields, not CLI flags.
- :class:`FarmSettings`: the workers (URLs, how many to start here, or a Ray cluster to start them
  on), the shared root, the token, and every timeout and poll interval, so tests can shrink them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from coordinator.errors import SpecError
from manifests.dedup import STRICT, dedup_level_problem
from manifests.errors import DocumentError
from manifests.layout import FrameFormat
from manifests.manifest import BACKENDS, MAX_BATCH_FRAMES, MAX_FRAME_INDEX, MAX_SCALE, MAX_TILE, MIN_SCALE
from manifests.ranges import DEFAULT_SEGMENT_FRAMES
from manifests.records import Positive, Record, Seconds
from manifests.segment import FRAMES_TRANSPORT, MAX_SEGMENT_FRAMES, TRANSPORTS
from media.encode import EncodeSettings

DEFAULT_MODEL = "realesr-animevideov3"
DEFAULT_MAX_DISK = 4 << 30


def default_shared_root() -> Path:
    """``$ESRFARM_SHARED_ROOT``, else ``$TMPDIR/esrfarm-$UID``."""
    env = os.environ.get("ESRFARM_SHARED_ROOT")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"esrfarm-{os.getuid()}"


class JobSpec(Record):
    """One upscaling job: what goes in, what comes out, and everything that decides how.

    A msgspec record (:mod:`manifests.records`): each field's limits are declared beside it and
    checked when the spec is built or read (:meth:`from_dict`); a bad one is a :class:`SpecError`
    naming the field. Treat it as immutable (``msgspec.structs.replace`` makes a checked copy)."""

    KIND = "job"

    input: Path
    output: Path
    model: Annotated[str, Meta(min_length=1)] = DEFAULT_MODEL  # a model name or a model file
    scale: Annotated[float, Meta(ge=MIN_SCALE, le=MAX_SCALE)] | None = None  # None: the model's own
    tile: Annotated[int, Meta(ge=0, le=MAX_TILE)] | None = None  # None: whatever the workers run
    precision: Literal["fp16", "bf16", "fp32"] | None = None  # local workers only; None: the device's
    backend: str = "torch"  # the workers' backend (one of BACKENDS); one backend per job
    batch_size: Annotated[int, Meta(ge=1, le=MAX_BATCH_FRAMES)] = 8
    frame_format: FrameFormat | None = None  # None: the fastest that holds the job's frames
    png_compression: Annotated[int, Meta(ge=0, le=9)] = 1
    max_disk: Positive = DEFAULT_MAX_DISK  # bytes of input and output frames at once
    max_chunk_frames: Annotated[int, Meta(ge=1, le=MAX_FRAME_INDEX)] = 256
    encoders: Positive | None = None  # segments encoded at once; None: by CPU count
    encode: EncodeSettings = msgspec.field(default_factory=EncodeSettings)
    overwrite: bool = False
    keep_frames: bool = False
    dedup: bool = False  # held frames (repeats of the last upscaled frame) reuse its upscale
    dedup_level: str = STRICT  # how close a repeat must be (manifests.dedup.DEDUP_LEVELS)
    transport: str = FRAMES_TRANSPORT  # "frames" or "segments" (manifests.segment)
    # segments transport: source frames per worker range
    segment_frames: Annotated[int, Meta(ge=1, le=MAX_SEGMENT_FRAMES)] = DEFAULT_SEGMENT_FRAMES

    def _check(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        with contextlib.suppress(ValueError):  # a bad one is said by the declaration's check
            self.frame_format = None if self.frame_format is None else FrameFormat(self.frame_format)
        if self.backend not in BACKENDS:
            raise self.fail("backend", f"must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "ncnn" and self.precision == "bf16":
            raise self.fail("precision", "must be fp16 or fp32 on the ncnn backend, not bf16")
        if self.transport not in TRANSPORTS:
            raise self.fail("transport", f"must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        if (problem := dedup_level_problem(self.dedup, self.dedup_level)) is not None:
            raise self.fail("dedup_level", problem)
        if self.dedup and self.transport != FRAMES_TRANSPORT:
            raise self.fail("dedup", f"is for the frames transport, not {self.transport}")

    @classmethod
    def _refused(cls, error: DocumentError) -> Exception:
        return SpecError(error.field or cls.KIND, error.problem)

    @property
    def encoder_count(self) -> int:
        """Segments encoded at once: as asked, else a quarter of the CPUs (1 to 4)."""
        return self.encoders or max(1, min(4, (os.cpu_count() or 1) // 4))


class FarmSettings(Record):
    """The workers a job runs on, and how they are watched (a record like :class:`JobSpec`)."""

    KIND = "farm"
    HIDDEN = frozenset({"token"})

    workers: tuple[str, ...] = ()  # worker URLs; empty: start local workers
    local_workers: Positive | None = None  # None: one per visible GPU, or one on the CPU
    local_worker_args: tuple[str, ...] = ()  # extra flags for started workers (e.g. --cpu-threads 1)
    ray_address: str | None = None  # start the workers as actors on this Ray cluster ("auto" or host:port)
    ray_workers: Positive | None = None  # how many actors; None: one per GPU (ray_fleet)
    shared_root: Path | None = None  # None: default_shared_root()
    token: str | None = None
    poll_interval_s: Seconds = 0.02
    health_interval_s: Seconds = 2.0
    startup_timeout_s: Seconds = 600.0  # local workers: model load and warm-up
    unreachable_after_s: Seconds = 30.0
    stale_after_s: Seconds = 600.0
    request_timeout_s: Seconds = 10.0
    busy_backoff_s: Seconds = 0.25  # first wait after a worker answered 409 busy; doubles up to 20x

    def _check(self) -> None:
        self.workers = tuple(u.strip().rstrip("/") for u in self.workers if u.strip())
        self.local_worker_args = tuple(self.local_worker_args)
        if self.shared_root is not None:
            self.shared_root = Path(self.shared_root)
        if self.workers and self.local_workers is not None:
            raise self.fail("workers", "and local_workers cannot both be given")
        if self.ray_address is not None:
            if not self.ray_address.strip():
                raise self.fail("ray_address", "must be auto or the Ray cluster's address")
            if self.workers or self.local_workers is not None:
                field_name = "workers" if self.workers else "local_workers"
                raise self.fail(field_name, "cannot be given with ray_address: Ray starts the workers")
        if self.ray_workers is not None and self.ray_address is None:
            raise self.fail("ray_workers", "needs ray_address")
        if self.workers and self.shared_root is None:
            raise self.fail(
                "shared_root",
                "must be given with workers: the directory those workers were started with, as this "
                "machine sees it",
            )
        for url in self.workers:
            if not url.startswith(("http://", "https://")):
                raise self.fail("workers", f"must be http:// or https:// URLs, not {url!r}")

    @classmethod
    def _refused(cls, error: DocumentError) -> Exception:
        return SpecError(error.field or cls.KIND, error.problem)

    @property
    def root(self) -> Path:
        """The shared root, resolved."""
        return (self.shared_root or default_shared_root()).resolve()
