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
import errno
import logging
import os
import re
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import BodyPartReader, ClientConnectionError, web
from aiohttp.http_exceptions import HttpProcessingError

from coordinator.errors import EXPECTED_ERRORS, SpecError
from coordinator.spec import DEFAULT_MODEL, FarmSettings, JobSpec
from manifests.httpguard import GuardRules
from manifests.manifest import BACKENDS
from media.encode import EncodeSettings
from service.comparisons import KIND, CompareJobError, batch_page, compare_spec, is_compare
from service.preview import PreviewError, render_preview
from service.scheduler import ModelUnavailableError, Scheduler, SchedulerSettings
from service.settings import ServiceSettings
from service.store import JobRow, JobState, Store, StoreUnavailableError, new_job, now
from worker.httpguard import guarded_app

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", ServiceSettings)
STORE = web.AppKey("store", Store)
SCHEDULER = web.AppKey("scheduler", Scheduler)
CLOSING = web.AppKey("closing", asyncio.Event)

STATIC_DIR = Path(__file__).resolve().parent / "static"
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1 << 20
# Bounds of what a request may hold, checked where it is parsed.
PRIORITY_LIMIT = 1_000_000_000  # a priority is -LIMIT to LIMIT
MAX_EVENT_ID = (1 << 63) - 1  # SQLite's largest integer
PATH_MAX = 4096  # bytes of a path, and of one name in it: Linux's limits
NAME_MAX = 255
OUTPUT_NAME_ROOM = 200  # bytes an output directory leaves for the generated file name
MAX_OUTPUT_DEPTH = 32  # directories an output_dir may nest below the output directory
JOB_ID_MAX = 64  # a longer job id (or prefix) names no job
PART_SUFFIX = ".part"  # an upload being written: .<id>.part, renamed to <id> once whole
STORE_RETRY_AFTER_S = 5  # Retry-After of a 503 while the database is unavailable
MAX_JSON_BODY = 1 << 20  # bytes of a JSON request body (uploads have --max-upload)


class BadRequest(Exception):
    """A request field that cannot work: ``field`` names it, the message says why."""

    def __init__(self, field: str, problem: str, status: int = 400) -> None:
        self.field, self.problem, self.status = field, problem, status
        super().__init__(f"{field}: {problem}")


class ListenError(Exception):
    """The service cannot listen where it was told to."""


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


# -- jobs --------------------------------------------------------------------------------------------


def _confined(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _list_of(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: list[Any]) -> list[Any]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, list) or not value:
        raise BadRequest(name, f"must be a non-empty list, not {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise BadRequest(name, f"must hold only {_kind_name(kind)}, not {item!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return "strings" if kind is str else "numbers"


def _optional_int(body: dict[str, Any], name: str, limit: int = PRIORITY_LIMIT) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"must be a whole number, not {value!r}")
    if not -limit <= value <= limit:
        raise BadRequest(name, f"must be {-limit} to {limit}, not {value}")
    return value


def _checked_path(field: str, raw: object, room: int = 0) -> Path:
    """``raw`` as a path, if it is one the file system can take (``room``: bytes kept for names
    added below it); raises :class:`BadRequest` naming ``field`` otherwise."""
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise BadRequest(field, f"is not a path: {_shown(raw)}")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size + room > PATH_MAX:
        raise BadRequest(field, f"is a path of {size} bytes; the file system takes {PATH_MAX - room} at most")
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in raw.split("/"))
    if longest > NAME_MAX:
        raise BadRequest(field, f"holds a name of {longest} bytes; the file system takes {NAME_MAX} at most")
    return Path(raw)


