"""Errors of the shared-storage protocol.

Every error's ``str`` reads as a sentence and names the file, field or path at fault::

    ProtocolError
    ├── DocumentError           a manifest or status file that is not valid (names the file and field)
    │   └── FormatVersionError  a document of another format or format version
    ├── PathOutsideRootError    a path that resolves (symlinks followed) outside the shared root
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
