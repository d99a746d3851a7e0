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
  ├── JobError                  the job could not be done (names the batch and frames; job_dir kept)
  │   └── JobCancelledError     the job was cancelled; its directory is kept, a rerun resumes it
  └── MediaError                base of everything raised by probe / extract / encode / ffmpeg
      ├── InputError              what the user gave can't be used: missing input, not a video,
      │   │                       no video stream, zero frames, corrupt data
      │   └── OutputPathError     the output path can't be used: same file as the input, exists
      │                           without overwrite, directory missing or not writable
      ├── FramesError             a directory of frames that doesn't make the video: a frame file
      │                           missing, unreadable or of another size (names the frame)
      ├── SegmentError            an encoded segment that can't be joined: missing, damaged, out of
      │                           place, or encoded with other settings (names the segment)
      ├── EncodeSettingsError     impossible encoder settings (unknown codec, crf out of range,
      │                           codec the container can't hold, encoder missing from this ffmpeg)
      ├── FFmpegNotFoundError     no ffmpeg binary (ESRFARM_FFMPEG, imageio-ffmpeg, PATH)
      └── FFmpegError             ffmpeg exited non-zero: command, exit code and stderr tail

``InputError`` and ``OutputPathError`` are what a CLI shows the user as ``error: <str>``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

_ADDRESS = re.compile(r" @ 0x[0-9a-f]+")
_GENERIC = (
    "Error opening output file",
    "Error opening input file",
    "Error applying encoder options",
    "Error while opening encoder",
    "Could not open encoder before EOF",
    "Error sending frames to consumers",
    "Error while filtering",
    "Task finished with error code",
    "Terminating thread with return code",
    "Nothing was written into output file",
    "Conversion failed",
)


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""


class MediaError(CoordinatorError):
    """Base of every error raised by the coordinator's media modules."""


class InputError(MediaError, ValueError):
    """The input video (or, for :class:`OutputPathError`, the output path) can't be used.

    ``path`` is the file at fault; ``reason`` the rest of the sentence.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"input {self.path} {self.reason}"


class OutputPathError(InputError):
    """The output path can't be used (same as the input, exists, unwritable location)."""

    def __str__(self) -> str:
        return f"output {self.path} {self.reason}"


class FramesError(MediaError):
    """A frame directory that doesn't hold the frames an encode needs."""

    def __init__(self, directory: str | Path, reason: str, *, frame: int | None = None) -> None:
        self.directory = str(directory)
        self.reason = reason
        self.frame = frame
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"frame {self.frame} in {self.directory}" if self.frame is not None else self.directory
        return f"{where}: {self.reason}"


class SegmentError(MediaError):
    """A segment that can't be joined: unreadable, incomplete, out of place, or encoded otherwise.

    ``path`` is the segment file, ``number`` its 1-based position in the join, ``reason`` the rest
    of the sentence.
    """

    def __init__(self, path: str | Path, number: int, reason: str) -> None:
        self.path = str(path)
        self.number = number
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"segment {self.number} ({self.path}) {self.reason}"


class EncodeSettingsError(MediaError, ValueError):
    """Encoder settings that can't work (checked before ffmpeg starts)."""


class FFmpegNotFoundError(MediaError):
    """No usable ffmpeg binary was found."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"no usable ffmpeg binary: {self.reason} "
            "(set ESRFARM_FFMPEG=/path/to/ffmpeg or install imageio-ffmpeg)"
        )


class FFmpegError(MediaError):
    """ffmpeg exited with a non-zero status.

    ``command`` is the full argument list, ``returncode`` the exit status (negative: killed by a
    signal), ``stderr_tail`` the last lines ffmpeg wrote to stderr, ``action`` what it was doing.
    ``str()`` is one sentence ending with ffmpeg's last error line; :meth:`details` adds the
    command and the whole tail, for logs.
    """

    def __init__(self, command: Sequence[str], returncode: int, stderr_tail: str, action: str) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.action = action
        super().__init__(str(self))

    @property
    def last_line(self) -> str:
        """ffmpeg's last stderr line that says what went wrong, skipping the generic follow-ups
        ("Error opening output files", "Conversion failed!", ...) and the ``@ 0x...`` addresses."""
        lines = [_ADDRESS.sub("", line).strip() for line in self.stderr_tail.splitlines() if line.strip()]
        specific = [line for line in lines if not any(generic in line for generic in _GENERIC)]
        chosen = specific or lines
        return chosen[-1] if chosen else "no message on stderr"

    def __str__(self) -> str:
        if self.returncode < 0:
            status = f"was killed by signal {-self.returncode}"
        else:
            status = f"exited with code {self.returncode}"
        return f"ffmpeg {status} while {self.action}: {self.last_line}"

    def details(self) -> str:
        """Several lines: the sentence, the command (shell-quoted) and the stderr tail."""
        return f"{self}\ncommand: {shlex.join(self.command)}\nstderr:\n{self.stderr_tail}"


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


class JobCancelledError(JobError):
    """The job was cancelled before it finished; nothing was written under the output's name."""
