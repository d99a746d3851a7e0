"""Atomic files: a reader never sees half a file, and a crash never leaves one under its final name.

Every file esrfarm writes for others to read (manifests, status files, frames, segments, the
output video, downloaded or converted models) is written under a hidden temporary name in its own
directory, flushed to disk, then renamed over the final name with :func:`os.replace` (atomic on
POSIX file systems, NFS included)::

    .<name>.<pid>.<random><suffix>   ->   <name>

:func:`atomic_path` yields that temporary path (for a writer that wants a path, e.g. ffmpeg);
:func:`atomic_write` yields an open binary file; :func:`write_bytes_atomic` writes bytes.
:func:`leftover_temp_files` finds what a killed process left beside a target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_path", "atomic_write", "leftover_temp_files", "temp_path", "write_bytes_atomic"]


def temp_path(target: str | Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden temporary name beside ``target``: ``.<name>.<pid>.<random><suffix>``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def leftover_temp_files(
    target: str | Path, suffix: str = ".tmp", *, dead_writers_only: bool = False
) -> list[Path]:
    """Temporary files of :func:`temp_path` for ``target`` that are on disk (a killed writer's).

    ``dead_writers_only``: only those whose writer (the pid in the name) no longer runs on this host.
    """
    target = Path(target)
    try:
        found = sorted(target.parent.glob(f".{_glob_escape(target.name)}.*{_glob_escape(suffix)}"))
    except OSError:
        return []
    if dead_writers_only:
        found = [path for path in found if not _writer_runs(path.name[len(target.name) + 2 :].split(".")[0])]
    return found


def _writer_runs(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds, fsync what was written there
    and rename it to ``target``; when it raises, delete it. The directory must exist."""
    target = Path(target)
    tmp = temp_path(target, suffix)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync:
        fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_write(
    target: str | Path, *, mode: int = 0o644, fsync: bool = True, suffix: str = ".tmp"
) -> Iterator[BinaryIO]:
    """Yield a new binary file that becomes ``target`` when the block succeeds (see :func:`atomic_path`)."""
    with atomic_path(target, suffix=suffix, fsync=False) as tmp, open(tmp, "xb") as handle:
        yield handle
        handle.flush()
        os.fchmod(handle.fileno(), mode)
        if fsync:
            os.fsync(handle.fileno())
    if fsync:
        fsync_directory(Path(target).parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically. A crash at any point leaves either the old file or the new."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    with atomic_write(path, mode=mode, fsync=fsync) as handle:
        handle.write(data)


def fsync_directory(directory: Path) -> None:
    """Make a rename itself durable. Some file systems refuse to open a directory; that is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
