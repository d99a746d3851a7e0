"""The job service's HTTP API (aiohttp): jobs (upscaling and comparison jobs), a comparison batch's
page, uploads, live events (SSE), workers, health, metrics, and the static page. :func:`create_app`
builds it; :func:`serve` runs it until SIGTERM/SIGINT.

Security: without a token the service must be bound to a loopback address (``ServiceSettings``
refuses anything else). Every ``/api`` route is behind the HTTP guard the workers use too
(:mod:`manifests.httpguard`: loopback ``Host`` without a token, ``Authorization: Bearer <token>``
with one (``/api/events`` also takes ``?token=``: EventSource cannot send headers), no foreign
``Origin`` on a request that changes something, ``application/json`` POSTs but for uploads).
Every input path is confined to the input roots and every output directory to the output
directory, after resolving symlinks; an upload is stored under a generated name, never the
client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import BodyPartReader, ClientConnectionError, web
from aiohttp.http_exceptions import HttpProcessingError

from coordinator.spec import FarmSettings
from manifests.httpguard import GuardRules, shown
from service.comparisons import KIND, batch_page, is_compare
from service.errors import ListenError, PreviewError, SubmissionError
from service.preview import render_preview
from service.scheduler import Scheduler, SchedulerSettings
from service.settings import ServiceSettings
from service.store import JobRow, JobState, Store, StoreUnavailableError
from service.submission import decode_body, forget, prepare
from worker.httpguard import guarded_app, read_body

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", ServiceSettings)
STORE = web.AppKey("store", Store)
SCHEDULER = web.AppKey("scheduler", Scheduler)
CLOSING = web.AppKey("closing", asyncio.Event)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CHUNK = 1 << 20
# Bounds of what a request may hold, checked where it is parsed (a submission's: service/submission.py).
MAX_EVENT_ID = (1 << 63) - 1  # SQLite's largest integer
JOB_ID_MAX = 64  # a longer job id (or prefix) names no job
PART_SUFFIX = ".part"  # an upload being written: .<id>.part, renamed to <id> once whole
STORE_RETRY_AFTER_S = 5  # Retry-After of a 503 while the database is unavailable
MAX_JSON_BODY = 1 << 20  # bytes of a JSON request body (uploads have --max-upload)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def shown_job(record: dict[str, Any]) -> dict[str, Any]:
    """A job's record (:meth:`JobRow.to_json`, an event's data) as the API shows it: with the URLs
    of its output, its preview (a finished upscaling job) and its batch's page (comparison jobs)."""
    base, done, kind = f"/api/jobs/{record['id']}", record["state"] == JobState.DONE, record["kind"]
    return {
        **record,
        "output_url": f"{base}/output" if done else None,
        "preview_url": f"{base}/preview" if done and kind == "upscale" else None,
        "batch_url": _batch_url(record["batch_id"]) if kind == KIND else None,
    }


def _batch_url(batch_id: str) -> str:
    return f"/api/batches/{batch_id}/compare"


def _job_json(row: JobRow) -> dict[str, Any]:
    return shown_job(row.to_json())


# -- jobs --------------------------------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    """Submit a batch (:mod:`service.submission` says what a body may hold and what it makes)."""
    settings, store, scheduler = request.app[SETTINGS], request.app[STORE], request.app[SCHEDULER]
    raw = await read_body(request, settings.body_timeout_s)
    try:
        submission = await prepare(decode_body(raw), settings, scheduler.check_model)
    except SubmissionError as exc:
        return _error(exc.status, str(exc))
    await store.add_jobs(submission.jobs)
    scheduler.wake()
    log.info("batch %s: %d %s job(s) queued", submission.batch_id, len(submission.jobs), submission.kind)
    answer: dict[str, Any] = {"batch_id": submission.batch_id, "jobs": list(map(_job_json, submission.jobs))}
    if submission.kind == KIND:
        answer["batch_url"] = _batch_url(submission.batch_id)
    return _json(answer, 201)


