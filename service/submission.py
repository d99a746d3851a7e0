"""What a submission (``POST /api/jobs``) becomes, and what deleting a job leaves: the rules the
routes of ``service/api.py`` call.

- The body is declared once, as :class:`UpscaleBody` or :class:`CompareBody` (``"type"``), each field
  with its limits beside it; :func:`decode_body` decodes and validates from that declaration, and
  every refusal is a :class:`~service.errors.SubmissionError` naming its field.
- :func:`prepare` checks the inputs (confined to the input roots, symlinks followed) and the output
  directory (confined to the output directory), and expands the body into jobs: one upscaling job per
  input x model x scale, or one comparison job per input x scale (over all the models), each with
  its output named by :func:`output_name`.
- :func:`forget` deletes a finished job and the frames a failed or cancelled one kept.
"""

from __future__ import annotations

import asyncio
import errno
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import orjson

from coordinator.errors import EXPECTED_ERRORS, SpecError
from coordinator.spec import DEFAULT_MODEL, JobSpec
from manifests.dedup import DEDUP_LEVELS, STRICT
from manifests.httpguard import shown
from manifests.manifest import BACKENDS
from manifests.segment import FRAMES_TRANSPORT, TRANSPORTS
from media.encode import EncodeSettings
from service.comparisons import KIND, MAX_FRAMES, compare_spec
from service.errors import ModelUnavailableError, SubmissionError
from service.settings import ServiceSettings
from service.store import JobRow, JobState, Store, new_job, now

# Bounds of what a body may hold, checked where it is decoded.
PRIORITY_LIMIT = 1_000_000_000  # a priority (and a crf) is -LIMIT to LIMIT
PATH_MAX = 4096  # bytes of a path, and of one name in it: Linux's limits
NAME_MAX = 255
OUTPUT_NAME_ROOM = 200  # bytes an output directory leaves for the generated file name
MAX_OUTPUT_DEPTH = 32  # directories an output_dir may nest below the output directory
UPLOAD_ID = "^[0-9a-f]{32}$"

