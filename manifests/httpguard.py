"""The rules of the HTTP guard both servers (the worker and the job service) apply before any route:
``Host``, bearer token, ``Origin``, content type and body size. Pure: a request's head in, a
:class:`Refusal` (status, message, headers) or None out. ``worker/httpguard.py`` turns them into the
aiohttp middleware both servers install; each server only declares its :class:`GuardRules` (which
paths are public, which take ``?token=``, which take a raw body, its token and body limit).

The rules, in the order they are checked, for every path that is not public:

1. Without a token, ``Host`` must name a loopback address: ``localhost``, a name under
   ``.localhost`` (both reserved for loopback by RFC 6761) or a loopback IP address, with any port
   (403: a web page reaching the server by DNS rebinding sends its own name). A trailing dot
   (``localhost.``) or a name only ``/etc/hosts`` makes loopback (``localhost.localdomain``) is not
   one: resolvers may ask DNS about those.
2. With a token, ``Authorization: Bearer <token>`` (compared in constant time; 401 with
   ``WWW-Authenticate`` otherwise); on a path that takes ``?token=`` (EventSource cannot send
   headers) the query's token counts as the header.
3. A method that changes something (anything but GET, HEAD, OPTIONS) refuses an ``Origin`` other
   than the server's own, ``http(s)://<Host>`` (403: cross-site). A request without ``Origin`` (not
   from a browser) passes.
4. A POST, PUT or PATCH takes ``Content-Type: application/json`` (415): a cross-site form cannot send
   that without a preflight, which neither server grants. Raw-body paths (uploads) are exempt.
5. A JSON body declared larger than the server's limit is refused before it is read (413); one that
   grows past it while read (chunked) gets the same answer (:func:`too_large`).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_TYPE = "application/json"
SHOWN_LIMIT = 200  # characters of a client's value quoted in a refusal


@dataclass(frozen=True)
class Refusal:
    """What the server answers instead of the route: JSON ``{"error": message}`` with ``status``."""

    status: int
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GuardRules:
    """One server's use of the guard: who it is (named in refusals), its token, its JSON body limit,
    and which of its paths are public (no checks), take ``?token=``, or take a raw body."""

    server: str  # "worker" or "service"
    token: str | None
    max_body_bytes: int
    guarded_prefix: str = "/"  # paths outside it are public
    public_paths: frozenset[str] = frozenset()
    query_token_paths: frozenset[str] = frozenset()
    raw_body_paths: frozenset[str] = frozenset()

    def guards(self, path: str) -> bool:
        return path.startswith(self.guarded_prefix) and path not in self.public_paths


@dataclass(frozen=True)
class RequestHead:
    """What the guard reads of a request: nothing of its body but the declared length."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    content_type: str
    content_length: int | None


def host_name(host: str) -> str:
    """The name part of a ``Host`` value, lower case: ``[::1]:8090`` -> ``::1``, ``A.b:80`` -> ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, _ = host[1:].partition("]")
        return name if bracket else host
    name, colon, port = host.rpartition(":")
    return name if colon and ":" not in name and port.isdigit() else host


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address, without port or brackets) is this machine's loopback:
    ``localhost``, a name under ``.localhost``, or a loopback address. Used for the bind address of
    a server without a token and for the ``Host`` such a server accepts."""
    name = host.lower()
    if name == "localhost" or (name.endswith(".localhost") and not name.startswith(".")):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """A client's value as a refusal quotes it: repr (control characters escaped), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def too_large(limit: int) -> Refusal:
    return Refusal(413, f"the request body is too large: at most {limit} bytes")


def unauthorized() -> Refusal:
    return Refusal(401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="esrfarm"'})


def check(rules: GuardRules, request: RequestHead) -> Refusal | None:
    """The refusal the guard answers ``request`` with, or None when the route may have it."""
    if not rules.guards(request.path):
        return None
    host = request.headers.get("Host", "")
    if rules.token is None and not is_loopback(host_name(host)):
        return Refusal(
            403,
            f"Host {shown(host)} is not this {rules.server}'s: without a token it answers only to a "
            "loopback name or address (localhost, 127.0.0.1, [::1])",
        )
    if rules.token is not None and not _token_given(rules, request):
        return unauthorized()
    if request.method not in SAFE_METHODS:
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{host}".lower(), f"https://{host}".lower()}:
            return Refusal(403, f"requests from Origin {shown(origin)} are refused (cross-site)")
    raw_body = request.path in rules.raw_body_paths
    if request.method in BODY_METHODS and not raw_body and request.content_type != JSON_TYPE:
        given = shown(request.content_type)
        return Refusal(415, f"{request.method} {request.path} takes Content-Type: {JSON_TYPE}, not {given}")
    if not raw_body and request.content_length is not None and request.content_length > rules.max_body_bytes:
        return too_large(rules.max_body_bytes)
    return None


def _token_given(rules: GuardRules, request: RequestHead) -> bool:
    assert rules.token is not None
    expected = f"Bearer {rules.token}".encode()
    given = request.headers.get("Authorization", "")
    if request.path in rules.query_token_paths and "token" in request.query:
        given = f"Bearer {request.query['token']}"
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare those bytes, never fail.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)
