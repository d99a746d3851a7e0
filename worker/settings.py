"""Worker settings: one record built from CLI flags and the environment, validated once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from msgspec import Meta

from manifests.errors import DocumentError
from manifests.httpguard import is_loopback
from manifests.manifest import BACKENDS, MAX_TILE, MAX_TILE_PAD
from manifests.records import Count, Positive, Record, Seconds
from manifests.tokens import TOKEN_ENV
from worker.errors import WorkerError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192  # 67 Mpx: 8K output of 2K input at x4, or of 4K input at x2
PART_FRAMES_OF_LARGEST = 4  # a batch is handled in parts of at most 4 frames of the largest size


class SettingsError(WorkerError, ValueError):
    """Settings that cannot work together; the message says which flag to change."""


class WorkerSettings(Record):
    """A worker's settings, each field's limit declared beside it; a bad one is a
    :class:`SettingsError` naming the field (the worker CLI's flag is the field's name with dashes,
    ``tile_pad`` -> ``--tile-pad``; timeouts drop their ``_s``)."""

    KIND = "worker settings"
    HIDDEN = frozenset({"token"})

    shared_root: Path
    model: str
    backend: str = "torch"  # "torch" (worker/runtime.py: CUDA or the CPU) | "ncnn" (worker/ncnn_runtime.py)
    host: str = DEFAULT_HOST
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT  # 0: any free port (printed, in port_file)
    gpu: Count | None = None  # torch: index among the visible CUDA devices (None: the first, else the
    # CPU); ncnn: the Vulkan device index (None: 0)
    device: str | None = None  # "cpu" | "cuda" | "cuda:N" | "auto"; overrides gpu
    precision: str | None = None
    scale: float | None = None
    tile: Annotated[int, Meta(ge=0, le=MAX_TILE)] = 0
    tile_pad: Annotated[int, Meta(ge=0, le=MAX_TILE_PAD)] = 10
    max_batch: int | None = None
    cpu_threads: int | None = None
    allow_download: bool = True
    worker_id: str | None = None  # default "<hostname>:<port>"
    token: str | None = None
    port_file: Path | None = None
    warmup: bool = True
    warmup_size: Positive = 64  # edge of the square warm-up frame, in pixels
    max_request_bytes: Positive = 64 * 1024  # request bodies larger than this get 413
    max_manifest_bytes: Positive = 8 << 20  # a larger manifest file is refused (400) without being read
    max_output_pixels: Positive = (
        DEFAULT_MAX_OUTPUT_PIXELS  # per upscaled frame; a larger one fails its batch
    )
    pixel_budget: Positive | None = None  # input pixels per forward pass; None: the runtime's device default
    max_connections: Positive = 256  # open connections at most (fewer if the descriptor limit is lower)
    header_timeout_s: Seconds = 30.0  # to send whole request headers, from connecting or the last answer
    body_timeout_s: Seconds = 10.0  # to send a request body once its headers are in
    io_threads: Positive = 4  # threads reading or writing the frames of one batch
    fsync_frames: bool = True  # fsync each output frame before its batch is claimed as done
    shutdown_timeout_s: Seconds = 90.0  # on SIGTERM, how long the current batch may take to finish
    reset_timeout_s: Seconds = 60.0  # how long POST /reset waits for the batch in flight
    storage_probe_interval_s: Seconds = 2.0  # while the shared root is not writable, how often to try again
    simulate_latency_ms: Annotated[float, Meta(ge=0)] | None = None  # benchmarks only: no model, a fixed
    # latency per frame

    def _check(self) -> None:
        self.shared_root = Path(self.shared_root)
        if self.port_file is not None:
            self.port_file = Path(self.port_file)
        if not self.shared_root.is_dir():
            raise self.fail("shared_root", f"{self.shared_root} is not a directory")
        if self.backend not in BACKENDS:
            raise self.fail("backend", f"must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "ncnn":
            if self.device is not None:
                raise self.fail("device", "is for the torch backend; pick the Vulkan device with --gpu N")
            if self.precision == "bf16":
                raise self.fail("precision", "must be fp16 or fp32 on the ncnn backend, not bf16")
        if self.gpu is not None and self.device is not None:
            raise self.fail("gpu", f"{self.gpu} and --device {self.device} cannot both be given")
        if self.token is not None and not self.token.strip():
            raise self.fail("token_file", f"(or {TOKEN_ENV}) gives an empty bearer token")
        if not is_loopback(self.host) and self.token is None:
            raise self.fail(
                "host",
                f"{self.host} exposes the worker beyond this machine, so it needs a bearer token: "
                f"pass --token-file PATH or set {TOKEN_ENV} (or bind 127.0.0.1)",
            )

    @classmethod
    def _refused(cls, error: DocumentError) -> Exception:
        flag = "--" + (error.field or "settings").removesuffix("_s").replace("_", "-")
        return SettingsError(f"{flag} {error.problem}")

    @property
    def part_pixels(self) -> int:
        """Output pixels of one batch held at once: a larger batch is read, upscaled and written in parts."""
        return PART_FRAMES_OF_LARGEST * self.max_output_pixels

    @property
    def device_spec(self) -> str:
        """The runtime's device setting: ``--device``, else ``cuda:<gpu>``, else auto."""
        if self.device is not None:
            return self.device
        if self.gpu is not None:
            return f"cuda:{self.gpu}"
        return "auto"

    def gpu_label(self, device_type: str) -> str | None:
        """How the host names this worker's GPU (its CUDA_VISIBLE_DEVICES entry, or its Vulkan device
        index); None on the CPU."""
        if device_type == "vulkan":
            return str(self.gpu or 0)
        if device_type != "cuda":
            return None
        index = self.gpu or 0
        visible = [
            item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()
        ]
        if index < len(visible):
            return visible[index]
        return str(index)
