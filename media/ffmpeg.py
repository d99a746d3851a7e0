"""The one module that owns the ffmpeg binary: where it is, how it runs, how it fails.

Which binary, first match wins:

1. ``$ESRFARM_FFMPEG`` (an absolute path, or a name looked up on ``PATH``);
2. the static ffmpeg shipped by the ``imageio-ffmpeg`` package (known to carry libx264, libx265,
   libsvtav1, ffv1 and the NVENC encoders);
3. ``ffmpeg`` on ``PATH``.

Every run uses ``-hide_banner -nostats -loglevel error`` so that stderr holds only problems, and a
failure raises :class:`FFmpegError` carrying the command, exit code and stderr tail.

Every ffmpeg started here dies with the process that started it (``PR_SET_PDEATHSIG`` on Linux),
so a coordinator killed even by SIGKILL leaves no encoder running; and every one belongs to the
:class:`ProcessGroup` current in its context (:func:`process_group`), so a job that is cancelled
kills its decoders and encoders at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO

from media.cputime import METER, ended_process_cpu
from media.errors import FFmpegError, FFmpegNotFoundError, MediaError

log = logging.getLogger(__name__)

ENV_VAR = "ESRFARM_FFMPEG"
STDERR_TAIL_LINES = 20
BASE_ARGS = ("-hide_banner", "-nostats", "-loglevel", "error")


_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


#: Resolved once here: a forked child must not load libraries (another thread may hold the lock).
_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when the thread that started it dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessGroup:
    """The ffmpeg processes of one job, so that cancelling the job kills them all at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[FFmpegProcess] = set()
        self.killed = False

    def add(self, process: FFmpegProcess) -> None:
        with self._lock:
            killed = self.killed
            if not killed:
                self._running.add(process)
        if killed:
            process.kill()
            raise MediaError(f"ffmpeg was not started for {process.action}: the job is being stopped")

    def discard(self, process: FFmpegProcess) -> None:
        with self._lock:
            self._running.discard(process)

    def kill_all(self) -> int:
        """Kill every ffmpeg of the group, and any started later; returns how many were running."""
        with self._lock:
            self.killed = True
            running = list(self._running)
        for process in running:
            process.kill()
        return len(running)


_GROUP: contextvars.ContextVar[ProcessGroup | None] = contextvars.ContextVar("ffmpeg_group", default=None)


@contextlib.contextmanager
def process_group(group: ProcessGroup) -> Iterator[ProcessGroup]:
    """Every ffmpeg started in this context (and in threads given a copy of it) joins ``group``."""
    token = _GROUP.set(group)
    try:
        yield group
    finally:
        _GROUP.reset(token)


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
        stage: str | None = None,
    ) -> None:
        self.command = ffmpeg_command(args, ffmpeg=ffmpeg)
        self.action = action
        self.stage = stage  # the CPU stage its CPU is counted in (media.cputime), if any
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finish/kill)
        log.debug("starting %s", self.command)
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=self._stderr,
            preexec_fn=die_with_parent if os.name == "posix" else None,
        )
        self._group = _GROUP.get()
        if self._group is not None:
            self._group.add(self)

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
        if self.stage is not None:
            self._count_cpu(timeout)
        self._proc.wait(timeout=timeout)
        if self._group is not None:
            self._group.discard(self)
        try:
            if self._proc.returncode != 0:
                raise self.error()
            return self.stderr_text()
        finally:
            self._stderr.close()

    def _count_cpu(self, timeout: float | None) -> None:
        """Wait for ffmpeg to end without reaping it, and add its CPU to its stage (Linux)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        flags = os.WEXITED | os.WNOWAIT
        while True:
            try:
                ended = os.waitid(os.P_PID, self._proc.pid, flags | (0 if deadline is None else os.WNOHANG))
            except (ChildProcessError, OSError, AttributeError):
                return
            if ended is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                return  # Popen.wait raises the timeout
            time.sleep(0.01)
        seconds = ended_process_cpu(self._proc.pid)
        if seconds is not None and self.stage is not None:
            METER.add(self.stage, seconds)

    def kill(self) -> None:
        """Stop ffmpeg if it still runs (idempotent)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._group is not None:
            self._group.discard(self)
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


@functools.cache
def _encoder_pix_fmts(ffmpeg: str, encoder: str) -> frozenset[str]:
    out = subprocess.run(
        [ffmpeg, "-hide_banner", "-h", f"encoder={encoder}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    ).stdout.decode("utf-8", errors="replace")
    match = re.search(r"Supported pixel formats:([^\n]*)", out)
    return frozenset(match.group(1).split()) if match else frozenset()


def encoder_pix_fmts(encoder: str, ffmpeg: str | None = None) -> frozenset[str]:
    """The pixel formats ``encoder`` of this ffmpeg binary takes (``yuv420p yuv420p10le ...``, as
    ``ffmpeg -h encoder=NAME`` lists them); empty when it lists none. Cached per binary."""
    return _encoder_pix_fmts(ffmpeg or find_ffmpeg(), encoder)


def ffmpeg_version(ffmpeg: str | None = None) -> str:
    """The version string of the ffmpeg binary (``n9.0.2-17-g...``, ``7.1.1``)."""
    return _version(ffmpeg or find_ffmpeg())
