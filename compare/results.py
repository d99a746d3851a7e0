"""What a comparison found (:class:`Report`), as JSON and as the terminal table.

The JSON (``format: esrfarm-compare/1``) holds every number of the report; the images live only in
the HTML. Infinite values (PSNR of identical frames) are written as the string ``"inf"``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from compare.metrics import Box

Kind = Literal["model", "baseline"]

REPORT_FORMAT = "esrfarm-compare/1"
#: "The fastest model within this many VMAF NEG points of the best".
NEAR_BEST_POINTS = 1.0


@dataclass(frozen=True)
class DedupResult:
    """A row's run upscaled as ``esrfarm upscale --dedup`` would (:mod:`compare.dedup`), against the
    same row without it ("off").

    ``upscaled`` of ``frames`` frames were given to the model; the others show their reference's
    upscale. ``seconds_off`` is the model's time on the run's frames after the first (the warm-up),
    ``seconds_on`` the detector's time on the run plus the model's on the upscaled ones among them.
    ``psnr_frames`` (dB, luma) is each output frame of on against off's (``inf``: identical),
    ``psnr_min`` the worst of them and ``psnr_mean`` the PSNR of their mean squared error (the run as
    a whole). ``flicker`` is on's, measured as the row's own (against bicubic).
    """

    frames: int
    upscaled: int
    seconds_off: float
    seconds_on: float
    psnr_min: float
    psnr_mean: float
    flicker: float
    psnr_frames: tuple[float, ...] = ()

    @property
    def fraction(self) -> float:
        return self.upscaled / self.frames

    @property
    def time_ratio(self) -> float | None:
        """Seconds on over seconds off (below 1: faster); None when off took no measurable time."""
        return self.seconds_on / self.seconds_off if self.seconds_off > 0 else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DedupResult:
        values = {k: _infinite(v) for k, v in data.items() if k in {f.name for f in fields(cls)}}
        values["psnr_frames"] = tuple(values.get("psnr_frames", ()))
        return cls(**values)


@dataclass(frozen=True)
class DedupRun:
    """The held frames the detector found in the compared run (``--dedup``): ``duplicates`` pairs a
    frame with the frame whose upscale it shows (video frame numbers, 1-based), decided on
    ``samples`` (``yuv420p``...: the decoder's own samples, as a job with YUV frames; ``rgb24``: the
    RGB frames, as a job with npy or png frames) with the detector's ``block``, ``threshold`` and
    ``shift_threshold`` of ``--dedup-level`` ``level`` (its ``blur``), in ``seconds``."""

    frames: int
    duplicates: tuple[tuple[int, int], ...]
    samples: str
    block: int
    threshold: float
    shift_threshold: float
    seconds: float
    level: str = "strict"  # results kept before levels: strict
    blur: int = 1

    @property
    def upscaled(self) -> int:
        return self.frames - len(self.duplicates)


@dataclass(frozen=True)
class ModelResult:
    """One row of the report: a model (or baseline) and what it scored, or why it was skipped.

    Fidelity (``psnr`` dB, ``ssim``, ``vmaf``, ``vmaf_neg``) is measured on the degrade-then-restore
    frames after the ``shift`` (dy, dx pixels) found by the shift search; ``shift_gain_db`` is what
    that shift added to the PSNR. ``flicker`` is the ratio of temporal energies against bicubic on
    the real upscale. ``fps_measured`` is at the size the model ran on (the region, if any);
    ``fps`` is at the video's full frame size (the same number without a region, else scaled by
    pixel count), and ``projected_s`` the time for every frame of the video at ``fps``. ``dedup``:
    the same row with ``--dedup`` (only when the comparison ran with it).
    """

    name: str
    kind: Kind
    status: Literal["ok", "skipped"]
    reason: str | None = None
    description: str | None = None
    psnr: float | None = None
    ssim: float | None = None
    vmaf: float | None = None
    vmaf_neg: float | None = None
    shift: tuple[float, float] | None = None
    shift_gain_db: float | None = None
    flicker: float | None = None
    fps_measured: float | None = None
    fps: float | None = None
    projected_s: float | None = None
    psnr_frames: tuple[float, ...] = ()
    ssim_frames: tuple[float, ...] = ()
    vmaf_frames: tuple[float, ...] = ()
    vmaf_neg_frames: tuple[float, ...] = ()
    dedup: DedupResult | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelResult:
        """A row as :meth:`Report.to_json` wrote it (``"inf"`` strings and lists as they were)."""
        known = {f.name for f in fields(cls)}
        values = {k: _infinite(v) for k, v in data.items() if k in known}
        for name in ("shift", "psnr_frames", "ssim_frames", "vmaf_frames", "vmaf_neg_frames"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        if isinstance(values.get("dedup"), dict):
            values["dedup"] = DedupResult.from_json(values["dedup"])
        return cls(**values)


@dataclass(frozen=True)
class Machine:
    """Where the comparison ran."""

    host: str
    cpu: str
    cpu_count: int
    device: str
    precision: str | None
    torch: str | None
    ffmpeg: str
    esrfarm: str
    commit: str


@dataclass(frozen=True)
class ReportImages:
    """PNG images for the HTML: the crop of every row (and of the input, enlarged by nearest
    neighbour), and the before/after pair of the slider."""

    crops: dict[str, bytes] = field(default_factory=dict)
    input_crop: bytes | None = None
    slider_before: bytes | None = None
    slider_after: bytes | None = None
    slider_after_name: str | None = None


@dataclass(frozen=True)
class Report:
    """A finished comparison. Frame numbers are 1-based, as a user counts them."""

    input: str
    width: int
    height: int
    frame_count: int
    frame_rate: str
    duration_s: float
    scale: int
    seed: int
    window: tuple[int, int]  # first and last frame of the window the run was drawn from
    run: tuple[int, int]  # first and last frame compared
    region: Box | None  # of the input frame; None = the whole frame
    region_automatic: bool
    fidelity_size: tuple[int, int]  # (width, height) scored after the border is left out
    max_shift: float  # the shift search: within max_shift pixels, in steps of shift_step
    shift_step: float
    crop: Box  # of the real upscale, in output pixels
    slider: Box
    slider_frame: int
    machine: Machine
    rows: tuple[ModelResult, ...]
    created: str
    elapsed_s: float
    dedup: DedupRun | None = None  # the held frames of the run, with --dedup
    images: ReportImages = field(default_factory=ReportImages, compare=False, repr=False)

    @property
    def ok_rows(self) -> list[ModelResult]:
        return [row for row in self.rows if row.ok]

    @property
    def best(self) -> ModelResult | None:
        """The row with the highest VMAF NEG (the first of equals)."""
        scored = [row for row in self.ok_rows if row.vmaf_neg is not None]
        return max(scored, key=lambda row: row.vmaf_neg or 0.0, default=None)

    @property
    def fastest_near_best(self) -> ModelResult | None:
        """The fastest row within :data:`NEAR_BEST_POINTS` VMAF NEG points of the best."""
        best = self.best
        if best is None or best.vmaf_neg is None:
            return None
        near = [
            row
            for row in self.ok_rows
            if row.vmaf_neg is not None and row.vmaf_neg >= best.vmaf_neg - NEAR_BEST_POINTS and row.fps
        ]
        return max(near, key=lambda row: row.fps or 0.0, default=None)

    def to_json(self) -> dict[str, Any]:
        """Every number of the report, as JSON-ready values."""
        data = asdict(self)
        del data["images"]
        data["format"] = REPORT_FORMAT
        data["best"] = self.best.name if self.best else None
        data["fastest_near_best"] = self.fastest_near_best.name if self.fastest_near_best else None
        data["near_best_points"] = NEAR_BEST_POINTS
        return _finite(data)


def _infinite(value: Any) -> Any:
    """The inverse of :func:`_finite`."""
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return [_infinite(v) for v in value]
    return value


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def format_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_number(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def format_fps(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_shift(shift: tuple[float, float] | None) -> str:
    if shift is None:
        return "-"
    return f"{shift[1]:+g},{shift[0]:+g}" if shift != (0.0, 0.0) else "0"


TABLE_COLUMNS = ("model", "PSNR dB", "SSIM", "VMAF", "VMAF NEG", "flicker", "fps", "projected", "shift x,y")


def table_cells(row: ModelResult) -> list[str]:
    """The row's cells for :data:`TABLE_COLUMNS` (the HTML table shows the same text)."""
    return [
        row.name,
        format_number(row.psnr, 2),
        format_number(row.ssim, 4),
        format_number(row.vmaf, 2),
        format_number(row.vmaf_neg, 2),
        format_number(row.flicker, 2),
        format_fps(row.fps),
        format_seconds(row.projected_s),
        format_shift(row.shift),
    ]


