"""Atomic files: a reader never sees half a file, and a crash never leaves one under its final name.

Every file esrfarm writes for others to read (manifests, status files, frames, segments, the
output video, downloaded or converted models) is written under a hidden temporary name in its own
directory, flushed to disk, then renamed over the final name with :func:`os.replace` (atomic on
POSIX file systems, NFS included)::

    .<name>.<pid>.<random><suffix>   ->   <name>

All of it goes through an open :class:`Directory`: the temporary file is created, renamed and (on
failure) removed by name relative to the directory's descriptor (``openat``, ``renameat``), never
through a path resolved again at each step. Whoever must not be redirected (a worker writing into
a job directory that others can change) opens its directories once, walking from the shared root
one component at a time without following a symbolic link (:meth:`Directory.open_below`); a
directory renamed away or replaced by a symlink afterwards is then never followed. The path-based
functions below open the target's directory as the caller named it and use the same code:

:func:`atomic_write` yields an open binary file; :func:`write_bytes_atomic` writes bytes;
:func:`atomic_path` yields a temporary path (for a writer that wants a path, e.g. ffmpeg);
:func:`leftover_temp_files` finds what a killed process left beside a target.
:meth:`Directory.read_bytes` reads a file the same careful way: never through a symlink, never
blocking on a FIFO or device, never more than a cap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import select
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from manifests.errors import FileTooLargeError, NotRegularFileError, SymlinkRefusedError

__all__ = [
    "Directory",
    "atomic_path",
    "atomic_write",
    "leftover_temp_files",
    "temp_path",
    "write_bytes_atomic",
]

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PIPE_POLL_MS = 100


def _find_syncfs() -> Callable[[int], int] | None:
    """glibc's ``syncfs(fd)`` (Linux), which Python's os module lacks; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _find_syncfs()  # a read from a named pipe looks at its ``cancelled`` callback this often


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