def _resolved(field: str, path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long once links are followed
        raise BadRequest(
            field, f"{_shown(str(path))} cannot be resolved: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _shown(value: object, limit: int = 200) -> str:
    """A value as an error message shows it: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _inputs(body: dict[str, Any], settings: ServiceSettings) -> list[Path]:
    """The inputs asked for, resolved (symlinks followed) and confined to the input roots."""
    if ("inputs" in body) == ("upload" in body):
        raise BadRequest("inputs", 'give either "inputs" (paths) or "upload" (an upload id)')
    if "upload" in body:
        upload = body["upload"]
        if not isinstance(upload, str) or not UPLOAD_ID.match(upload):
            raise BadRequest("upload", f"is not an upload id: {upload!r}")
        path = settings.uploads_dir / upload
        if not path.is_file():
            raise BadRequest("upload", f"there is no upload {upload}")
        return [path]
    paths = []
    for raw in _list_of(body, "inputs", str, []):
        given = _checked_path("inputs", raw)
        resolved = _resolved("inputs", given)
        if not given.is_absolute() or not _confined(resolved, settings.input_roots):
            roots = ", ".join(map(str, settings.input_roots)) or "none configured (--input-root)"
            raise BadRequest("inputs", f"{raw} is outside every input root ({roots})", 403)
        _checked_path("inputs", str(resolved))  # what the job will open, links followed
        if resolved.is_dir():
            raise BadRequest("inputs", f"{raw} is a directory, not a video file")
        if resolved.exists() and not resolved.is_file():
            raise BadRequest("inputs", f"{raw} is not a regular file")
        paths.append(resolved)  # a missing one fails its job, with the coordinator's reason
    return paths


def _output_dir(body: dict[str, Any], settings: ServiceSettings) -> Path:
    raw = body.get("output_dir")
    if raw is None:
        return settings.outputs
    candidate = _checked_path("output_dir", raw).expanduser()
    if not candidate.is_absolute():
        candidate = _checked_path("output_dir", str(settings.outputs / candidate), OUTPUT_NAME_ROOM)
    resolved = _resolved("output_dir", candidate)
    if not _confined(resolved, (settings.outputs,)):
        raise BadRequest("output_dir", f"{raw} is outside the output directory {settings.outputs}", 403)
    _checked_path("output_dir", str(resolved), OUTPUT_NAME_ROOM)
    depth = len(resolved.relative_to(settings.outputs).parts)
    if depth > MAX_OUTPUT_DEPTH:
        raise BadRequest("output_dir", f"nests {depth} directories deep; at most {MAX_OUTPUT_DEPTH}")
    return resolved


def _encode(body: dict[str, Any]) -> EncodeSettings:
    codec = body.get("codec", "libx264")
    if not isinstance(codec, str):
        raise BadRequest("codec", f"must be a codec name, not {codec!r}")
    crf = _optional_int(body, "crf")
    preset = body.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise BadRequest("preset", f"must be a string, not {preset!r}")
    for name, settings in (("codec", {}), ("crf", {"crf": crf}), ("preset", {"crf": crf, "preset": preset})):
        try:
            encode = EncodeSettings.for_codec(codec, **settings)
        except EXPECTED_ERRORS as exc:
            raise BadRequest(name, str(exc)) from None
    return encode


def _safe_stem(source: Path) -> str:
    """The input's name as the start of an output's: safe characters only, at most 60."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem).strip("._-")[:60] or "video"


def _output_name(source: Path, model: str, scale: float | None, job_id: str, codec: str) -> str:
    stem = _safe_stem(source)
    model_name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).stem)[:40]
    scale_part = f"-x{scale:g}" if scale is not None else ""
    suffix = ".mkv" if codec == "ffv1" else ".mp4"
    return f"{stem}-{model_name}{scale_part}-{job_id[:8]}{suffix}"


COMMON_FIELDS = {"type", "inputs", "upload", "models", "scales", "priority", "output_dir"}
UPSCALE_FIELDS = COMMON_FIELDS | {"codec", "crf", "preset", "backend", "dedup"}
COMPARE_FIELDS = COMMON_FIELDS | {"frames"}


