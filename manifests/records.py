"""Protocol records declared once: msgspec Structs whose limits sit beside their fields.

Each record of the protocol (a manifest, a status file, ``job.json``, ...) is one
:class:`Record` subclass: its fields with their types and ``Meta`` limits say what a valid
document holds, and the same declaration validates, encodes and decodes it. Checks that span
fields go in :meth:`Record._check` (raising :class:`DocumentError` naming the field).

A record built in code gets the checks a decoded one gets: outside a decode, ``__post_init__``
round-trips the record through msgspec once, so a limit is never enforced on one path only.

msgspec's :class:`msgspec.ValidationError` (``Expected `int` <= 9 - at `$.tile```) becomes a
:class:`DocumentError` that names the document's kind, the file and the field, and, when it can
be found, the value refused (``manifest m.json: field 'tile' must be at most 9, not 12``).
A :class:`Document` is a top-level file with a ``format`` field, which is checked first.
"""

from __future__ import annotations

import contextvars
import functools
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec
import orjson
from msgspec import Meta

from manifests.errors import DocumentError, FormatVersionError
from manifests.jsonio import dumps

R = TypeVar("R", bound="Record")

#: The limits records share (each record's own sit beside its fields).
Count = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]
NonEmpty = Annotated[str, Meta(min_length=1)]
#: A timeout or an interval: a finite number of seconds above 0.
Seconds = Annotated[float, Meta(gt=0, le=1e9)]

#: True while msgspec decodes (or converts) a record: its limits are being checked by msgspec.
_decoding = contextvars.ContextVar("_decoding", default=False)


class Record(msgspec.Struct, forbid_unknown_fields=True):
    """A protocol record. Subclasses set ``KIND`` (how errors name the document) and may add
    cross-field checks in :meth:`_check`. Fields named in ``OMIT_DEFAULT`` are written only when
    they differ from their default (so a field added later leaves older documents as they were);
    fields in ``HIDDEN`` are left out of ``repr()``.
    Treat instances as immutable: change one with :func:`msgspec.structs.replace`, which checks
    the copy again."""

    KIND: ClassVar[str] = "record"
    OMIT_DEFAULT: ClassVar[frozenset[str]] = frozenset()
    HIDDEN: ClassVar[frozenset[str]] = frozenset()  # fields repr() leaves out (a token)

    def __post_init__(self) -> None:
        try:
            self._check()
            if not _decoding.get():
                check_declared(self)
        except DocumentError as exc:
            if _decoding.get():
                raise  # msgspec adds where the record is; _explain says it
            raise self._refused(exc) from None

    @classmethod
    def _refused(cls, error: DocumentError) -> Exception:
        """The exception a bad record raises (settings records raise their own kind)."""
        return error

    def __repr__(self) -> str:
        shown = (
            f"{name}={'<hidden>' if name in self.HIDDEN and value is not None else repr(value)}"
            for name, value in msgspec.structs.asdict(self).items()
        )
        return f"{type(self).__name__}({', '.join(shown)})"

    def _check(self) -> None:
        """Checks spanning several fields (and normalisation); raise :class:`DocumentError`."""

    def fail(self, field: str, problem: str) -> DocumentError:
        """The error for a bad ``field`` of this record (raise it)."""
        return DocumentError(self.KIND, problem, field=field)

    @classmethod
    def from_json(cls: type[R], data: bytes | str, *, source: str | Path | None = None) -> R:
        """Parse and validate; raises :class:`DocumentError` (or its :class:`FormatVersionError`)."""
        try:
            return decode(cls, data, source=source)
        except DocumentError as exc:
            raise cls._refused(exc) from None

    @classmethod
    def from_dict(cls: type[R], document: Any, *, source: str | Path | None = None) -> R:
        """Validate decoded JSON values (the output of :meth:`to_dict`); raises :class:`DocumentError`."""
        token = _decoding.set(True)
        try:
            return msgspec.convert(document, cls, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            raise cls._refused(_explain(cls, exc, document, source)) from None
        finally:
            _decoding.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples), as the record is written."""
        document: dict[str, Any] = orjson.loads(self.to_json())
        return document

    def to_json(self) -> bytes:
        """The record as every esrfarm file is written (indented, trailing newline)."""
        document: dict[str, Any] = msgspec.to_builtins(self, enc_hook=_enc_hook)
        for name in self.OMIT_DEFAULT:
            if getattr(self, name) == _default(type(self), name):
                del document[name]
        return dumps(document)


class Document(Record, kw_only=True):
    """A record kept as a file of its own: a ``format`` field first, checked before anything else."""

    FORMAT: ClassVar[str] = ""

    format: str = ""

    def __post_init__(self) -> None:
        if not self.format and not _decoding.get():
            self.format = self.FORMAT
        if self.format != self.FORMAT:
            # Decoded from a document without a format or with another one: said in _explain.
            raise self.fail("format", f"has format {self.format!r}, not {self.FORMAT!r}")
        super().__post_init__()


def decode(cls: type[R], data: bytes | str, *, source: str | Path | None = None) -> R:
    """Decode and validate a JSON document of record type ``cls``; raises :class:`DocumentError`
    naming ``source`` and the field at fault."""
    token = _decoding.set(True)
    try:
        return _decoder(cls).decode(data)
    except msgspec.ValidationError as exc:
        raise _explain(cls, exc, _parsed(data), source) from None
    except msgspec.DecodeError as exc:
        raise DocumentError(cls.KIND, f"is not valid JSON ({exc})", source=source) from None
    finally:
        _decoding.reset(token)


def check_declared(record: Record) -> None:
    """Check a record built in code against its declaration (types and ``Meta`` limits)."""
    document = msgspec.to_builtins(record, enc_hook=_enc_hook)
    token = _decoding.set(True)
    try:
        msgspec.convert(document, type(record), dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _explain(type(record), exc, document, None) from None
    finally:
        _decoding.reset(token)


@functools.cache
def _decoder(cls: type[R]) -> msgspec.json.Decoder[R]:
    return msgspec.json.Decoder(cls, dec_hook=_dec_hook)


def _enc_hook(value: Any) -> Any:
    """Values msgspec does not know: a path is written as its string."""
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"{type(value).__name__} is not a JSON value")


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a path, not {_show(value)}")
        return Path(value)
    raise NotImplementedError(f"cannot decode a {kind.__name__}")


def _default(cls: type[Record], name: str) -> Any:
    for field in msgspec.structs.fields(cls):
        if field.name == name:
            return field.default
    raise AttributeError(name)


def _parsed(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>.*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_BOUND = re.compile(r"^Expected `(?P<type>\w+)` (?P<op>>=|>|<=|<) (?P<limit>\S+)$")
_LENGTH = re.compile(r"^Expected `(?P<type>\w+)` of length (?:(?P<op>>=|<=) )?(?P<limit>\d+)$")
_TYPE = re.compile(r"^Expected `(?P<types>[^`]+)`, got `\w+`$")
_PATTERN = re.compile(r"^Expected `str` matching regex '(?P<pattern>.*)'$", re.DOTALL)
_NAMED = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]+)`$")
_OPS = {">=": "at least", ">": "above", "<=": "at most", "<": "below"}
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def _explain(cls: type[Record], exc: msgspec.ValidationError, document: Any, source: Any) -> DocumentError:
    """The :class:`DocumentError` saying what msgspec refused, in the project's words."""
    kind = cls.KIND
    if not isinstance(document, dict):
        found = "null" if document is None else type(document).__name__
        return DocumentError(kind, f"must be a JSON object, not {found}", source=source)
    if issubclass(cls, Document):
        version = document.get("format")
        if version is None:
            return DocumentError(kind, f"has no 'format' field (expected {cls.FORMAT!r})", source=source)
        if version != cls.FORMAT:
            return FormatVersionError(kind, version, cls.FORMAT, source=source)
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    message, at = match["message"], match["path"] or ""
    path = [a or int(i) for a, i in _STEP.findall(at)]
    field = ".".join(str(s) if isinstance(s, str) else f"[{s}]" for s in path).replace(".[", "[")
    cause = exc.__context__
    if isinstance(cause, DocumentError):
        inner = f"{field}.{cause.field}" if field and cause.field else field or cause.field
        return DocumentError(kind, cause.problem, source=source, field=inner or None)
    named = _NAMED.match(message)
    if named and named["what"] == "contains unknown":
        where = f" in '{field}'" if field else ""
        return DocumentError(kind, f"has unknown field(s){where}: {named['name']}", source=source)
    if named:
        return DocumentError(kind, "is missing", source=source, field=_join(field, named["name"]))
    value = _value_at(document, path)
    return DocumentError(kind, _problem(cls, message, path, value), source=source, field=field or None)