def verdict(report: Report) -> list[str]:
    """The report's conclusions, one sentence each."""
    lines = []
    best, fastest = report.best, report.fastest_near_best
    if best is None:
        lines.append("No model could be scored.")
    else:
        lines.append(f"Best by VMAF NEG: {best.name} ({format_number(best.vmaf_neg, 2)}).")
        models = [row for row in report.ok_rows if row.kind == "model" and row.vmaf_neg is not None]
        best_model = max(models, key=lambda row: row.vmaf_neg or 0.0, default=None)
        if best.kind == "baseline" and best_model is not None:
            lines.append(
                f"Best of the models: {best_model.name} ({format_number(best_model.vmaf_neg, 2)}); on these "
                "frames no model restores detail better than a plain resize."
            )
        if fastest is not None:
            lines.append(
                f"Fastest within {NEAR_BEST_POINTS:g} point of it: {fastest.name} "
                f"({format_fps(fastest.fps)} fps, {format_seconds(fastest.projected_s)} for the whole video)."
            )
        lines.extend(_dedup_verdict(report))
    return lines


DEDUP_COLUMNS = (
    "model",
    "--dedup",
    "frames upscaled",
    "seconds",
    "on/off",
    "PSNR vs off, worst / run",
    "flicker",
)


def _run_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s"


