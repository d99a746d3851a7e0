"""Every error the job service raises on purpose: one tree, so a caller catches :class:`ServiceError`
and shows ``str(error)``, one sentence::

  ServiceError
  ├── SettingsError             settings the service cannot run with (names the flag)
  ├── ListenError               the service cannot listen where it was told to
  ├── StoreError                the database cannot be used (a newer schema, not a database)
  │   └── StoreUnavailableError     ... now (locked, a full disk): nothing changed, it may work later
  ├── SubmissionError           a submitted field that cannot work (names the field; an HTTP status)
  ├── ModelUnavailableError     no worker runs the model a job asks for (remote workers)
  ├── PreviewError              no preview frame can be made
  ├── RunError                  a job's run ended without its output (the runner's one-line reason)
  │   ├── RetryableError            ... because its workers failed: running it again may work
  │   └── RunCancelledError         ... because it was cancelled (a user, or the service stopping)
  └── ClientError               the service answered a client with an error, or could not be reached

The coordinator's errors (:data:`coordinator.errors.EXPECTED_ERRORS`) stay the coordinator's: the
job runner (``service/runners.py``) turns them into :class:`RunError` at that boundary.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the job service raises on purpose."""


class SettingsError(ServiceError, ValueError):
    """Settings the service cannot run with; the message names the flag."""


class ListenError(ServiceError):
    """The service cannot listen where it was told to."""


class StoreError(ServiceError):
    """The database cannot be used (a newer schema, a file that is not a database)."""


class StoreUnavailableError(StoreError):
    """The database cannot be used now: locked by another process past the lock timeout, a full
    disk, an I/O error. What was asked for did not happen; it may work later."""


class SubmissionError(ServiceError, ValueError):
    """A submitted field that cannot work: ``field`` names it, ``problem`` says why; ``status`` is
    the HTTP status that answers it (400, or 403 for a path outside the allowed roots)."""

    def __init__(self, field: str | None, problem: str, status: int = 400) -> None:
        self.field, self.problem, self.status = field, problem, status
        super().__init__(str(self))

    def __str__(self) -> str:
        return self.problem if self.field is None else f"{self.field}: {self.problem}"


class ModelUnavailableError(ServiceError):
    """No worker runs the model a job asks for (remote workers)."""


class PreviewError(ServiceError):
    """No preview frame can be made (the output or the frame is missing)."""


class RunError(ServiceError):
    """A job's run ended without its output; the message is the one-line reason the job shows."""


class RetryableError(RunError):
    """The run failed because its workers did (lost, could not start): it is queued again, up to
    the scheduler's ``max_attempts`` runs."""


class RunCancelledError(RunError):
    """The run was cancelled: by a user (the job is ``cancelled``) or by the service stopping (it is
    queued again and resumes at the next start)."""


class ClientError(ServiceError):
    """The service answered a client (``esrfarm submit``, ``jobs`` ...) with an error, or could not
    be reached."""
