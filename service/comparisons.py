"""Comparison jobs: ``esrfarm compare`` as a job type of the service, and a batch's comparison page.

A comparison job (``POST /api/jobs`` with ``"type": "compare"``) is one input compared over all the
batch's models at one scale; its output is the report (HTML, with its JSON beside it) that
``esrfarm compare`` writes. The service runs it as that command, in a child process of its own
(:class:`CompareProcess`): the model runtime and its memory live and die with the comparison, and a
cancel is a kill. At most one runs at a time, beside the upscaling jobs (it loads every model in
turn on its ``--compare-device``).

:func:`batch_page` renders the batch's one comparison page: for each input, the rows of its report
(model, PSNR, SSIM, VMAF, VMAF NEG, flicker, fps, projected time), the best model by VMAF NEG and the
fastest within a point of it, and a link to the full report (crops, chart, slider).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from compare.results import TABLE_COLUMNS, ModelResult, table_cells
from compare.spec import DEFAULT_FRAMES, SCALES, CompareSpec
from manifests.dedup import STRICT
from service.errors import RunCancelledError, RunError, SubmissionError
from service.runners import Advanced, RunEvent, RunResult
from service.store import JobRow

log = logging.getLogger(__name__)

KIND = "compare"
#: ``compare.run`` says ``[i/n] model`` as it starts each model (its INFO log line).
_MODEL_LINE = re.compile(r"INFO compare\.run: \[(\d+)/(\d+)\] (.+)$")
_ERROR_PREFIX = "esrfarm compare: "
_TAIL_LINES = 20


MAX_FRAMES = 100_000  # the most frames a comparison job may ask for


def compare_spec(
    source: Path,
    models: Sequence[str],
    scale: float,
    frames: int | None,
    *,
    dedup: bool = False,
    dedup_level: str = STRICT,
) -> dict[str, Any]:
    """The stored spec of one comparison job, checked as ``esrfarm compare`` would check it; raises
    :class:`SubmissionError` naming the field. ``dedup``, ``dedup_level``: ``esrfarm compare --dedup
    --dedup-level`` (stored only when set, so specs stored before them read the same)."""
    if scale not in SCALES:
        raise SubmissionError("scales", f"a comparison runs at {', '.join(map(str, SCALES))}, not {scale:g}")
    if frames is None:
        frames = DEFAULT_FRAMES
    try:
        CompareSpec(
            input=source, models=tuple(models), scale=int(scale), frames=frames, dedup=dedup,
            dedup_level=dedup_level,
        )  # fmt: skip
    except ValueError as exc:
        text = str(exc)
        field = "frames" if "frames" in text else "dedup_level" if "dedup" in text else "models"
        raise SubmissionError(field, text) from None
    spec = {"kind": KIND, "input": str(source), "models": list(models), "scale": int(scale), "frames": frames}
    if dedup:
        spec["dedup"] = True
    if dedup_level != STRICT:
        spec["dedup_level"] = dedup_level
    return spec


def is_compare(row: JobRow) -> bool:
    return row.kind == KIND


def json_path(row: JobRow) -> Path:
    """The report's JSON, beside its HTML (the job's output)."""
    return Path(row.output).with_suffix(".json")


class CompareProcess:
    """``python -m compare`` for one job, as a :class:`service.runners.JobRunner`: started, followed
    line by line (each model it starts is progress), killed on cancel."""

    on_start: Mapping[str, Any] = {"stage": "comparing", "frames_done": 0, "frames_total": 0, "error": None}

    def __init__(self, row: JobRow, device: str, extra_args: Sequence[str] = ()) -> None:
        spec = row.spec_dict
        self.row = row
        self.argv = [
            sys.executable, "-m", "compare", spec["input"], "--scale", str(spec["scale"]),
            "--frames", str(spec["frames"]), "--report", row.output, "--json", str(json_path(row)),
            "--overwrite", "--device", device, *extra_args,
        ]  # fmt: skip
        if spec["models"]:
            self.argv[4:4] = ["--models", ",".join(spec["models"])]
        if spec.get("dedup"):
            self.argv += ["--dedup", "--dedup-level", spec.get("dedup_level", STRICT)]
        self.process: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.killed = False
        self.models = 0  # how many models the comparison said it compares

    async def start(self) -> None:
        """Start the child (not if :meth:`cancel` came first); raises :class:`RunError` if it cannot."""
        if self.killed:
            return
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a cancel kills the comparison and whatever it started (VMAF)
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            raise RunError(f"cannot start esrfarm compare: {exc.strerror or exc}") from None
        if self.killed:  # cancel() came while it started
            await self.cancel()

    async def events(self) -> AsyncIterator[RunEvent]:
        """The model it is on (1-based) of how many, as each starts (``compare.run``'s log line)."""
        if self.process is None or self.process.stderr is None:
            return
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            match = _MODEL_LINE.search(line)
            if match:
                number, self.models = int(match[1]), int(match[2])
                yield Advanced(f"comparing {match[3]}", number - 1, self.models, counts_frames=True)

    async def wait(self) -> RunResult:
        """The end: :class:`RunCancelledError` if :meth:`cancel` ended it, :class:`RunError` with the
        command's own error if it failed."""
        code = await self.process.wait() if self.process is not None else None
        if self.killed:
            raise RunCancelledError(f"the comparison of job {self.row.id} was cancelled")
        if code != 0:
            raise RunError(self._failure(code))
        return RunResult(done=self.models, frames_upscaled=0)

    def _failure(self, code: int | None) -> str:
        said = [line[len(_ERROR_PREFIX) :] for line in self.tail if line.startswith(_ERROR_PREFIX)]
        if said:
            return said[-1].removeprefix("error: ")
        last = self.tail[-1] if self.tail else "no output"
        return f"esrfarm compare exited with {code}: {last}"

    async def cancel(self) -> None:
        """Kill the comparison (and its children); its report is never written (reports are renamed
        into place whole)."""
        self.killed = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        log.info("killing the comparison of job %s (pid %d)", self.row.id, process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


# -- the batch page ----------------------------------------------------------------------------------


def read_report(row: JobRow) -> dict[str, Any] | None:
    """The JSON report of a finished comparison job, if it can be read."""
    try:
        data = orjson.loads(json_path(row).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _report_section(row: JobRow, report: dict[str, Any] | None, report_url: str) -> str:
    name = html.escape(Path(row.input).name)
    head = f"<h2>{name} <small>x{row.scale:g}</small></h2>"
    if row.state != "done" or report is None:
        why = f": {html.escape(row.error)}" if row.error else ""
        return f'{head}<p class="state">{html.escape(row.state)}{why}</p>'
    best, fastest = report.get("best"), report.get("fastest_near_best")
    lines = []
    for model in map(ModelResult.from_json, report.get("rows", [])):
        label = html.escape(model.name)
        if not model.ok:
            reason = html.escape(model.reason or "skipped")
            cell = f'<td colspan="{len(TABLE_COLUMNS) - 1}">skipped: {reason}</td>'
            lines.append(f'<tr class="skipped"><th>{label}</th>{cell}</tr>')
            continue
        marks = [mark for mark, named in (("best", best), ("fastest", fastest)) if model.name == named]
        badge = "".join(f' <span class="badge">{m}</span>' for m in marks)
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in table_cells(model)[1:])
        lines.append(f"<tr><th>{label}{badge}</th>{cells}</tr>")
    verdict = (
        f"<p>Best by VMAF NEG: <b>{html.escape(str(best))}</b>; fastest within "
        f"{report.get('near_best_points', 1.0):g} point of it: "
        f"<b>{html.escape(str(fastest))}</b>.</p>"
        if best
        else "<p>No model could be scored.</p>"
    )
    columns = "".join(f"<th>{html.escape(column)}</th>" for column in TABLE_COLUMNS)
    table = f"<table><thead><tr>{columns}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
    link = f'<p><a class="report" href="{html.escape(report_url)}">full report</a> (crops, chart, slider)</p>'
    return head + verdict + table + link


def batch_page(batch_id: str, rows: list[JobRow], report_url: Callable[[JobRow], str]) -> str:
    """The batch's comparison page (self-contained HTML)."""
    sections = "".join(_report_section(row, read_report(row), report_url(row)) for row in rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>esrfarm comparison {html.escape(batch_id)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3em .7em; text-align: right; }}
th:first-child {{ text-align: left; }}
.badge {{ background: #2a6; color: #fff; border-radius: 3px; padding: 0 .3em; font-size: 80%; }}
.skipped td {{ color: #888; text-align: left; }}
</style></head><body>
<h1>Model comparison, batch {html.escape(batch_id)}</h1>
<p>Fidelity (PSNR, SSIM on luma, VMAF and VMAF NEG) is measured by downscaling the input's frames and
upscaling them back; flicker is the output's frame-to-frame change energy over a bicubic upscale's
(1 = as steady as bicubic). Each input's full report explains the protocol and what it favours.</p>
{sections}
</body></html>
"""
