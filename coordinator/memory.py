"""Give freed heap memory back to the operating system between segments (glibc ``malloc_trim``).

A long job allocates and frees the same sizes again and again: frame arrays, pipe buffers, and
CPython's table of interned strings, which pathlib fills and empties with every frame file name and
reallocates (about 2 MB with the coordinator's imports) whenever it fills up. Once glibc's dynamic
mmap threshold has risen to such a size, these blocks come from the heap; a few small long-lived
objects allocated above a freed block keep glibc from shrinking the heap, so without trimming the
coordinator's RSS rose in ~2 MB steps over hours (about 10 MB in a 2-hour job) although no Python
object was kept (tracemalloc: traced memory flat). ``malloc_trim(0)`` returns every free page of
every arena; the job calls it after each encoded segment. Where the C library has no
``malloc_trim`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):
        log.debug("no malloc_trim in this C library: freed heap memory is not handed back")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the free pages of the C heap to the OS. False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["release_free_memory"]