def dedup_cells(row: ModelResult) -> list[list[str]]:
    """A row's two lines for :data:`DEDUP_COLUMNS`, ``--dedup`` off then on (none without it)."""
    d = row.dedup
    if d is None:
        return []
    ratio = d.time_ratio
    psnr = "identical" if math.isinf(d.psnr_min) else f"{d.psnr_min:.1f} / {d.psnr_mean:.1f} dB"
    return [
        [row.name, "off", f"{d.frames} / {d.frames} (1.00)", _run_seconds(d.seconds_off), "", "",
         format_number(row.flicker, 3)],
        [row.name, "on", f"{d.upscaled} / {d.frames} ({d.fraction:.2f})", _run_seconds(d.seconds_on),
         format_number(ratio, 2), psnr, format_number(d.flicker, 3)],
    ]  # fmt: skip


def _dedup_verdict(report: Report) -> list[str]:
    """What ``--dedup`` did to the best model (by VMAF NEG; a baseline only if no model was scored)."""
    rows = [row for row in report.ok_rows if row.dedup is not None and row.vmaf_neg is not None]
    models = [row for row in rows if row.kind == "model"] or rows
    row = max(models, key=lambda r: r.vmaf_neg or 0.0, default=None)
    if row is None or row.dedup is None:
        return []
    d = row.dedup
    ratio = d.time_ratio
    time = f" in {ratio:.2f} of the time" if ratio is not None else ""
    if math.isinf(d.psnr_min):
        change = "every output frame is the same as without it"
    else:
        change = f"its worst frame is {d.psnr_min:.1f} dB from the output without it"
    return [
        f"With --dedup, {row.name} upscales {d.upscaled} of {d.frames} frames ({d.fraction:.2f}){time}; "
        f"{change}; flicker {format_number(row.flicker, 3)} without, {format_number(d.flicker, 3)} with."
    ]


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(rows[0]))]
    lines = []
    for cells in rows:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
    return lines


def format_table(report: Report) -> str:
    """The terminal table: one line per row, skipped rows with their reason, then the verdict."""
    lines = _aligned([list(TABLE_COLUMNS)] + [table_cells(row) for row in report.ok_rows])
    for row in report.rows:
        if not row.ok:
            lines.append(f"{row.name}: skipped: {row.reason}")
    if report.dedup is not None:
        held = report.dedup
        lines.append("")
        lines.append(
            f"--dedup --dedup-level {held.level}: {held.upscaled} of {held.frames} frames of the run are "
            "upscaled, the others repeat "
            f"one (found on its {held.samples} samples in {held.seconds:.2g} s):"
        )
        lines.extend(
            _aligned([list(DEDUP_COLUMNS)] + [c for row in report.ok_rows for c in dedup_cells(row)])
        )
    lines.append("")
    lines.extend(verdict(report))
    m = report.machine
    lines.append(f"Ran on {m.host} ({m.cpu}, {m.cpu_count} CPUs), device {m.device}, esrfarm {m.commit}.")
    return "\n".join(lines)