Bounded = Annotated[int, msgspec.Meta(ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)]
# Characters here; the file system's limits are bytes, checked by _checked_path.
PathText = Annotated[str, msgspec.Meta(min_length=1, max_length=PATH_MAX)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=PATH_MAX)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The fields of every job type. ``inputs`` (paths under an ``--input-root``) or ``upload`` (an
    upload id): exactly one of them."""

    inputs: Annotated[list[PathText], msgspec.Meta(min_length=1)] | None = None
    upload: Annotated[str, msgspec.Meta(pattern=UPLOAD_ID)] | None = None
    models: Annotated[list[Name], msgspec.Meta(min_length=1)] | None = None  # None: the type's default
    scales: Annotated[list[float], msgspec.Meta(min_length=1)] | None = None  # None: the type's default
    priority: Bounded | None = None  # None: 0
    output_dir: PathText | None = None  # absolute, or relative to the output directory


#: A ``--dedup-level`` name (manifests.dedup.DEDUP_LEVELS).
DedupLevelName = Annotated[str, msgspec.Meta(pattern=f"^({'|'.join(DEDUP_LEVELS)})$")]


class UpscaleBody(_Body, frozen=True):
    """An upscaling batch: one job per input x model (default: the default model) x scale (default:
    the model's own)."""

    type: Literal["upscale"] = "upscale"
    codec: Annotated[str, msgspec.Meta(max_length=NAME_MAX)] = "libx264"
    crf: Bounded | None = None
    preset: Annotated[str, msgspec.Meta(max_length=NAME_MAX)] | None = None
    backend: Annotated[str, msgspec.Meta(pattern=f"^({'|'.join(BACKENDS)})$")] = "torch"
    dedup: bool = False
    dedup_level: DedupLevelName = STRICT  # with dedup: esrfarm upscale --dedup-level
    transport: Annotated[str, msgspec.Meta(pattern=f"^({'|'.join(TRANSPORTS)})$")] = FRAMES_TRANSPORT


class CompareBody(_Body, frozen=True):
    """A comparison batch: one job per input x scale (default 2), each over all the models (none:
    compare's defaults)."""

    type: Literal["compare"] = "compare"
    # None: compare's default; its minimum is compare's (CompareSpec)
    frames: Annotated[int, msgspec.Meta(le=MAX_FRAMES)] | None = None
    dedup: bool = False  # the report also shows what --dedup does to the run (compare --dedup)
    dedup_level: DedupLevelName = STRICT  # with dedup: the level measured (compare --dedup-level)


Body = UpscaleBody | CompareBody
BODIES: dict[str, type[Body]] = {"upscale": UpscaleBody, KIND: CompareBody}


def decode_body(raw: bytes) -> Body:
    """The body of a submission, decoded and checked against its declaration; raises
    :class:`SubmissionError` naming the field (no field when the body is no JSON object)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SubmissionError(None, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SubmissionError(None, "the request body must be a JSON object")
    kind = value.get("type", "upscale")
    if not isinstance(kind, str) or kind not in BODIES:
        raise SubmissionError("type", f'must be "upscale" (the default) or "compare", not {shown(kind)}')
    try:
        return msgspec.convert(value, BODIES[kind])
    except msgspec.ValidationError as exc:
        raise _field_error(str(exc), kind) from None


def _field_error(message: str, kind: str) -> SubmissionError:
    """msgspec's message (``Expected ... - at `$.field[0]```) as the field's error."""
    unknown = re.match(r"Object contains unknown field `(.*)`$", message)
    if unknown is not None:
        article = "an" if kind == "upscale" else "a"
        return SubmissionError(unknown[1][:80], f"is not a field of {article} {kind} job")
    problem, _, where = message.rpartition(" - at `$.")
    field = re.match(r"\w*", where)
    if not problem or field is None:
        return SubmissionError(None, message)
    return SubmissionError(field[0], problem[:1].lower() + problem[1:])


# -- inputs and the output directory -----------------------------------------------------------------


def _confined(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _checked_path(field: str, raw: str, room: int = 0) -> Path:
    """``raw`` as a path, if it is one the file system can take (``room``: bytes kept for names
    added below it); raises :class:`SubmissionError` naming ``field`` otherwise."""
    if not raw or "\x00" in raw:
        raise SubmissionError(field, f"is not a path: {shown(raw)}")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size + room > PATH_MAX:
        most = PATH_MAX - room
        raise SubmissionError(field, f"is a path of {size} bytes; the file system takes {most} at most")
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in raw.split("/"))
    if longest > NAME_MAX:
        raise SubmissionError(
            field, f"holds a name of {longest} bytes; the file system takes {NAME_MAX} at most"
        )
    return Path(raw)


def _resolved(field: str, path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long once links are followed
        raise SubmissionError(
            field, f"{shown(str(path))} cannot be resolved: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def resolve_inputs(body: Body, settings: ServiceSettings) -> list[Path]:
    """The inputs asked for, resolved (symlinks followed) and confined to the input roots (blocks:
    run it in a thread)."""
    if (body.inputs is None) == (body.upload is None):
        raise SubmissionError("inputs", 'give either "inputs" (paths) or "upload" (an upload id)')
    if body.upload is not None:
        path = settings.uploads_dir / body.upload
        if not path.is_file():
            raise SubmissionError("upload", f"there is no upload {body.upload}")
        return [path]
    assert body.inputs is not None
    paths = []
    for raw in body.inputs:
        given = _checked_path("inputs", raw)
        resolved = _resolved("inputs", given)
        if not given.is_absolute() or not _confined(resolved, settings.input_roots):
            roots = ", ".join(map(str, settings.input_roots)) or "none configured (--input-root)"
            raise SubmissionError("inputs", f"{raw} is outside every input root ({roots})", 403)
        _checked_path("inputs", str(resolved))  # what the job will open, links followed
        if resolved.is_dir():
            raise SubmissionError("inputs", f"{raw} is a directory, not a video file")
        if resolved.exists() and not resolved.is_file():
            raise SubmissionError("inputs", f"{raw} is not a regular file")
        paths.append(resolved)  # a missing one fails its job, with the coordinator's reason
    return paths


def resolve_output_dir(raw: str | None, settings: ServiceSettings) -> Path:
    """Where the outputs go, resolved and confined to the output directory (blocks: run it in a thread)."""
    if raw is None:
        return settings.outputs
    candidate = _checked_path("output_dir", raw).expanduser()
    if not candidate.is_absolute():
        candidate = _checked_path("output_dir", str(settings.outputs / candidate), OUTPUT_NAME_ROOM)
    resolved = _resolved("output_dir", candidate)
    if not _confined(resolved, (settings.outputs,)):
        raise SubmissionError("output_dir", f"{raw} is outside the output directory {settings.outputs}", 403)
    _checked_path("output_dir", str(resolved), OUTPUT_NAME_ROOM)
    depth = len(resolved.relative_to(settings.outputs).parts)
    if depth > MAX_OUTPUT_DEPTH:
        raise SubmissionError("output_dir", f"nests {depth} directories deep; at most {MAX_OUTPUT_DEPTH}")
    return resolved


def _make_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a full disk is the server's (507); anything else the request's
        status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 400
        why = exc.strerror or exc
        raise SubmissionError("output_dir", f"cannot create {output_dir}: {why}", status) from None


# -- the jobs ----------------------------------------------------------------------------------------


def _safe_stem(source: Path) -> str:
    """The input's name as the start of an output's: safe characters only, at most 60."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem).strip("._-")[:60] or "video"


def output_name(source: Path, model: str, scale: float | None, job_id: str, codec: str) -> str:
    """An upscaling job's output file name: ``<input>-<model>-x<scale>-<job id>.mp4`` (``.mkv`` for ffv1)."""
    stem = _safe_stem(source)
    model_name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).stem)[:40]
    scale_part = f"-x{scale:g}" if scale is not None else ""
    suffix = ".mkv" if codec == "ffv1" else ".mp4"
    return f"{stem}-{model_name}{scale_part}-{job_id[:8]}{suffix}"


