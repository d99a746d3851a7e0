"""Errors of the shared-storage protocol.

Every error's ``str`` reads as a sentence and names the file, field or path at fault::

    ProtocolError
    ├── DocumentError           a manifest or status file that is not valid (names the file and field)
    │   └── FormatVersionError  a document of another format or format version
    ├── PathOutsideRootError    a path that resolves (symlinks followed) outside the shared root
    ├── UnsafeFileError         a file esrfarm will not open as asked (names the file and why)
    │   ├── SymlinkRefusedError a symbolic link where a directory or file opened without following one is
    │   ├── NotRegularFileError a FIFO, device, socket or directory where a regular file is wanted
    │   └── FileTooLargeError   a file above the size cap of what it should be
    ├── FrameFileError          a frame file that is not a frame (names the frame and the reason)
    │   └── FrameTooLargeError  a frame with more pixels than the reader allows
    └── PlanningError           impossible planning arguments (no workers, batch size 0, ...)
"""

from __future__ import annotations

from pathlib import Path


class ProtocolError(Exception):
    """Base of every error raised by :mod:`manifests`."""


class DocumentError(ProtocolError, ValueError):
    """A manifest or status document is malformed or fails validation."""

    def __init__(
        self, kind: str, problem: str, *, source: str | Path | None = None, field: str | None = None
    ):
        self.kind = kind
        self.problem = problem
        self.source = str(source) if source is not None else None
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.kind} {self.source}" if self.source else self.kind
        if self.field:
            return f"{where}: field '{self.field}' {self.problem}"
        return f"{where}: {self.problem}"


class FormatVersionError(DocumentError):
    """A document whose ``format`` is not the one this version of esrfarm reads."""

    def __init__(self, kind: str, found: object, expected: str, *, source: str | Path | None = None):
        self.found = found
        self.expected = expected
        super().__init__(
            kind,
            f"has format {found!r}, but this esrfarm reads only {expected!r}",
            source=source,
        )

    def __str__(self) -> str:
        where = f"{self.kind} {self.source}" if self.source else self.kind
        return f"{where} {self.problem}"


class PathOutsideRootError(ProtocolError):
    """A path that resolves outside the shared root (after following symlinks)."""

    def __init__(self, path: str | Path, root: str | Path, resolved: str | Path):
        self.path = str(path)
        self.root = str(root)
        self.resolved = str(resolved)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"path {self.path} resolves to {self.resolved}, which is outside the shared root {self.root}"


class PlanningError(ProtocolError, ValueError):
    """Batch planning was asked for something impossible."""


class UnsafeFileError(ProtocolError):
    """A file or directory that esrfarm will not open as asked; ``problem`` says why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


class SymlinkRefusedError(UnsafeFileError):
    """A symbolic link (or something swapped in) where esrfarm opens without following one."""


class NotRegularFileError(UnsafeFileError):
    """A FIFO, device, socket or directory where a regular file is wanted."""


class FileTooLargeError(UnsafeFileError):
    """A file larger than the cap set for what it should hold."""

    def __init__(self, path: str | Path, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(path, f"is {_bytes(size)}, more than the {_bytes(limit)} allowed")


class FrameFileError(ProtocolError, ValueError):
    """A frame file whose bytes are not a frame of its format; ``reason`` says what is wrong."""

    def __init__(self, name: str, frame_format: str, reason: str) -> None:
        self.name = name
        self.frame_format = frame_format
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"frame {self.name} is not a valid {self.frame_format} image: {self.reason}"


class FrameTooLargeError(FrameFileError):
    """A frame with more pixels than the reader was told to allow (checked before it is decoded)."""

    def __init__(self, name: str, frame_format: str, width: int, height: int, max_pixels: int) -> None:
        self.width = width
        self.height = height
        self.max_pixels = max_pixels
        super().__init__(
            name,
            frame_format,
            f"it is {width}x{height} ({width * height} pixels), more than the {max_pixels} allowed",
        )

    def __str__(self) -> str:
        return (
            f"frame {self.name} is {self.width}x{self.height}, more than the {self.max_pixels} pixels allowed"
        )


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"
