"""The one module that owns the ffmpeg binary: where it is, how it runs, how it fails.

Which binary, first match wins:

1. ``$ESRFARM_FFMPEG`` (an absolute path, or a name looked up on ``PATH``);
2. the static ffmpeg shipped by the ``imageio-ffmpeg`` package (known to carry libx264, libx265,
   libsvtav1, ffv1 and the NVENC encoders);
3. ``ffmpeg`` on ``PATH``.

Every run uses ``-hide_banner -nostats -loglevel error`` so that stderr holds only problems, and a
failure raises :class:`FFmpegError` carrying the command, exit code and stderr tail.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO

from coordinator.errors import FFmpegError, FFmpegNotFoundError

log = logging.getLogger(__name__)

ENV_VAR = "ESRFARM_FFMPEG"
STDERR_TAIL_LINES = 20
BASE_ARGS = ("-hide_banner", "-nostats", "-loglevel", "error")


def find_ffmpeg() -> str:
    """The path of the ffmpeg binary to use (see the module docstring for the order)."""
    override = os.environ.get(ENV_VAR)
    if override:
        found = shutil.which(override)
        if found is None:
            raise FFmpegNotFoundError(f"{ENV_VAR}={override} is not an executable file")
        return found
    try:
        import imageio_ffmpeg

        bundled = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        log.debug("imageio-ffmpeg gives no ffmpeg: %s", exc)
    else:
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    on_path = shutil.which("ffmpeg")
    if on_path is None:
        raise FFmpegNotFoundError("imageio-ffmpeg is not installed and there is no ffmpeg on PATH")
    return on_path


def ffmpeg_command(args: Sequence[str], *, ffmpeg: str | None = None) -> list[str]:
    """The full argument list for one run: binary, quiet logging flags, then ``args``."""
    return [ffmpeg or find_ffmpeg(), *BASE_ARGS, *args]


def stderr_tail(text: str | bytes, lines: int = STDERR_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ffmpeg's stderr."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run_ffmpeg(
    args: Sequence[str],
    *,
    action: str,
    ffmpeg: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run ffmpeg with ``args`` to completion; return its stderr (warnings, if any).

    ``action`` completes the error sentence: "ffmpeg exited with code 1 while <action>: ...".
    Raises :class:`FFmpegError` on a non-zero exit, ``subprocess.TimeoutExpired`` on timeout.
    """
    command = ffmpeg_command(args, ffmpeg=ffmpeg)
    log.debug("running %s", command)
    completed = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    stderr = completed.stderr.decode("utf-8", errors="replace")
    if completed.returncode != 0:
        raise FFmpegError(command, completed.returncode, stderr_tail(stderr), action)
    return stderr


class FFmpegProcess:
    """A running ffmpeg with a pipe on stdin (feeding frames) and/or stdout (reading frames).

    stderr goes to a temporary file, so a chatty ffmpeg can never block on a full pipe. Use as a
    context manager: leaving the block early (an exception) kills ffmpeg. Call :meth:`finish`
    after the last write/read: it closes the pipes, waits, and raises :class:`FFmpegError` if
    ffmpeg failed.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        action: str,
        ffmpeg: str | None = None,
        stdin: bool = False,
        stdout: bool = False,
    ) -> None:
        self.command = ffmpeg_command(args, ffmpeg=ffmpeg)
        self.action = action
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finish/kill)
        log.debug("starting %s", self.command)
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=self._stderr,
        )

    @property
    def stdin(self) -> IO[bytes]:
        assert self._proc.stdin is not None, "started without stdin=True"
        return self._proc.stdin

    @property
    def stdout(self) -> IO[bytes]:
        assert self._proc.stdout is not None, "started without stdout=True"
        return self._proc.stdout

    def stderr_text(self) -> str:
        """Everything ffmpeg wrote to stderr so far."""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", errors="replace")

    def __enter__(self) -> FFmpegProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def running(self) -> bool:
        return self._proc.poll() is None

    def error(self) -> FFmpegError:
        """The error describing how this (finished) ffmpeg failed."""
        return FFmpegError(self.command, self._proc.returncode, stderr_tail(self.stderr_text()), self.action)

    def finish(self, timeout: float | None = None) -> str:
        """Close the pipes, wait for ffmpeg; raise :class:`FFmpegError` if it failed, else
        return its stderr (``-loglevel error``: empty unless something went wrong)."""
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        self._proc.wait(timeout=timeout)
        try:
            if self._proc.returncode != 0:
                raise self.error()
            return self.stderr_text()
        finally:
            self._stderr.close()

    def kill(self) -> None:
        """Stop ffmpeg if it still runs (idempotent)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@functools.cache
def _encoders(ffmpeg: str) -> frozenset[str]:
    listing = subprocess.run(
        [ffmpeg, "-hide_banner", "-encoders"], stdin=subprocess.DEVNULL, capture_output=True, check=False
    ).stdout.decode("utf-8", errors="replace")
    names = set()
    for line in listing.splitlines():
        match = re.match(r"^\s*[VAS][A-Z.]{5}\s+(\S+)", line)
        if match:
            names.add(match.group(1))
    return frozenset(names)


def available_encoders(ffmpeg: str | None = None) -> frozenset[str]:
    """Names of the encoders this ffmpeg binary has (``libx264``, ``ffv1``, ...); cached per binary."""
    return _encoders(ffmpeg or find_ffmpeg())


@functools.cache
def _version(ffmpeg: str) -> str:
    out = subprocess.run(
        [ffmpeg, "-hide_banner", "-version"], stdin=subprocess.DEVNULL, capture_output=True, check=False
    ).stdout.decode("utf-8", errors="replace")
    first = out.splitlines()[0] if out else ""
    match = re.match(r"ffmpeg version (\S+)", first)
    return match.group(1) if match else first


def ffmpeg_version(ffmpeg: str | None = None) -> str:
    """The version string of the ffmpeg binary (``n9.0.2-17-g...``, ``7.1.1``)."""
    return _version(ffmpeg or find_ffmpeg())
