"""What a job is and what farm it runs on: two frozen settings types, each validated once.

- :class:`JobSpec`: one video (input, output, model, scale, encoder, ...). It serialises to JSON
  (:meth:`JobSpec.to_dict` / :meth:`JobSpec.from_dict`), so a queue can store it; its errors
  (:class:`SpecError`) name fields, not CLI flags.
- :class:`FarmSettings`: the workers (URLs, how many to start here, or a Ray cluster to start them
  on), the shared root, the token, and every timeout and poll interval, so tests can shrink them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import SpecError
from manifests.layout import FrameFormat
from manifests.manifest import BACKENDS, MAX_BATCH_FRAMES, MAX_FRAME_INDEX, MAX_SCALE, MAX_TILE, MIN_SCALE
from manifests.ranges import DEFAULT_SEGMENT_FRAMES
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


@dataclass(frozen=True)
class JobSpec:
    """One upscaling job: what goes in, what comes out, and everything that decides how."""

    input: Path
    output: Path
    model: str = DEFAULT_MODEL
    scale: float | None = None  # None: the model's own
    tile: int | None = None  # None: whatever the workers run
    precision: str | None = None  # local workers only; None: the device's default
    backend: str = "torch"  # the workers' backend: "torch" or "ncnn" (Vulkan); one backend per job
    batch_size: int = 8
    frame_format: FrameFormat | None = None  # None: the fastest that holds the job's frames
    png_compression: int = 1
    max_disk: int = DEFAULT_MAX_DISK  # bytes of input and output frames on disk at once
    max_chunk_frames: int = 256
    encoders: int | None = None  # segments encoded at once; None: by CPU count
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    overwrite: bool = False
    keep_frames: bool = False
    dedup: bool = False  # held frames (repeats of the last upscaled frame) reuse its upscale
    transport: str = FRAMES_TRANSPORT  # "frames" or "segments" (manifests.segment)
    segment_frames: int = DEFAULT_SEGMENT_FRAMES  # segments transport: source frames per worker range

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        try:
            if self.frame_format is not None:
                object.__setattr__(self, "frame_format", FrameFormat(self.frame_format))
        except ValueError:
            choices = ", ".join(f.value for f in FrameFormat)
            raise SpecError("frame_format", f"must be one of {choices}, not {self.frame_format!r}") from None
        if not self.model:
            raise SpecError("model", "must name a model or a model file")
        scale = self.scale
        if scale is not None and not (math.isfinite(scale) and MIN_SCALE <= scale <= MAX_SCALE):
            raise SpecError("scale", f"must be {MIN_SCALE:g} to {MAX_SCALE:g}, not {self.scale:g}")
        if self.tile is not None and not 0 <= self.tile <= MAX_TILE:
            raise SpecError("tile", f"must be 0 to {MAX_TILE}, not {self.tile}")
        if self.precision not in {None, "fp16", "bf16", "fp32"}:
            raise SpecError("precision", f"must be fp16, bf16 or fp32, not {self.precision!r}")
        if self.backend not in BACKENDS:
            raise SpecError("backend", f"must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "ncnn" and self.precision == "bf16":
            raise SpecError("precision", "must be fp16 or fp32 on the ncnn backend, not bf16")
        if not 1 <= self.batch_size <= MAX_BATCH_FRAMES:
            raise SpecError("batch_size", f"must be 1 to {MAX_BATCH_FRAMES}, not {self.batch_size}")
        if not 0 <= self.png_compression <= 9:
            raise SpecError("png_compression", f"must be 0 to 9, not {self.png_compression}")
        if self.max_disk < 1:
            raise SpecError("max_disk", f"must be above 0, not {self.max_disk}")
        if not 1 <= self.max_chunk_frames <= MAX_FRAME_INDEX:
            raise SpecError("max_chunk_frames", f"must be above 0, not {self.max_chunk_frames}")
        if self.encoders is not None and self.encoders < 1:
            raise SpecError("encoders", f"must be at least 1, not {self.encoders}")
        if self.transport not in TRANSPORTS:
            raise SpecError("transport", f"must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        if self.dedup and self.transport != FRAMES_TRANSPORT:
            raise SpecError("dedup", f"is for the frames transport, not {self.transport}")
        if not 1 <= self.segment_frames <= MAX_SEGMENT_FRAMES:
            raise SpecError("segment_frames", f"must be 1 to {MAX_SEGMENT_FRAMES}, not {self.segment_frames}")

    @property
    def encoder_count(self) -> int:
        """Segments encoded at once: as asked, else a quarter of the CPUs (1 to 4)."""
        return self.encoders or max(1, min(4, (os.cpu_count() or 1) // 4))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings); :meth:`from_dict` gives the same spec back."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["input"], values["output"] = str(self.input), str(self.output)
        values["frame_format"] = None if self.frame_format is None else self.frame_format.value
        values["encode"] = {**dataclasses.asdict(self.encode), "extra_args": list(self.encode.extra_args)}
        return values

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """The spec of :meth:`to_dict`'s output; raises :class:`SpecError` naming a bad field."""
        if not isinstance(data, dict):
            raise SpecError("job", f"must be a JSON object, not {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SpecError(unknown[0], "is not a job setting")
        for name in ("input", "output"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise SpecError(name, f"must be a path, not {data.get(name)!r}")
        values = dict(data)
        encode = values.pop("encode", None)
        for name, value in values.items():
            _check_type(name, value, known[name].type)
        if encode is not None:
            if not isinstance(encode, dict):
                raise SpecError("encode", f"must be an object, not {encode!r}")
            try:
                values["encode"] = EncodeSettings(**encode)
            except TypeError as exc:
                raise SpecError("encode", f"is not valid: {exc}") from None
        return cls(**values)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "Path": (str,),
    "FrameFormat": (str,),
}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """A JSON value of the type the field's annotation names (``int | None`` etc.)."""
    options = [part.strip() for part in str(annotation).split("|")]
    if value is None and "None" in options:
        return
    allowed = tuple(t for option in options for t in _JSON_TYPES.get(option, ()))
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        wanted = " or ".join(o for o in options if o != "None") + (" or null" if "None" in options else "")
        raise SpecError(name, f"must be {wanted}, not {value!r}")


@dataclass(frozen=True)
class FarmSettings:
    """The workers a job runs on, and how they are watched."""

    workers: tuple[str, ...] = ()  # worker URLs; empty: start local workers
    local_workers: int | None = None  # None: one per visible GPU, or one on the CPU
    local_worker_args: tuple[str, ...] = ()  # extra flags for started workers (e.g. --cpu-threads 1)
    ray_address: str | None = None  # start the workers as actors on this Ray cluster ("auto" or host:port)
    ray_workers: int | None = None  # how many actors; None: one per GPU of the cluster (see ray_fleet)
    shared_root: Path | None = None  # None: default_shared_root()
    token: str | None = field(default=None, repr=False)
    poll_interval_s: float = 0.02
    health_interval_s: float = 2.0
    startup_timeout_s: float = 600.0  # local workers: model load and warm-up
    unreachable_after_s: float = 30.0
    stale_after_s: float = 600.0
    request_timeout_s: float = 10.0
    busy_backoff_s: float = 0.25  # first wait after a worker answered 409 busy; doubles up to 20x

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(u.strip().rstrip("/") for u in self.workers if u.strip()))
        if self.local_workers is not None and self.local_workers < 1:
            raise SpecError("local_workers", f"must be at least 1, not {self.local_workers}")
        if self.workers and self.local_workers is not None:
            raise SpecError("workers", "and local_workers cannot both be given")
        if self.ray_address is not None:
            if not self.ray_address.strip():
                raise SpecError("ray_address", "must be auto or the Ray cluster's address")
            if self.workers or self.local_workers is not None:
                field_name = "workers" if self.workers else "local_workers"
                raise SpecError(field_name, "cannot be given with ray_address: Ray starts the workers")
        if self.ray_workers is not None:
            if self.ray_address is None:
                raise SpecError("ray_workers", "needs ray_address")
            if self.ray_workers < 1:
                raise SpecError("ray_workers", f"must be at least 1, not {self.ray_workers}")
        if self.workers and self.shared_root is None:
            raise SpecError(
                "shared_root",
                "must be given with workers: the directory those workers were started with, as this "
                "machine sees it",
            )
        for url in self.workers:
            if not url.startswith(("http://", "https://")):
                raise SpecError("workers", f"must be http:// or https:// URLs, not {url!r}")
        for name in (
            "poll_interval_s", "health_interval_s", "startup_timeout_s", "unreachable_after_s",
            "stale_after_s", "request_timeout_s", "busy_backoff_s",
        ):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SpecError(name, f"must be a number of seconds above 0, not {value!r}")

    @property
    def root(self) -> Path:
        """The shared root, resolved."""
        return (self.shared_root or default_shared_root()).resolve()
