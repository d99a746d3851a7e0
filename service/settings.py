"""The job service's settings: one frozen dataclass, validated once (``esrfarm serve`` builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from manifests.httpguard import is_loopback
from service.errors import SettingsError
from service.store import DEFAULT_LOCK_TIMEOUT_S

DEFAULT_PORT = 8080
DEFAULT_MAX_UPLOAD = 8 << 30


@dataclass(frozen=True)
class ServiceSettings:
    shared_root: Path
    db: Path | None = None  # None: <shared root>/service/jobs.db
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = field(default=None, repr=False)
    input_roots: tuple[Path, ...] = ()  # None given: only uploads can be submitted
    output_dir: Path | None = None  # None: <shared root>/outputs
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_jobs_per_submit: int = 1000
    sse_keepalive_s: float = 15.0
    port_file: Path | None = None  # written with the URL once the service listens
    body_timeout_s: float = 30.0  # a request body may stall this long (no byte arriving): then 408
    db_lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S  # a database call waits this for another's lock

    def __post_init__(self) -> None:
        object.__setattr__(self, "shared_root", Path(self.shared_root).resolve())
        object.__setattr__(self, "input_roots", tuple(Path(p).resolve() for p in self.input_roots))
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir).resolve())
        if self.token is None and not is_loopback(self.host):
            raise SettingsError(
                f"--host {self.host} is not a loopback address: give --token-file (every /api request "
                "then needs Authorization: Bearer <token>)"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"--port must be 0 to 65535, not {self.port}")
        if not self.body_timeout_s > 0:
            raise SettingsError(f"--body-timeout must be above 0, not {self.body_timeout_s}")
        if not self.db_lock_timeout_s > 0:
            raise SettingsError(f"--db-lock-timeout must be above 0, not {self.db_lock_timeout_s}")
        if self.max_upload_bytes < 1:
            raise SettingsError(f"--max-upload must be above 0, not {self.max_upload_bytes}")

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.shared_root / "service" / "jobs.db"

    @property
    def uploads_dir(self) -> Path:
        return self.shared_root / "service" / "uploads"

    @property
    def outputs(self) -> Path:
        return self.output_dir if self.output_dir is not None else self.shared_root / "outputs"

    @property
    def allowed_input_roots(self) -> tuple[Path, ...]:
        """Where inputs may be: the input roots and the uploads directory."""
        return (*self.input_roots, self.uploads_dir.resolve())
