"""The source video on the shared root, for the segment transport: its workers decode it there.

:func:`share_source` puts the job's input at ``<job_dir>/input/source<ext>``: a hard link when the
input is on the shared root's file system (no byte is copied), else a copy written under a
temporary name and renamed when whole (with its modification time, so that a later run recognises
it). A run that finds the file there with the input's size and modification time reuses it.
Blocking: call it in a thread.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from manifests.atomic import atomic_write
from manifests.layout import JobLayout

log = logging.getLogger(__name__)

SOURCE_STEM = "source"
_COPY_BLOCK = 8 << 20
_LINK_REFUSED = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


def shared_source_path(layout: JobLayout, source: Path) -> Path:
    """Where the job's workers read the source: ``input/source<ext>`` (the extension kept, lower case)."""
    return layout.input_dir / f"{SOURCE_STEM}{source.suffix.lower()}"


def _same_file_data(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def share_source(
    source: Path, layout: JobLayout, on_progress: Callable[[int, int], None] | None = None
) -> Path:
    """Put ``source`` at :func:`shared_source_path` (a hard link, else a copy) and return that path;
    a file already there with the source's size and modification time is kept. ``on_progress``
    (bytes copied, bytes in all) is called as a copy goes."""
    target = shared_source_path(layout, source)
    wanted = source.stat()
    try:
        found = target.stat()
    except FileNotFoundError:
        found = None
    if found is not None:
        if _same_file_data(found, wanted):
            log.info("the source is on the shared root already (%s)", target)
            return target
        log.info("%s is not the source any more: it is shared again", target)
        target.unlink()
    try:
        os.link(source, target)
        log.info("source hard-linked into the shared root: %s", target)
        return target
    except OSError as exc:
        if exc.errno not in _LINK_REFUSED:
            raise
    _copy(source, target, wanted, on_progress)
    return target


def _copy(
    source: Path, target: Path, wanted: os.stat_result, on_progress: Callable[[int, int], None] | None
) -> None:
    total = wanted.st_size
    started = time.monotonic()
    log.info("copying the source (%.1f MB) to the shared root: %s", total / 1e6, target)
    copied = 0
    next_log = 0.1
    with open(source, "rb") as reader, atomic_write(target) as writer:
        while block := reader.read(_COPY_BLOCK):
            writer.write(block)
            copied += len(block)
            if on_progress is not None:
                on_progress(copied, total)
            if total and copied / total >= next_log and copied < total:
                log.info("copied %d%% of the source", 100 * copied // total)
                next_log += 0.1
    # The source's modification time, so that a later run finds the copy whole (a run killed
    # before this line copies it again).
    os.utime(target, ns=(wanted.st_atime_ns, wanted.st_mtime_ns))
    log.info("copied the source in %.1f s", time.monotonic() - started)