def report_name(source: Path, scale: int, job_id: str) -> str:
    """A comparison job's report file name: ``<input>-compare-x<scale>-<job id>.html``."""
    return f"{_safe_stem(source)}-compare-x{scale}-{job_id[:8]}.html"


def _encode(body: UpscaleBody) -> EncodeSettings:
    encode = None
    for name, settings in (
        ("codec", {}),
        ("crf", {"crf": body.crf}),
        ("preset", {"crf": body.crf, "preset": body.preset}),
    ):
        try:
            encode = EncodeSettings.for_codec(body.codec, **settings)
        except EXPECTED_ERRORS as exc:
            raise SubmissionError(name, str(exc)) from None
    assert encode is not None
    return encode


def _check_count(count: int, settings: ServiceSettings) -> None:
    if count > settings.max_jobs_per_submit:
        raise SubmissionError("inputs", f"make {count} jobs; at most {settings.max_jobs_per_submit} at once")


@dataclass(frozen=True)
class Submission:
    """A checked submission: its jobs, not yet stored, and the directory their outputs go to (made)."""

    kind: str
    batch_id: str
    output_dir: Path
    jobs: list[JobRow]


ModelCheck = Callable[[str, str], Awaitable[None]]


async def prepare(body: Body, settings: ServiceSettings, check_model: ModelCheck) -> Submission:
    """The jobs ``body`` asks for, checked (``check_model(model, backend)`` raises
    :class:`ModelUnavailableError` for a model no worker runs), and their output directory made.
    Raises :class:`SubmissionError` naming the field at fault."""
    inputs = await asyncio.to_thread(resolve_inputs, body, settings)
    output_dir = await asyncio.to_thread(resolve_output_dir, body.output_dir, settings)
    batch_id = secrets.token_hex(8)
    if isinstance(body, CompareBody):  # CompareSpec looks for model files on disk: off the event loop
        jobs = await asyncio.to_thread(_compare_jobs, body, inputs, output_dir, batch_id, settings)
    else:
        jobs = await _upscale_jobs(body, inputs, output_dir, batch_id, settings, check_model)
    await asyncio.to_thread(_make_output_dir, output_dir)
    return Submission(body.type, batch_id, output_dir, jobs)


