"""The report files: one self-contained HTML page (images embedded, no script or style from
elsewhere, works offline) and the JSON, both written atomically.

The chart is hand-written SVG and the images are PNGs from Pillow (already a dependency): matplotlib
3.11 and the six packages it would add (fonttools, kiwisolver, contourpy, pyparsing, cycler and
python-dateutil) are 17 MB of wheels, 57 MB installed, for one scatter plot.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import os
from pathlib import Path

import orjson

from compare.results import (
    DEDUP_COLUMNS,
    NEAR_BEST_POINTS,
    TABLE_COLUMNS,
    ModelResult,
    Report,
    dedup_cells,
    format_fps,
    format_number,
    format_seconds,
    table_cells,
    verdict,
)
from compare.spec import BORDER, CompareError
from manifests.atomic import atomic_path
from manifests.dedup import DEDUP_LEVELS

CHART_SIZE = (640, 360)
_MARGIN = {"left": 60, "right": 24, "top": 20, "bottom": 48}


def check_report_paths(input_path: Path, paths: list[Path], overwrite: bool) -> None:
    """Raise :class:`CompareError` unless every path can take a new report file."""
    if len({os.path.realpath(p) for p in paths}) != len(paths):
        raise CompareError(f"the report files must differ: {', '.join(map(str, paths))}")
    for path in paths:
        if os.path.realpath(path) == os.path.realpath(input_path):
            raise CompareError(f"report {path} is the input file; choose another path")
        if path.is_dir():
            raise CompareError(f"report {path} is a directory; give a file name")
        if path.exists() and not overwrite:
            raise CompareError(f"report {path} already exists (pass --overwrite to replace it)")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise CompareError(f"report {path} cannot be written: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CompareError(f"report {path} cannot be written: directory {parent} is not writable")


def write_report(report: Report, html_path: Path | None, json_path: Path | None) -> None:
    """Write the HTML and/or the JSON. Each is written under a temporary name and renamed once whole;
    if writing either fails, neither appears."""
    outputs = [
        (path, data)
        for path, data in ((html_path, render_html(report).encode()), (json_path, json_bytes(report)))
        if path is not None
    ]
    with contextlib.ExitStack() as stack:
        for path, data in outputs:
            stack.enter_context(atomic_path(path)).write_bytes(data)


def json_bytes(report: Report) -> bytes:
    return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def render_chart(rows: list[ModelResult], best: str | None) -> str:
    """A speed (fps, log scale) against VMAF NEG scatter plot as an inline SVG element."""
    points = [r for r in rows if r.fps and math.isfinite(r.fps) and r.fps > 0 and r.vmaf_neg is not None]
    width, height = CHART_SIZE
    left, right, top, bottom = _MARGIN["left"], _MARGIN["right"], _MARGIN["top"], _MARGIN["bottom"]
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg id="chart-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="frames per second against VMAF NEG">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    if not points:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no scored rows</text></svg>'
        )
        return "".join(parts)
    logs = [math.log10(r.fps or 1.0) for r in points]
    x_lo, x_hi = math.floor(min(logs)), math.ceil(max(logs))
    if x_hi - x_lo < 1:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    scores = [r.vmaf_neg or 0.0 for r in points]
    step = _nice_step(max(2.0, max(scores) - min(scores)))
    y_lo = math.floor((min(scores) - step / 2) / step) * step
    y_hi = math.ceil((max(scores) + step / 2) / step) * step

    def x_of(fps: float) -> float:
        return left + (math.log10(fps) - x_lo) / (x_hi - x_lo) * plot_w

    def y_of(score: float) -> float:
        return top + (y_hi - score) / (y_hi - y_lo) * plot_h

    for decade in range(x_lo, x_hi + 1):
        x = left + (decade - x_lo) / (x_hi - x_lo) * plot_w
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#e4e4e4"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="12">'
            f"{10.0**decade:g}</text>"
        )
    tick = y_lo
    while tick <= y_hi + 1e-9:
        y = y_of(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12">{tick:g}</text>')
        tick += step
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" font-size="13">'
        "frames per second at the video's size (log scale)</text>"
    )
    parts.append(
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle" '
        'font-size="13">VMAF NEG</text>'
    )
    for row in points:
        x, y = x_of(row.fps or 1.0), y_of(row.vmaf_neg or 0.0)
        colour = "#1f6feb" if row.kind == "model" else "#8a8a8a"
        ring = ' stroke="#d4a72c" stroke-width="3"' if row.name == best else ""
        name = html.escape(row.name)
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}"{ring}>'
            f"<title>{name}: {format_fps(row.fps)} fps, VMAF NEG {format_number(row.vmaf_neg, 2)}</title>"
            "</circle>"
        )
        anchor = "end" if x > left + plot_w * 0.7 else "start"
        dx = -10 if anchor == "end" else 10
        parts.append(
            f'<text x="{x + dx:.1f}" y="{y - 8:.1f}" text-anchor="{anchor}" font-size="12">{name}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; padding: 0 16px;
       color: #1b1b1b; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; }
.meta { color: #555; margin-top: 0; }
#verdict { background: #f0f6ff; border-left: 4px solid #1f6feb; padding: 8px 14px; }
table { border-collapse: collapse; margin-top: 12px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr.best td { font-weight: 600; } tr.baseline td { color: #666; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; } figcaption { font-size: 13px; color: #444; max-width: 260px; }
figure img { display: block; image-rendering: pixelated; border: 1px solid #ccc; }
.ba { position: relative; overflow: hidden; border: 1px solid #ccc; max-width: 100%; }
.ba img { display: block; }
.ba .after { position: absolute; top: 0; left: 0; bottom: 0; overflow: hidden; border-right: 2px solid #fff; }
.ba-labels { display: flex; justify-content: space-between; font-size: 13px; color: #444; }
#ba-range { display: block; margin-top: 6px; }
dt { font-weight: 600; margin-top: 8px; } footer { margin-top: 36px; color: #555; font-size: 13px; }
"""