def _problem(cls: type[Record], message: str, path: list[str | int], value: Any) -> str:
    if bound := _BOUND.match(message):
        return f"must be {_OPS[bound['op']]} {bound['limit']}, not {_show(value)}"
    if length := _LENGTH.match(message):
        limit, is_text = int(length["limit"]), length["type"] == "str"
        if length["op"] is None:
            return f"must hold {limit} items, not {_show(value)}"
        if length["op"] == ">=":
            return "must not be empty" if limit == 1 else f"must hold at least {limit} items"
        size = len(value) if isinstance(value, str | list) else "more than that"
        if is_text:
            return f"is {size} characters long; at most {limit} are allowed"
        return f"holds {size} items; at most {limit} are allowed"
    if typed := _TYPE.match(message):
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in typed["types"].split(" | "))
        return f"must be {wanted}, not {_show(value)}"
    if pattern := _PATTERN.match(message):
        return f"must match {pattern['pattern']}, not {_show(value)}"
    if message.startswith("Invalid enum value"):
        choices = _choices(cls, path)
        if choices:
            return f"must be one of {', '.join(choices)}, not {_show(value)}"
    if message == "Number out of range":
        return f"must be a finite number, not {_show(value)}"
    return message


def _join(field: str, name: str) -> str:
    return f"{field}.{name}" if field else name


def _value_at(document: Any, path: list[str | int]) -> Any:
    for step in path:
        try:
            document = document[step]
        except (KeyError, IndexError, TypeError):
            return None
    return document


def _choices(cls: type[Record], path: list[str | int]) -> list[str]:
    """The allowed values of the enum or literal field at ``path`` of ``cls``'s declaration."""
    info: Any = msgspec.inspect.type_info(cls)
    for step in path:
        info = _unwrap(info)
        if isinstance(info, msgspec.inspect.StructType) and isinstance(step, str):
            info = next((f.type for f in info.fields if f.encode_name == step), None)
        elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.VarTupleType):
            info = info.item_type
        else:
            return []
    info = _unwrap(info)
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(member.value) for member in info.cls]
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(value) for value in info.values]
    return []


def _unwrap(info: Any) -> Any:
    """The one type of ``X | None`` (anything else unchanged)."""
    if isinstance(info, msgspec.inspect.UnionType):
        kinds = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(kinds) == 1:
            return kinds[0]
    return info


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