async def batch_compare(request: web.Request) -> web.Response:
    """The comparison page of a batch of comparison jobs (HTML)."""
    batch_id = request.match_info["batch_id"]
    rows = [r for r in await request.app[STORE].jobs() if r.batch_id == batch_id and is_compare(r)]
    if not rows:
        return _error(404, f"no comparison batch {batch_id}")
    rows.sort(key=lambda r: (r.created_at, r.input, r.scale or 0))
    page = await asyncio.to_thread(batch_page, batch_id, rows, lambda r: f"/api/jobs/{r.id}/output")
    return web.Response(text=page, content_type="text/html")


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in set(JobState):
        return _error(400, f"state: must be one of {', '.join(JobState)}, not {state!r}")
    rows = await request.app[STORE].jobs(state)
    return _json(list(map(_job_json, rows)))


async def _job(request: web.Request) -> JobRow:
    """The job named by the route's id: a whole id, or any unique start of one (as git takes
    commits): 404 when none matches, 409 naming the matches when several do."""
    given, store = request.match_info["id"], request.app[STORE]
    if len(given) > JOB_ID_MAX:
        raise _http(web.HTTPNotFound, f"no job {shown(given, 80)}")
    row = await store.get(given)
    if row is not None:
        return row
    matches = await store.with_prefix(given) if given else []
    if not matches:
        raise _http(web.HTTPNotFound, f"no job {given}")
    if len(matches) > 1:
        listed = ", ".join(m.id for m in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise _http(web.HTTPConflict, f"job id {given} is ambiguous: it starts {listed}; give more of it")
    return matches[0]


def _http(kind: type[web.HTTPError], message: str) -> web.HTTPError:
    return kind(body=orjson.dumps({"error": message}), content_type="application/json")


async def get_job(request: web.Request) -> web.Response:
    return _json(_job_json(await _job(request)))


async def cancel_job(request: web.Request) -> web.Response:
    row = await _job(request)
    if row.job_state.finished:
        return _error(409, f"job {row.id} is {row.state}: only a queued or running job can be cancelled")
    cancelled = await request.app[SCHEDULER].cancel(row.id)
    current = cancelled or await _job(request)
    if current.job_state.finished and current.state != JobState.CANCELLED:  # it ended first
        return _error(409, f"job {row.id} is {current.state}: it ended before it could be cancelled")
    return _json(_job_json(current))


async def retry_job(request: web.Request) -> web.Response:
    row = await _job(request)
    queued = await request.app[SCHEDULER].retry(row.id)
    if queued is None:
        return _error(409, f"job {row.id} is {row.state}: only a failed or cancelled job can be retried")
    return _json(_job_json(queued))


async def delete_job(request: web.Request) -> web.Response:
    """Forget a finished job (its output file stays; a failed or cancelled job's kept frames go)."""
    settings, store = request.app[SETTINGS], request.app[STORE]
    row = await _job(request)
    if not row.job_state.finished or request.app[SCHEDULER].is_running(row.id):
        return _error(409, f"job {row.id} is {row.state}: only a finished job can be deleted")
    await forget(row, store, settings)
    return _json({"deleted": row.id})


async def job_output(request: web.Request) -> web.StreamResponse:
    row = await _job(request)
    path = Path(row.output)
    if row.state != JobState.DONE or not await asyncio.to_thread(path.is_file):
        return _error(404, f"job {row.id} has no output ({row.state})")
    disposition = "inline" if is_compare(row) else "attachment"  # a report opens in the browser
    return web.FileResponse(path, headers={"Content-Disposition": f'{disposition}; filename="{path.name}"'})


async def job_preview(request: web.Request) -> web.Response:
    row = await _job(request)
    if is_compare(row):
        return _error(404, f"job {row.id} is a comparison: its report is its preview")
    if row.state != JobState.DONE:
        return _error(409, f"job {row.id} is {row.state}: a preview needs its output")
    raw = request.query.get("frame", "1")
    try:
        frame = int(raw)
    except ValueError:
        return _error(400, f"frame: must be a frame number, not {raw!r}")
    if not 1 <= frame <= max(row.frames_total, 1):
        return _error(400, f"frame: must be 1 to {row.frames_total}, not {frame}")
    try:
        png = await asyncio.to_thread(render_preview, Path(row.input), Path(row.output), frame)
    except PreviewError as exc:
        return _error(404, str(exc))
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "max-age=3600"})


# -- uploads -----------------------------------------------------------------------------------------


