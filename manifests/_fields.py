"""Typed field access for validating decoded JSON, with errors that name the document and field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import orjson

from manifests.errors import DocumentError, FormatVersionError


def decode(kind: str, data: bytes | str, source: str | Path | None) -> dict[str, Any]:
    """Parse JSON text into an object, or raise :class:`DocumentError` saying why not."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DocumentError(kind, f"is not valid JSON ({exc})", source=source) from None
    if not isinstance(document, dict):
        raise DocumentError(kind, f"must be a JSON object, not {type(document).__name__}", source=source)
    return document


def check_format(kind: str, document: Mapping[str, Any], expected: str, source: str | Path | None) -> None:
    found = document.get("format")
    if found is None:
        raise DocumentError(kind, f"has no 'format' field (expected {expected!r})", source=source)
    if found != expected:
        raise FormatVersionError(kind, found, expected, source=source)


class Fields:
    """One JSON object being validated; every accessor raises :class:`DocumentError` on a bad value."""

    def __init__(self, kind: str, data: Any, *, source: str | Path | None = None, prefix: str = "") -> None:
        self.kind = kind
        self.source = source
        self.prefix = prefix
        if not isinstance(data, Mapping):
            self._fail_at(prefix or None, f"must be a JSON object, not {_type(data)}")
        self.data: Mapping[str, Any] = data

    def fail(self, name: str, problem: str) -> NoReturn:
        self._fail_at(self._path(name), problem)

    def _fail_at(self, field: str | None, problem: str) -> NoReturn:
        raise DocumentError(self.kind, problem, source=self.source, field=field)

    def _path(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def reject_unknown(self, known: set[str]) -> None:
        extra = sorted(set(self.data) - known)
        if extra:
            where = f" in '{self.prefix}'" if self.prefix else ""
            raise DocumentError(
                self.kind, f"has unknown field(s){where}: {', '.join(extra)}", source=self.source
            )

    def _get(self, name: str, optional: bool) -> Any:
        if name not in self.data:
            if optional:
                return None
            self.fail(name, "is missing")
        return self.data[name]

    def string(self, name: str) -> str:
        value = self._get(name, False)
        if not isinstance(value, str) or not value:
            self.fail(name, f"must be a non-empty string, not {_show(value)}")
        return value

    def opt_string(self, name: str) -> str | None:
        value = self._get(name, True)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(name, f"must be a string or null, not {_show(value)}")
        return value

    def integer(self, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
        return self._check_int(name, self._get(name, False), minimum, maximum)

    def opt_integer(self, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self._get(name, True)
        return None if value is None else self._check_int(name, value, minimum, maximum)

    def _check_int(self, name: str, value: Any, minimum: int | None, maximum: int | None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(name, f"must be an integer, not {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be at most {maximum}, not {value}")
        return value

    def opt_number(self, name: str, *, positive: bool = False) -> float | None:
        value = self._get(name, True)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(name, f"must be a finite number or null, not {_show(value)}")
        if positive and value <= 0:
            self.fail(name, f"must be above 0, not {value}")
        return float(value)

    def int_list(self, name: str, *, minimum: int = 0) -> tuple[int, ...]:
        value = self._get(name, False)
        if not isinstance(value, list):
            self.fail(name, f"must be a list of integers, not {_show(value)}")
        for item in value:
            if not isinstance(item, int) or isinstance(item, bool) or item < minimum:
                self.fail(name, f"must hold only integers >= {minimum}, not {_show(item)}")
        return tuple(value)

    def objects(self, name: str) -> list[Fields]:
        value = self._get(name, False)
        if not isinstance(value, list):
            self.fail(name, f"must be a list, not {_show(value)}")
        return [
            Fields(self.kind, item, source=self.source, prefix=f"{self._path(name)}[{i}]")
            for i, item in enumerate(value)
        ]

    def child(self, name: str) -> Fields:
        return Fields(self.kind, self._get(name, False), source=self.source, prefix=self._path(name))


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
