"""Every error the coordinator raises: one tree, so a caller (the CLI, the job service) catches
:class:`CoordinatorError` and shows ``str(error)``, one sentence that names the file, frame, field,
worker or command at fault; the data behind it is kept in attributes for logs and tests::

  CoordinatorError
  ├── SpecError                 a JobSpec / FarmSettings field that cannot work (names the field)
  ├── FleetError                the workers cannot be used
  │   ├── ModelError            --model names no model local workers could load (checked before they start)
  │   ├── WorkerStartError      a local worker (or Ray actor) exited or never listened (its log's tail)
  │   ├── RayClusterError       the Ray cluster of --ray cannot be reached or used
  │   └── NoWorkerError         no worker answers /health with the job's model (each one's reason)
  └── JobError                  the job could not be done (names the batch and frames; job_dir kept)
      ├── WorkersLostError      ... for want of workers (none left, or unusable): worth running again
      └── JobCancelledError     the job was cancelled; its directory is kept, a rerun resumes it

Errors of the media edge (probe, extract, encode, ffmpeg) are :class:`media.errors.MediaError`, a
tree of their own; :data:`EXPECTED_ERRORS` is both trees, what a caller catches to show one sentence.

"""

from __future__ import annotations

from pathlib import Path

from media.errors import MediaError


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""


EXPECTED_ERRORS: tuple[type[Exception], ...] = (CoordinatorError, MediaError)
"""What a caller catches to report a failure as one sentence: the coordinator's errors and the
media edge's."""


class SpecError(CoordinatorError, ValueError):
    """A job spec or farm setting that cannot work. ``field`` is the setting's name (``batch_size``),
    never a CLI flag: the CLI maps its flags onto the fields."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.field} {self.problem}"


class FleetError(CoordinatorError):
    """The workers cannot be used."""


class ModelError(FleetError):
    """The model local workers were to load is unknown, or its file does not exist (the worker
    side's one-line reason, got before any worker starts)."""

    def __init__(self, model: str, reason: str) -> None:
        self.model, self.reason = model, reason
        super().__init__(reason)


class WorkerStartError(FleetError):
    """A local worker (or a Ray worker actor: ``what``) exited or did not get ready; carries the tail
    of its log."""

    def __init__(self, index: int, reason: str, log_tail: str, what: str = "local worker") -> None:
        self.index, self.reason, self.log_tail, self.what = index, reason, log_tail, what
        super().__init__(str(self))

    def __str__(self) -> str:
        tail = f"; its log ends: {self.log_tail}" if self.log_tail else ""
        return f"{self.what} {self.index} {self.reason}{tail}"


class RayClusterError(FleetError):
    """``--ray ADDRESS`` names no Ray cluster this coordinator can use."""

    def __init__(self, address: str, reason: str) -> None:
        self.address, self.reason = address, reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"cannot use the Ray cluster at {self.address!r}: {self.reason}"


class NoWorkerError(FleetError):
    """No worker can take the job; ``problems`` maps each worker's URL to what it answered."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        detail = "; ".join(self.problems.values()) or "none answered"
        return f"no healthy worker to upscale with: {detail}"


class JobError(CoordinatorError):
    """The job could not be done. ``job_dir`` is where its files were kept, if anywhere;
    ``resumable`` says whether the same command takes it up again."""

    def __init__(
        self,
        message: str,
        job_dir: Path | None = None,
        *,
        resumable: bool = True,
        batch_id: int | None = None,
        frames: tuple[int, ...] = (),
        reasons: dict[str, str] | None = None,
    ) -> None:
        self.message, self.job_dir, self.resumable = message, job_dir, resumable
        self.batch_id, self.frames, self.reasons = batch_id, frames, dict(reasons or {})
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.job_dir is None:
            return self.message
        then = "; the same command resumes it" if self.resumable else ""
        return f"{self.message} (its files are kept in {self.job_dir}{then})"

    def kept_in(self, job_dir: Path, *, resumable: bool = True) -> JobError:
        """The same error, saying where the job's files were kept."""
        return type(self)(
            self.message, job_dir, resumable=resumable, batch_id=self.batch_id, frames=self.frames,
            reasons=self.reasons,
        )  # fmt: skip


class WorkersLostError(JobError):
    """The job failed for want of workers: none was left, or they could not be used (a
    :class:`FleetError`). Running it again, once workers are back, may well succeed (the job
    service queues it again); a batch that failed on every worker it was tried on is a plain
    :class:`JobError`."""


class JobCancelledError(JobError):
    """The job was cancelled before it finished; nothing was written under the output's name."""