async def upload(request: web.Request) -> web.Response:
    """The body (raw, or the first file of a multipart form) streamed to a generated name. A body
    that stalls for ``--body-timeout`` is dropped (408); nothing of a failed upload stays."""
    settings = request.app[SETTINGS]
    limit = settings.max_upload_bytes
    too_large = _error(413, f"the upload is too large: at most {limit} bytes (--max-upload)")
    if request.content_length is not None and request.content_length > limit:
        return too_large
    upload_id = secrets.token_hex(16)
    directory = settings.uploads_dir
    part = directory / f".{upload_id}{PART_SUFFIX}"
    timeout = settings.body_timeout_s

    async def within(step: Callable[[], Awaitable[T]]) -> T:
        async with asyncio.timeout(timeout):
            return await step()

    written = 0
    try:
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            field = await within(reader.next)
            while field is not None and (not isinstance(field, BodyPartReader) or not field.filename):
                field = await within(reader.next)
            if field is None:
                return _error(400, "file: the form holds no file")
            read: Callable[[], Awaitable[bytes]] = lambda: field.read_chunk(CHUNK)  # noqa: E731
        else:
            read = lambda: request.content.read(CHUNK)  # noqa: E731
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        handle = await asyncio.to_thread(part.open, "wb")
        try:
            while chunk := await within(read):
                written += len(chunk)
                if written > limit:
                    return too_large
                await asyncio.to_thread(handle.write, chunk)
        finally:
            await asyncio.to_thread(handle.close)
        if not written:
            return _error(400, "file: the upload is empty")
        await asyncio.to_thread(os.replace, part, directory / upload_id)
    except TimeoutError:  # before OSError: it is one
        log.warning("upload %s dropped: no data for %g s (%d bytes in)", upload_id, timeout, written)
        return _error(408, f"the upload stalled: no data for {timeout:g} s (--body-timeout)")
    except HttpProcessingError as exc:  # a part's headers too long, a broken form
        return _error(400, f"file: the form cannot be read: {shown(exc.message, 120)}")
    except (ConnectionError, ClientConnectionError):  # the client went away: nobody to answer
        log.info("upload %s: the client went away after %d bytes", upload_id, written)
        return _error(400, "the upload was interrupted")
    except OSError as exc:
        return _error(507, f"cannot store the upload: {exc.strerror or exc}")
    finally:
        await asyncio.to_thread(part.unlink, True)
    log.info("upload %s: %d bytes", upload_id, written)
    return _json({"upload": upload_id, "bytes": written}, 201)


