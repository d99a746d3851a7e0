"""Worker settings: one frozen dataclass built from CLI flags and the environment, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from manifests.httpguard import is_loopback
from manifests.manifest import BACKENDS, MAX_TILE, MAX_TILE_PAD
from manifests.tokens import TOKEN_ENV

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192  # 67 Mpx: 8K output of 2K input at x4, or of 4K input at x2
PART_FRAMES_OF_LARGEST = 4  # a batch is handled in parts of at most 4 frames of the largest size


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which flag to change."""


@dataclass(frozen=True)
class WorkerSettings:
    shared_root: Path
    model: str
    backend: str = (
        "torch"  # "torch" (worker/runtime.py: CUDA or the CPU) | "ncnn" (worker/ncnn_runtime.py: Vulkan)
    )
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port (the bound port is printed and written to port_file)
    gpu: int | None = None  # torch: index among the visible CUDA devices (None: the first, else the CPU);
    # ncnn: the Vulkan device index (None: 0)
    device: str | None = None  # "cpu" | "cuda" | "cuda:N" | "auto"; overrides gpu
    precision: str | None = None
    scale: float | None = None
    tile: int = 0
    tile_pad: int = 10
    max_batch: int | None = None
    cpu_threads: int | None = None
    allow_download: bool = True
    worker_id: str | None = None  # default "<hostname>:<port>"
    token: str | None = field(default=None, repr=False)
    port_file: Path | None = None
    warmup: bool = True
    warmup_size: int = 64  # edge of the square warm-up frame, in pixels
    max_request_bytes: int = 64 * 1024  # request bodies larger than this get 413
    max_manifest_bytes: int = 8 << 20  # a larger manifest file is refused (400) without being read
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS  # per upscaled frame; a larger one fails its batch
    pixel_budget: int | None = None  # input pixels per forward pass; None: the runtime's device default
    max_connections: int = 256  # open connections at most (fewer if the descriptor limit is lower)
    header_timeout_s: float = 30.0  # to send whole request headers, from connecting or the last answer
    body_timeout_s: float = 10.0  # to send a request body once its headers are in
    io_threads: int = 4  # threads reading or writing the frames of one batch
    fsync_frames: bool = True  # fsync each output frame before its batch is claimed as done
    shutdown_timeout_s: float = 90.0  # on SIGTERM, how long the current batch may take to finish
    reset_timeout_s: float = 60.0  # how long POST /reset waits for the batch in flight
    storage_probe_interval_s: float = 2.0  # while the shared root is not writable, how often to try again
    simulate_latency_ms: float | None = None  # benchmarks only: no model, a fixed latency per frame

    def __post_init__(self) -> None:
        if not self.shared_root.is_dir():
            raise SettingsError(f"shared root {self.shared_root} is not a directory")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be between 0 and 65535, not {self.port}")
        if self.gpu is not None and self.gpu < 0:
            raise SettingsError(f"--gpu must be 0 or more, not {self.gpu}")
        if self.backend not in BACKENDS:
            raise SettingsError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "ncnn":
            if self.device is not None:
                raise SettingsError("--device is for the torch backend; pick the Vulkan device with --gpu N")
            if self.precision == "bf16":
                raise SettingsError("the ncnn backend runs fp16 or fp32, not bf16")
        if self.gpu is not None and self.device is not None:
            raise SettingsError(f"give either --gpu {self.gpu} or --device {self.device}, not both")
        if self.token is not None and not self.token.strip():
            raise SettingsError("the bearer token is empty")
        if not is_loopback(self.host) and self.token is None:
            raise SettingsError(
                f"binding {self.host} exposes the worker beyond this machine, so it needs a bearer token: "
                f"pass --token-file PATH or set {TOKEN_ENV} (or bind 127.0.0.1)"
            )
        for name in (
            "warmup_size", "max_request_bytes", "io_threads", "max_manifest_bytes", "max_output_pixels",
            "max_connections",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.pixel_budget is not None and self.pixel_budget < 1:
            raise SettingsError(f"--pixel-budget must be at least 1 pixel, not {self.pixel_budget}")
        if not 0 <= self.tile <= MAX_TILE:
            raise SettingsError(f"--tile must be between 0 and {MAX_TILE}, not {self.tile}")
        if not 0 <= self.tile_pad <= MAX_TILE_PAD:
            raise SettingsError(f"--tile-pad must be between 0 and {MAX_TILE_PAD}, not {self.tile_pad}")
        if self.simulate_latency_ms is not None and self.simulate_latency_ms < 0:
            raise SettingsError(f"--simulate-latency-ms must be 0 or more, not {self.simulate_latency_ms}")
        for name in (
            "shutdown_timeout_s", "reset_timeout_s", "header_timeout_s", "body_timeout_s",
            "storage_probe_interval_s",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be above 0, not {getattr(self, name)}")

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
