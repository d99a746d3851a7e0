"""Atomic JSON files: a reader never sees half a file.

A file is written to a temporary name in its own directory, flushed to disk, then renamed over
the final name with :func:`os.replace` (atomic on POSIX file systems, NFS included).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE


def dumps(document: Any) -> bytes:
    """Encode a JSON document the way every esrfarm file is written (indented, trailing newline)."""
    return orjson.dumps(document, option=JSON_OPTIONS)


def write_json_atomic(path: str | Path, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    ``data`` is the encoded document (``Manifest.to_json()``, ``Status.to_json()``, ...). The
    directory must exist. A crash at any point leaves either the old file or the new one.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable. Some file systems refuse to open a directory; that is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