def remove_partial_uploads(settings: ServiceSettings) -> list[Path]:
    """The ``.part`` files of uploads a killed service left (at start, before any upload)."""
    removed = []
    if settings.uploads_dir.is_dir():
        for path in settings.uploads_dir.glob(f".*{PART_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# -- events ------------------------------------------------------------------------------------------


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``id:`` the store's event id, ``event: job``, ``data:`` the job's JSON.
    ``Last-Event-ID`` (or ``?since=ID``) replays what is still stored after that id; without either
    the stream starts with what happens next."""
    store, settings, closing = request.app[STORE], request.app[SETTINGS], request.app[CLOSING]
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    if raw is not None:
        try:
            last = int(raw)
        except ValueError:
            last = -1
        if not 0 <= last <= MAX_EVENT_ID:
            return _error(
                400, f"Last-Event-ID / since: must be an event id (0 to {MAX_EVENT_ID}), not {shown(raw)}"
            )
    else:
        last = await store.last_event_id()
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    try:
        while not closing.is_set():
            new = store.next_event()
            batch = await store.events_after(last)
            for event_id, data in batch:
                shown_data = orjson.dumps(shown_job(orjson.loads(data)))
                await response.write(b"id: %d\nevent: job\ndata: %s\n\n" % (event_id, shown_data))
                last = event_id
            if batch:
                continue
            wait_new = asyncio.ensure_future(new.wait())
            wait_closing = asyncio.ensure_future(closing.wait())
            done, pending = await asyncio.wait(
                {wait_new, wait_closing},
                timeout=settings.sse_keepalive_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if not done:
                await response.write(b": keep-alive\n\n")
    except (ConnectionResetError, ConnectionError):
        pass
    return response


# -- the farm and the service ------------------------------------------------------------------------


async def workers(request: web.Request) -> web.Response:
    return _json(await request.app[SCHEDULER].workers())


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return _json({"ok": True, "jobs": await store.counts(), "last_event_id": await store.last_event_id()})


async def metrics(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    scheduler.metrics.set_counts(await request.app[STORE].counts())
    return web.Response(
        body=scheduler.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return _error(404, "the page is not installed (service/static/index.html)")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


# -- middlewares -------------------------------------------------------------------------------------


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except HttpProcessingError as exc:  # a request aiohttp could not parse (read by the handler)
        return _error(exc.code or 400, f"the request cannot be read: {shown(exc.message, 120)}")
    except StoreUnavailableError as exc:  # nothing was changed; it may work in a moment
        log.warning("%s %s: %s", request.method, request.path, exc)
        response = _error(503, f"{exc}; try again")
        response.headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
        return response
    except Exception as exc:  # a defect: still a JSON answer
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}")


def guard_rules(settings: ServiceSettings) -> GuardRules:
    """The service's use of the HTTP guard the workers use too (:mod:`manifests.httpguard`): every
    ``/api`` path; ``/api/events`` takes ``?token=``, ``/api/uploads`` a raw body (its own limit)."""
    return GuardRules(
        server="service",
        token=settings.token,
        max_body_bytes=MAX_JSON_BODY,
        guarded_prefix="/api/",
        query_token_paths=frozenset({"/api/events"}),
        raw_body_paths=frozenset({"/api/uploads"}),
    )


# -- the app -----------------------------------------------------------------------------------------


def create_app(
    settings: ServiceSettings, farm: FarmSettings, scheduling: SchedulerSettings | None = None
) -> web.Application:
    app = guarded_app(guard_rules(settings), outer=[_errors_as_json])
    app[SETTINGS] = settings
    store = Store(settings.db_path, lock_timeout_s=settings.db_lock_timeout_s)
    app[STORE] = store
    app[SCHEDULER] = Scheduler(store, farm, scheduling or SchedulerSettings())
    app[CLOSING] = asyncio.Event()
    r = app.router
    r.add_post("/api/jobs", submit)
    r.add_get("/api/jobs", list_jobs)
    r.add_get("/api/jobs/{id}", get_job)
    r.add_post("/api/jobs/{id}/cancel", cancel_job)
    r.add_post("/api/jobs/{id}/retry", retry_job)
    r.add_delete("/api/jobs/{id}", delete_job)
    r.add_get("/api/jobs/{id}/output", job_output)
    r.add_get("/api/jobs/{id}/preview", job_preview)
    r.add_get("/api/batches/{batch_id}/compare", batch_compare)
    r.add_post("/api/uploads", upload)
    r.add_get("/api/events", events)
    r.add_get("/api/workers", workers)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/", index)
    STATIC_DIR.mkdir(exist_ok=True)
    r.add_static("/static/", STATIC_DIR)
    app.cleanup_ctx.append(_lifetime)
    app.on_shutdown.append(_stop_streams)
    return app


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    try:
        await app[STORE].open()
    except BaseException:
        await app[STORE].close()
        raise
    removed = await asyncio.to_thread(remove_partial_uploads, app[SETTINGS])
    if removed:
        log.info("removed %d partial upload(s) an earlier run left", len(removed))
    await app[SCHEDULER].start()
    try:
        yield
    finally:
        await app[SCHEDULER].close()
        await app[STORE].close()


async def _stop_streams(app: web.Application) -> None:
    app[CLOSING].set()


async def serve(
    settings: ServiceSettings,
    farm: FarmSettings,
    scheduling: SchedulerSettings,
    announce: Callable[[str], None] = log.info,
) -> None:
    """Run the service until SIGTERM or SIGINT; running jobs are then cancelled and stay queued.
    ``announce`` is told where it listens, and that it stopped. Raises :class:`StoreError` when the
    database cannot be used, :class:`ListenError` when the address cannot be bound."""
    app = create_app(settings, farm, scheduling)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:  # the address is taken, say
            raise ListenError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else settings.port
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        url = f"http://{host}:{port}"
        announce(f"listening on {url} (shared root {settings.shared_root}, jobs in {settings.db_path})")
        if settings.port_file is not None:
            settings.port_file.write_bytes(orjson.dumps({"url": url, "pid": os.getpid()}))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: running jobs are cancelled and stay queued")
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    announce("stopped (jobs that were running stay queued and resume at the next start)")