class Directory:
    """An open directory: files in it are created, replaced, read and removed by name, relative to
    its descriptor, so what happens to its path afterwards (a rename, a symlink swapped in) cannot
    redirect them. A context manager; :meth:`close` releases the descriptor."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path  # for messages, and for :meth:`replaced`; never used to open anything

    @classmethod
    def open(cls, path: str | Path, *, follow_symlinks: bool = True) -> Directory:
        """Open the directory ``path`` (its own symlinks followed unless ``follow_symlinks`` is False)."""
        flags = _DIRECTORY_FLAGS | (0 if follow_symlinks else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except NotADirectoryError:
            if not follow_symlinks and os.path.islink(path):
                raise SymlinkRefusedError(path, "is a symbolic link, not a directory") from None
            raise
        return cls(fd, Path(path))

    def open_below(self, relative: str | Path, *, create: bool = False) -> Directory:
        """The directory ``relative`` under this one, opened one component at a time, never following
        a symbolic link (:class:`SymlinkRefusedError`); missing components are made when ``create``."""
        relative = Path(relative)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{relative} is not a path below {self.path}")
        fd, path = os.dup(self._fd), self.path
        try:
            for part in relative.parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                child = self._open_child(fd, path, part)
                os.close(fd)
                fd, path = child, path / part
        except BaseException:
            os.close(fd)
            raise
        return Directory(fd, path)

    @staticmethod
    def _open_child(fd: int, path: Path, name: str) -> int:
        try:
            return os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                raise SymlinkRefusedError(path / name, "is a symbolic link, not a directory") from None
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path / name)) from None

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def replaced(self) -> bool:
        """True when ``path`` no longer names this directory (renamed away, removed, or a symlink now)."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return True
        mine = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    # -- reading ------------------------------------------------------------------------------

    def read_bytes(
        self, name: str, *, max_bytes: int, pipes: bool = False, cancelled: Callable[[], bool] | None = None
    ) -> bytes:
        """The contents of the regular file ``name``: opened without following a symlink and without
        blocking, at most ``max_bytes`` (:class:`FileTooLargeError` beyond). A FIFO, device, socket or
        directory is refused (:class:`NotRegularFileError`) unless ``pipes`` allows a FIFO: it is then
        read to its end, looking at ``cancelled`` every 100 ms (``InterruptedError`` once it says so).
        """
        shown = self.path / name
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SymlinkRefusedError(shown, "is a symbolic link; it is not followed") from None
            raise
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode):
                if info.st_size > max_bytes:
                    raise FileTooLargeError(shown, info.st_size, max_bytes)
                return _read_regular(fd, info.st_size, max_bytes, shown)
            if pipes and stat.S_ISFIFO(info.st_mode):
                return _read_pipe(fd, max_bytes, shown, cancelled)
            raise NotRegularFileError(shown, f"is {_file_kind(info.st_mode)}, not a regular file")
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def atomic_write(
        self, name: str, *, mode: int = 0o644, fsync: bool = True, suffix: str = ".tmp"
    ) -> Iterator[BinaryIO]:
        """Yield a new binary file that becomes ``name`` in this directory when the block succeeds;
        when it raises, the temporary file is removed and ``name`` is untouched."""
        tmp = temp_path(name, suffix).name
        fd = os.open(tmp, _CREATE_FLAGS, mode, dir_fd=self._fd)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                if fsync:
                    os.fsync(handle.fileno())
            os.replace(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self._fd)
            raise
        if fsync:
            self.fsync()

    def write_bytes_atomic(self, name: str, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
        """Write ``data`` to ``name`` atomically (see :meth:`atomic_write`)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        with self.atomic_write(name, mode=mode, fsync=fsync) as handle:
            handle.write(data)

    def unlink(self, name: str) -> None:
        """Remove ``name`` if it is there (a symlink is removed, never followed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fd)

    def fsync(self) -> None:
        """Make renames in this directory durable. Some file systems refuse; that is fine."""
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def sync_file_system(self) -> None:
        """Make everything written to this directory's file system durable, in one call: what a
        writer that skipped ``fsync`` file by file (a batch of frames) does before it reports the
        files as written. ``syncfs(2)`` where the C library has it (Linux), else ``sync()``."""
        if _SYNCFS is None or _SYNCFS(self._fd) != 0:
            os.sync()


def _read_regular(fd: int, size: int, max_bytes: int, shown: Path) -> bytes:
    data = os.read(fd, size + 1)  # one read for the whole file in the usual case
    if len(data) == size and not os.read(fd, 1):
        return data
    chunks, total = [data], len(data)
    if total > max_bytes:
        raise FileTooLargeError(shown, total, max_bytes)
    while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise FileTooLargeError(shown, total, max_bytes)
    return b"".join(chunks)


def _read_pipe(fd: int, max_bytes: int, shown: Path, cancelled: Callable[[], bool] | None) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    total = 0
    while True:
        if cancelled is not None and cancelled():
            raise InterruptedError(errno.EINTR, "reading was cancelled", str(shown))
        if not poller.poll(_PIPE_POLL_MS):
            continue
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise FileTooLargeError(shown, total, max_bytes)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


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
    """Yield a new binary file that becomes ``target`` when the block succeeds (:meth:`Directory.atomic_write`
    in the target's directory, as the caller names it). The directory must exist."""
    target = Path(target)
    with (
        Directory.open(target.parent) as directory,
        directory.atomic_write(target.name, mode=mode, fsync=fsync, suffix=suffix) as handle,
    ):
        yield handle


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically. A crash at any point leaves either the old file or the new."""
    path = Path(path)
    with Directory.open(path.parent) as directory:
        directory.write_bytes_atomic(path.name, data, mode=mode, fsync=fsync)


def fsync_directory(directory: Path) -> None:
    """Make a rename itself durable. Some file systems refuse to open a directory; that is fine."""
    try:
        opened = Directory.open(directory)
    except OSError:
        return
    with opened:
        opened.fsync()