async def submit(request: web.Request) -> web.Response:
    settings, store, scheduler = request.app[SETTINGS], request.app[STORE], request.app[SCHEDULER]
    timeout = settings.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        return _error(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _error(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    try:
        kind = body.get("type", "upscale")
        if kind not in ("upscale", KIND):
            raise BadRequest("type", f'must be "upscale" (the default) or "compare", not {kind!r}')
        unknown = sorted(set(body) - (COMPARE_FIELDS if kind == KIND else UPSCALE_FIELDS))
        if unknown:
            raise BadRequest(unknown[0], f"is not a field of a{'' if kind == KIND else 'n'} {kind} job")
        inputs = await asyncio.to_thread(_inputs, body, settings)
        priority = _optional_int(body, "priority") or 0
        output_dir = await asyncio.to_thread(_output_dir, body, settings)
        batch_id = secrets.token_hex(8)
        if kind == KIND:
            # CompareSpec looks for model files on disk: off the event loop
            rows = await asyncio.to_thread(
                _compare_rows, body, inputs, output_dir, batch_id, priority, settings
            )
        else:
            rows = await _upscale_rows(body, inputs, output_dir, batch_id, priority, settings, scheduler)
    except BadRequest as exc:
        return _error(exc.status, str(exc))
    try:
        await asyncio.to_thread(output_dir.mkdir, parents=True, exist_ok=True)
    except OSError as exc:  # a full disk is the server's (507); anything else the request's
        status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 400
        return _error(status, f"output_dir: cannot create {output_dir}: {exc.strerror or exc}")
    await store.add_jobs(rows)
    scheduler.wake()
    log.info("batch %s: %d %s job(s) queued", batch_id, len(rows), kind)
    answer: dict[str, Any] = {"batch_id": batch_id, "jobs": [row.to_json() for row in rows]}
    if kind == KIND:
        answer["batch_url"] = f"/api/batches/{batch_id}/compare"
    return _json(answer, 201)


def _check_count(count: int, settings: ServiceSettings) -> None:
    if count > settings.max_jobs_per_submit:
        raise BadRequest("inputs", f"make {count} jobs; at most {settings.max_jobs_per_submit} at once")


async def _upscale_rows(
    body: dict[str, Any], inputs: list[Path], output_dir: Path, batch_id: str, priority: int,
    settings: ServiceSettings, scheduler: Scheduler,
) -> list[JobRow]:  # fmt: skip
    """One upscaling job per input x model x scale."""
    models = _list_of(body, "models", str, [DEFAULT_MODEL])
    scales = _list_of(body, "scales", (int, float), [None])
    backend = body.get("backend", "torch")
    if backend not in BACKENDS:  # before the workers are asked about it
        raise BadRequest("backend", f"must be one of {', '.join(BACKENDS)}, not {backend!r}")
    encode = _encode(body)
    dedup = body.get("dedup", False)
    if not isinstance(dedup, bool):
        raise BadRequest("dedup", f"must be true or false, not {_shown(dedup)}")
    _check_count(len(inputs) * len(models) * len(scales), settings)
    for model in dict.fromkeys(models):
        try:
            await scheduler.check_model(model, backend)
        except ModelUnavailableError as exc:
            raise BadRequest("models", str(exc)) from None
    rows = []
    for source in inputs:
        for model in models:
            for scale in scales:
                job_id = secrets.token_hex(8)
                output = output_dir / _output_name(source, model, scale, job_id, encode.codec)
                try:
                    spec = JobSpec(
                        input=source, output=output, model=model, backend=backend,
                        scale=float(scale) if scale is not None else None, encode=encode, dedup=dedup,
                    )  # fmt: skip
                except SpecError as exc:
                    field = {"scale": "scales", "model": "models"}.get(exc.field, exc.field)
                    raise BadRequest(field, exc.problem) from None
                rows.append(
                    new_job(
                        job_id=job_id, batch_id=batch_id, input=str(source), output=str(output),
                        spec=spec.to_dict(), model=model, scale=spec.scale, codec=encode.codec,
                        priority=priority, now=now(),
                    )
                )  # fmt: skip
    return rows


def _compare_rows(
    body: dict[str, Any], inputs: list[Path], output_dir: Path, batch_id: str, priority: int,
    settings: ServiceSettings,
) -> list[JobRow]:  # fmt: skip
    """One comparison job per input x scale, each over all the models (none: compare's defaults)."""
    models = _list_of(body, "models", str, [])
    scales = _list_of(body, "scales", (int, float), [2])
    _check_count(len(inputs) * len(scales), settings)
    rows = []
    for source in inputs:
        for scale in scales:
            job_id = secrets.token_hex(8)
            try:
                spec = compare_spec(source, models, scale, body.get("frames"))
            except CompareJobError as exc:
                raise BadRequest(exc.field, exc.problem) from None
            output = output_dir / f"{_safe_stem(source)}-compare-x{spec['scale']}-{job_id[:8]}.html"
            rows.append(
                new_job(
                    job_id=job_id, batch_id=batch_id, input=str(source), output=str(output), spec=spec,
                    model=",".join(models) or "default models", scale=float(spec["scale"]), codec="report",
                    priority=priority, now=now(),
                )
            )  # fmt: skip
    return rows


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
    return _json([row.to_json() for row in rows])


async def _job(request: web.Request) -> JobRow:
    """The job named by the route's id: a whole id, or any unique start of one (as git takes
    commits): 404 when none matches, 409 naming the matches when several do."""
    given, store = request.match_info["id"], request.app[STORE]
    if len(given) > JOB_ID_MAX:
        raise _http(web.HTTPNotFound, f"no job {_shown(given, 80)}")
    row = await store.get(given)
    if row is not None:
        return row
    matches = await store.with_prefix(given) if given else []
    if not matches:
        raise _http(web.HTTPNotFound, f"no job {given}")
    if len(matches) > 1:
        shown = ", ".join(m.id for m in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise _http(web.HTTPConflict, f"job id {given} is ambiguous: it starts {shown}; give more of it")
    return matches[0]


def _http(kind: type[web.HTTPError], message: str) -> web.HTTPError:
    return kind(body=orjson.dumps({"error": message}), content_type="application/json")


async def get_job(request: web.Request) -> web.Response:
    return _json((await _job(request)).to_json())


async def cancel_job(request: web.Request) -> web.Response:
    row = await _job(request)
    if row.job_state.finished:
        return _error(409, f"job {row.id} is {row.state}: only a queued or running job can be cancelled")
    cancelled = await request.app[SCHEDULER].cancel(row.id)
    current = cancelled or await _job(request)
    if current.job_state.finished and current.state != JobState.CANCELLED:  # it ended first
        return _error(409, f"job {row.id} is {current.state}: it ended before it could be cancelled")
    return _json(current.to_json())


async def retry_job(request: web.Request) -> web.Response:
    row = await _job(request)
    queued = await request.app[SCHEDULER].retry(row.id)
    if queued is None:
        return _error(409, f"job {row.id} is {row.state}: only a failed or cancelled job can be retried")
    return _json(queued.to_json())


async def delete_job(request: web.Request) -> web.Response:
    """Forget a finished job (its output file stays; a failed or cancelled job's kept frames go)."""
    settings, store = request.app[SETTINGS], request.app[STORE]
    row = await _job(request)
    if not row.job_state.finished or request.app[SCHEDULER].is_running(row.id):
        return _error(409, f"job {row.id} is {row.state}: only a finished job can be deleted")
    await store.delete(row.id)
    if row.job_dir and row.state != JobState.DONE:
        job_dir = Path(row.job_dir).resolve()
        if job_dir.is_relative_to(settings.shared_root / "jobs") and not any(
            other.job_dir == row.job_dir for other in await store.jobs() if not other.job_state.finished
        ):
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
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
        return _error(400, f"file: the form cannot be read: {_shown(exc.message, 120)}")
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
                400, f"Last-Event-ID / since: must be an event id (0 to {MAX_EVENT_ID}), not {_shown(raw)}"
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
                await response.write(b"id: %d\nevent: job\ndata: %s\n\n" % (event_id, data))
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
        return _error(exc.code or 400, f"the request cannot be read: {_shown(exc.message, 120)}")
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
