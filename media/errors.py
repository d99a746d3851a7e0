"""Every error the media edge (:mod:`media`: ffmpeg, probe, decode, encode, segments) raises: one
tree, so a caller catches :class:`MediaError` and shows ``str(error)``, one sentence that names the
file, frame, segment or command at fault::

  MediaError                  base of everything raised by probe / extract / encode / ffmpeg
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


class MediaError(Exception):
    """Base of every error raised by the media edge (probe, decode, encode, segments, ffmpeg)."""


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