_SCRIPT = """
(function () {
  var range = document.getElementById("ba-range");
  var after = document.getElementById("ba-after");
  if (!range || !after) { return; }
  function show() { after.style.width = range.value + "%"; }
  range.addEventListener("input", show);
  show();
})();
"""


def _table(report: Report) -> str:
    best = report.best.name if report.best else None
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = []
    for row in report.ok_rows:
        classes = " ".join(c for c in (row.kind, "best" if row.name == best else "") if c)
        cells = "".join(f"<td>{html.escape(cell)}</td>" for cell in table_cells(row))
        body.append(f'<tr class="{classes}" data-model="{html.escape(row.name)}">{cells}</tr>')
    skipped = [r for r in report.rows if not r.ok]
    listing = ""
    if skipped:
        items = "".join(
            f'<li data-model="{html.escape(r.name)}"><b>{html.escape(r.name)}</b>: skipped: '
            f"{html.escape(r.reason or '')}</li>"
            for r in skipped
        )
        listing = f'<ul id="skipped">{items}</ul>'
    return (
        f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{listing}'
    )


def _dedup(report: Report) -> str:
    """The ``--dedup`` section: the held frames of the run, and each row off and on."""
    held = report.dedup
    if held is None:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in DEDUP_COLUMNS)
    body = []
    for row in report.ok_rows:
        for cells in dedup_cells(row):
            tds = "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
            name = html.escape(row.name)
            body.append(f'<tr class="{row.kind}" data-model="{name}" data-dedup="{cells[1]}">{tds}</tr>')
    pairs = ", ".join(f"{frame} (as {reference})" for frame, reference in held.duplicates) or "none"
    blur = f" of {held.blur}x{held.blur} means" if held.blur > 1 else ""
    other = " or ".join(level for level in DEDUP_LEVELS if level != held.level)
    return f"""
<h2>Held frames (--dedup)</h2>
<p id="dedup-found">{held.upscaled} of the run's {held.frames} frames are upscaled with
<code>--dedup --dedup-level {html.escape(held.level)}</code>; the others repeat the last frame
upscaled and show its upscale: {html.escape(pairs)}. Found by the detector of <code>esrfarm upscale
--dedup</code> on the whole frames' {html.escape(held.samples)} samples, as a job decodes them
({held.block}x{held.block} windows{blur}, threshold {held.threshold:g} levels, mean shift
{held.shift_threshold:g}), in {held.seconds:.2g} s; the run's first frame is always upscaled. The
other level is measured by running the comparison again with <code>--dedup-level
{html.escape(other)}</code>.</p>
<table id="dedup"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<p>Each model upscaled the run without <code>--dedup</code> (off) and with it (on).
<b>Frames upscaled</b>: how many went through the model, and their share. <b>Seconds</b>: the
model's time on the run's frames after the first (the warm-up), on: plus the detector's; on/off
below 1 is faster (a job also decodes the video once more for the detector, and its decoding and
encoding do not shrink). <b>PSNR vs off</b> (luma, dB): the worst output frame with
<code>--dedup</code> against the same frame without it, then the run as a whole (the PSNR of the
mean squared error over all frames); a frame upscaled either way is the same, so only the reused
frames lower it, by what differs between a held frame and the frame it repeats (on Big Buck Bunny
held and re-encoded at CRF 18 to 28, compression noise: 44 to 47 dB at worst); a low worst frame
says a reused frame shows a change: look at that frame. <b>Flicker</b> as in the results (against
bicubic): a reused upscale cannot vary from the frame it repeats, so on is usually as steady or
steadier.</p>"""


