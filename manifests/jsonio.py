"""JSON documents as every esrfarm file is written: indented, a trailing newline, replaced atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from manifests.atomic import write_bytes_atomic

JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE


def dumps(document: Any) -> bytes:
    """Encode a JSON document the way every esrfarm file is written (indented, trailing newline)."""
    return orjson.dumps(document, option=JSON_OPTIONS)


def write_json_atomic(path: str | Path, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Write the encoded document ``data`` (``Manifest.to_json()``, ...) to ``path`` atomically
    (:func:`manifests.atomic.write_bytes_atomic`). The directory must exist."""
    write_bytes_atomic(path, data, mode=mode, fsync=fsync)