async def _upscale_jobs(
    body: UpscaleBody, inputs: list[Path], output_dir: Path, batch_id: str, settings: ServiceSettings,
    check_model: ModelCheck,
) -> list[JobRow]:  # fmt: skip
    """One upscaling job per input x model x scale."""
    models = body.models or [DEFAULT_MODEL]
    scales: list[float | None] = list(body.scales) if body.scales else [None]
    encode = _encode(body)
    _check_count(len(inputs) * len(models) * len(scales), settings)
    for model in dict.fromkeys(models):
        try:
            await check_model(model, body.backend)
        except ModelUnavailableError as exc:
            raise SubmissionError("models", str(exc)) from None
    jobs = []
    for source in inputs:
        for model in models:
            for scale in scales:
                job_id = secrets.token_hex(8)
                output = output_dir / output_name(source, model, scale, job_id, encode.codec)
                try:
                    spec = JobSpec(
                        input=source, output=output, model=model, backend=body.backend, scale=scale,
                        encode=encode, dedup=body.dedup, dedup_level=body.dedup_level,
                        transport=body.transport,
                    )  # fmt: skip
                except SpecError as exc:
                    field = {"scale": "scales", "model": "models"}.get(exc.field, exc.field)
                    raise SubmissionError(field, exc.problem) from None
                jobs.append(
                    new_job(
                        job_id=job_id, batch_id=batch_id, input=str(source), output=str(output),
                        spec=spec.to_dict(), model=model, scale=spec.scale, codec=encode.codec,
                        priority=body.priority or 0, now=now(),
                    )
                )  # fmt: skip
    return jobs


def _compare_jobs(
    body: CompareBody, inputs: list[Path], output_dir: Path, batch_id: str, settings: ServiceSettings
) -> list[JobRow]:
    """One comparison job per input x scale, each over all the models (none: compare's defaults)."""
    models = body.models or []
    scales = body.scales or [2]
    _check_count(len(inputs) * len(scales), settings)
    jobs = []
    for source in inputs:
        for scale in scales:
            job_id = secrets.token_hex(8)
            spec = compare_spec(
                source, models, scale, body.frames, dedup=body.dedup, dedup_level=body.dedup_level
            )
            output = output_dir / report_name(source, spec["scale"], job_id)
            jobs.append(
                new_job(
                    job_id=job_id, batch_id=batch_id, input=str(source), output=str(output), spec=spec,
                    model=",".join(models) or "default models", scale=float(spec["scale"]), codec="report",
                    priority=body.priority or 0, now=now(),
                )
            )  # fmt: skip
    return jobs


# -- deleting ----------------------------------------------------------------------------------------


async def forget(row: JobRow, store: Store, settings: ServiceSettings) -> None:
    """Delete a finished job from the store; its output file stays. The frames a failed or cancelled
    job kept go too, unless the directory is outside ``<shared root>/jobs`` or an unfinished job
    uses it (the same input, model and scale submitted again)."""
    await store.delete(row.id)
    if not row.job_dir or row.state == JobState.DONE:
        return
    job_dir = Path(row.job_dir).resolve()
    if not job_dir.is_relative_to(settings.shared_root / "jobs"):
        return
    if any(other.job_dir == row.job_dir for other in await store.jobs() if not other.job_state.finished):
        return
    await asyncio.to_thread(shutil.rmtree, job_dir, True)