def _figure(png: bytes, caption: str, size: int) -> str:
    return (
        f'<figure><img src="{_data_uri(png)}" width="{size}" height="{size}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _crops(report: Report) -> str:
    images, crop = report.images, report.crop
    figures = []
    if images.input_crop is not None:
        figures.append(_figure(images.input_crop, f"input, each pixel repeated x{report.scale}", crop.width))
    for row in report.ok_rows:
        png = images.crops.get(row.name)
        if png is not None:
            figures.append(_figure(png, row.name, crop.width))
    return (
        f"<p>The most detailed square (highest luma variance) of the upscaled frame {report.slider_frame}: "
        f"{crop.width}x{crop.height} output pixels at ({crop.left}, {crop.top}), at 100% (one output pixel "
        "per screen pixel).</p>"
        f'<div class="grid" id="crop-grid">{"".join(figures)}</div>'
    )


def _slider(report: Report) -> str:
    images, box = report.images, report.slider
    if images.slider_before is None or images.slider_after is None:
        return "<p>No image to compare.</p>"
    name = html.escape(images.slider_after_name or "")
    return (
        f"<p>Frame {report.slider_frame}, {box.width}x{box.height} output pixels around the crops: "
        f"<b>{name}</b> (the model with the best VMAF NEG) left of the handle, bicubic right of it. "
        "Drag the slider.</p>"
        f'<div class="ba-labels" style="width:{box.width}px"><span>{name}</span><span>bicubic</span></div>'
        f'<div class="ba" style="width:{box.width}px;height:{box.height}px">'
        f'<img id="ba-before" src="{_data_uri(images.slider_before)}" width="{box.width}" '
        f'height="{box.height}" alt="bicubic">'
        f'<div class="after" id="ba-after"><img src="{_data_uri(images.slider_after)}" width="{box.width}" '
        f'height="{box.height}" alt="{name}"></div></div>'
        f'<input type="range" id="ba-range" min="0" max="100" value="50" style="width:{box.width}px" '
        f'aria-label="share of the frame shown from {name}">'
    )


def _method(report: Report) -> str:
    fw, fh = report.fidelity_size
    scale = report.scale
    region = ""
    if report.region is not None:
        r = report.region
        placed = " (placed on the most detailed area)" if report.region_automatic else ""
        region = (
            f" Only the region {r.width}x{r.height} at ({r.left}, {r.top}) of each frame was used{placed}: "
            "fps at the video's size and the projected time are the measured speed scaled by the ratio of "
            "pixel counts (these networks cost in proportion to pixels)."
        )
    shift = f"within {report.max_shift:g} pixel, in steps of {report.shift_step:g}"
    return f"""
<dl>
<dt>Fidelity (PSNR, SSIM, VMAF, VMAF NEG)</dt>
<dd>No higher-resolution original exists, so each frame of the run is downscaled x{scale} (antialiased
bicubic), upscaled back by the model and compared with the frame itself, {fw}x{fh} pixels after leaving out
{BORDER} pixels at each edge. PSNR (dB) and SSIM are on luma (BT.601 Y, as the super-resolution benchmarks
compute them); VMAF and VMAF NEG come from libvmaf (models vmaf_v0.6.1 and vmaf_v0.6.1neg). Before scoring,
the output is moved by the sub-pixel shift ({shift}) that best matches the frame on its most detailed
square; the "shift" column shows it (x, y; 0: none). This protocol favours smooth, faithful models: PSNR and
SSIM reward the average of what could be there, so GAN-trained models, which invent plausible texture,
score lower although they may look sharper; the bicubic and Lanczos baselines resize with (nearly) the
kernel that degraded the frames, which favours them further. Plain VMAF rewards sharpening; VMAF NEG does
not credit enhancement beyond the original, which is why the best model is named by VMAF NEG.</dd>
<dt>Flicker</dt>
<dd>The mean squared frame-to-frame change of the model's output luma divided by that of a bicubic upscale of
the same frames: 1 means it changes from frame to frame as much as bicubic does; above 1 it adds temporal
change the input does not have (flicker, shimmering texture; sharper moving edges also add some).</dd>
<dt>Speed</dt>
<dd>Frames per second of the model alone (frames in memory to frames in memory, on the device named below),
on the real frames of the run; the first frame is a warm-up and is not timed. Projected: the time for all
{report.frame_count} frames of the video at that speed, without decoding and encoding.{region}</dd>
<dt>The look</dt>
<dd>The crops and the slider show the real upscale of the real frames (not the degraded copy).</dd>
</dl>"""


def _machine_line(report: Report) -> str:
    m = report.machine
    device = m.device + (f" {m.precision}" if m.precision else "")
    text = (
        f"Ran on {m.host} ({m.cpu}, {m.cpu_count} CPUs), device {device}; torch {m.torch or '-'}, "
        f"ffmpeg {m.ffmpeg}, esrfarm {m.esrfarm} at commit {m.commit}; {report.created}, "
        f"{format_seconds(report.elapsed_s)}."
    )
    return html.escape(text)


def render_html(report: Report) -> str:
    """The whole report as one HTML document."""
    name = html.escape(Path(report.input).name)
    best = report.best.name if report.best else None
    r = report.region
    region = f", region {r.width}x{r.height}+{r.left}+{r.top}" if r else ""
    meta = html.escape(
        f"{report.input}: {report.width}x{report.height}, {report.frame_count} frames at {report.frame_rate} "
        f"fps ({report.duration_s:.2f} s). Frames {report.run[0]}-{report.run[1]} compared (drawn with seed "
        f"{report.seed} from frames {report.window[0]}-{report.window[1]}){region}, x{report.scale}."
    )
    verdict_html = " ".join(html.escape(line) for line in verdict(report))
    footer = _machine_line(report)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>esrfarm compare: {name}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Which model for {name}?</h1>
<p class="meta">{meta}</p>
<section id="verdict"><p>{verdict_html}</p></section>
<h2>Results</h2>
{_table(report)}
{_dedup(report)}
<h2>Speed and quality</h2>
<p>Up and to the right is better. The ring marks the best by VMAF NEG; the fastest within
{NEAR_BEST_POINTS:g} point of it is the rightmost point that high.</p>
{render_chart(report.ok_rows, best)}
<h2>The look</h2>
{_crops(report)}
<h2>Before and after</h2>
{_slider(report)}
<h2>How to read this</h2>
{_method(report)}
<footer id="machine">{footer}</footer>
<script>{_SCRIPT}</script>
</body>
</html>
"""
