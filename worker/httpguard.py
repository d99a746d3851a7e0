"""The HTTP guard as aiohttp middleware, the one both servers install (the worker here, the job
service in ``service/api.py``): the rules of :mod:`manifests.httpguard` applied before any route, a
refusal answered as JSON ``{"error": ...}``. A JSON body that grows past the limit while the route
reads it (aiohttp raises ``HTTPRequestEntityTooLarge`` at the app's ``client_max_size``, which
:func:`guarded_app` sets from the same rules) gets the guard's 413 too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from manifests.httpguard import GuardRules, Refusal, RequestHead, check, too_large

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def refusal_response(refusal: Refusal) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": refusal.message}),
        status=refusal.status,
        content_type="application/json",
        headers=dict(refusal.headers),
    )


def guard_middleware(rules: GuardRules) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        head = RequestHead(
            method=request.method,
            path=request.path,
            headers=request.headers,
            query=request.query,
            content_type=request.content_type,
            content_length=request.content_length,
        )
        refusal = check(rules, head)
        if refusal is not None:
            return refusal_response(refusal)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return refusal_response(too_large(rules.max_body_bytes))

    return guard


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole request body, which must arrive within ``timeout_s`` (``--body-timeout``, both
    servers' flag): 408 otherwise. Its size is the guard's (413 past the app's ``client_max_size``)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        message = f"the request body did not arrive within {timeout_s:g}s (--body-timeout)"
        raise web.HTTPRequestTimeout(
            body=orjson.dumps({"error": message}), content_type="application/json"
        ) from None


def guarded_app(rules: GuardRules, outer: Iterable[Middleware] = ()) -> web.Application:
    """An application behind the guard: ``outer`` middlewares first (outermost), then the guard;
    request bodies read whole are limited to the rules' ``max_body_bytes``."""
    return web.Application(
        middlewares=[*outer, guard_middleware(rules)], client_max_size=rules.max_body_bytes
    )
