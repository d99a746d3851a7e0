"""Run a comparison: every model on the same frames of the user's video, measured the same way.

For a :class:`~compare.spec.CompareSpec`, :func:`run_comparison`:

1. probes the input and reads one contiguous run of frames, drawn with the seed from the window
   (and cut to the region, if one is given);
2. **fidelity** (degrade, then restore): the run, cropped to a multiple of the scale, is
   downscaled by the scale (antialiased bicubic), upscaled back by each model and compared with
   the original frames: PSNR and SSIM on luma, VMAF and VMAF NEG (libvmaf), after a small search
   for the sub-pixel shift that best aligns the model's output, with a border left out;
3. **flicker**, **speed** and **the look** on the real upscale of the run: the ratio of the
   output's frame-to-frame difference energy to a bicubic upscale's, frames per second of the
   model alone (the first frame, a warm-up, is not timed), and crops of the most detailed area;
4. with ``dedup``, the held frames of the run found once by the job's detector, then for each row
   the run upscaled as ``esrfarm upscale --dedup`` would, against the same row without it
   (:mod:`compare.dedup`).

A model that cannot load, cannot serve the scale or fails while upscaling becomes a skipped row
with the reason; nothing about one model stops the others.
"""

from __future__ import annotations

import datetime
import gc
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from compare.dedup import HeldFrames, find_held_frames, upscale_with_dedup
from compare.frames import (
    BASELINES,
    FrameUpscaler,
    PillowUpscaler,
    choose_run,
    degrade,
    frame_times,
    read_run,
)
from compare.machine import describe_machine
from compare.metrics import (
    Box,
    flicker_ratio,
    luma,
    most_detailed_box,
    psnr,
    search_shift,
    shift_frames,
    ssim,
    temporal_energy,
)
from compare.results import Kind, Machine, ModelResult, Report, ReportImages
from compare.spec import BORDER, MIN_INPUT_SIDE, CompareError, CompareSpec
from compare.vmaf import VmafScores, vmaf_scores
from manifests.dedup import dedup_level
from media.probe import MediaInfo, probe
from worker.models import CATALOG, ModelLoadError, locate
from worker.runtime import InferenceError, RuntimeSettings, load_upscaler, select_device
from worker.upscaling import settings_from

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str], None]
"""Called with one line of text as each step starts (the CLI logs it; a service can raise from it
to cancel the comparison)."""

#: Edge of the (most detailed) square the shift search looks at, in reference pixels.
SEARCH_SIDE = 128
#: The before/after slider shows at most this much of the upscaled frame (output pixels).
SLIDER_MAX = (540, 960)


def default_models() -> tuple[str, ...]:
    """Every catalog model that loads without a download, then the baselines."""
    offline = [
        spec.name for spec in CATALOG.values() if locate(spec).would_load_from.split()[0] != "download"
    ]
    return (*offline, *BASELINES)


def frame_window(info: MediaInfo, start: float | None, duration: float | None) -> range:
    """The frames (0-based) shown from ``start`` for ``duration`` seconds, timed from the first frame."""
    times = frame_times(info)
    # Seconds as the user wrote them (0.4 is 2/5, not the float just above it), compared exactly.
    begin = Fraction(repr(start or 0.0))
    end = None if duration is None else begin + Fraction(repr(duration))
    inside = [i for i, t in enumerate(times) if begin <= t and (end is None or t < end)]
    if not inside:
        last, until = float(times[-1]), "the end" if end is None else f"{float(end):g} s"
        raise CompareError(
            f"input {info.path} has no frame between {float(begin):g} s and {until} "
            f"(its last frame is at {last:.3f} s)"
        )
    return range(inside[0], inside[-1] + 1)


@dataclass(frozen=True)
class _Run:
    """Everything every row shares: the frames, the degraded frames, the boxes."""

    frames: np.ndarray  # the run (region cut), (N, H, W, 3)
    reference: np.ndarray  # the run cropped to a multiple of the scale
    degraded: np.ndarray
    reference_scored: np.ndarray  # the reference inside the scoring border
    reference_luma: np.ndarray
    score_box: Box
    search_box: Box
    search_frames: tuple[int, ...]
    crop: Box  # in output pixels
    slider: Box  # in output pixels
    middle: int
    bicubic_energy: float
    pixel_factor: float  # full frame pixels / pixels run
    held: HeldFrames | None  # --dedup: the run's held frames (found on whole frames)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _place_region(spec: CompareSpec, info: MediaInfo, frames: np.ndarray, middle: int) -> Box | None:
    region = spec.region
    height, width = info.video.height, info.video.width
    if region is None:
        if min(height, width) < MIN_INPUT_SIDE:
            raise CompareError(
                f"input {info.path} has frames of {width}x{height}; a comparison needs at least "
                f"{MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}"
            )
        return None
    if region.width > width or region.height > height:
        raise CompareError(f"region {region} is larger than the {width}x{height} frame")
    if region.x is None or region.y is None:
        return most_detailed_box(luma(frames[middle]), region.height, region.width)
    if region.x + region.width > width or region.y + region.height > height:
        raise CompareError(f"region {region} does not fit in the {width}x{height} frame")
    return Box(region.y, region.x, region.height, region.width)


def _prepare(
    spec: CompareSpec, info: MediaInfo, frames: np.ndarray, region: Box | None, held: HeldFrames | None
) -> _Run:
    scale = spec.scale
    if region is not None:
        frames = np.ascontiguousarray(region.cut_frames(frames))
    count, height, width, _ = frames.shape
    middle = count // 2
    reference = np.ascontiguousarray(frames[:, : height // scale * scale, : width // scale * scale])
    ref_h, ref_w = reference.shape[1:3]
    score_box = Box(BORDER, BORDER, ref_h - 2 * BORDER, ref_w - 2 * BORDER)
    reference_scored = score_box.cut_frames(reference)
    search_side = min(SEARCH_SIDE, score_box.height, score_box.width)
    search_box = most_detailed_box(luma(reference[middle]), search_side, search_side, within=score_box)

    crop_in = min(math.ceil(spec.crop / scale), height, width)
    crop = most_detailed_box(luma(frames[middle]), crop_in, crop_in).scaled(scale)
    slider_h, slider_w = min(height * scale, SLIDER_MAX[0]), min(width * scale, SLIDER_MAX[1])
    centre_y, centre_x = crop.top + crop.height // 2, crop.left + crop.width // 2
    slider = Box(
        min(max(0, centre_y - slider_h // 2), height * scale - slider_h),
        min(max(0, centre_x - slider_w // 2), width * scale - slider_w),
        slider_h,
        slider_w,
    )
    bicubic = PillowUpscaler("bicubic", scale).upscale(frames)
    return _Run(
        frames=frames,
        reference=reference,
        degraded=degrade(reference, scale),
        reference_scored=reference_scored,
        reference_luma=luma(reference_scored),
        score_box=score_box,
        search_box=search_box,
        search_frames=tuple(sorted({0, middle, count - 1})),
        crop=crop,
        slider=slider,
        middle=middle,
        bicubic_energy=temporal_energy(bicubic),
        pixel_factor=(info.video.width * info.video.height) / (height * width),
        held=held,
    )


@dataclass
class _Upscaled:
    """A row and the pictures it contributes."""

    row: ModelResult
    crop: np.ndarray | None = None
    slider: np.ndarray | None = None


@dataclass(frozen=True)
class _Fidelity:
    """A row's degrade-then-restore scores."""

    psnr_frames: tuple[float, ...]
    ssim_frames: tuple[float, ...]
    vmaf: VmafScores
    shift: tuple[float, float]
    gain_db: float


def _fidelity(upscaler: FrameUpscaler, spec: CompareSpec, run: _Run, info: MediaInfo) -> _Fidelity:
    restored = upscaler.upscale(run.degraded)
    found = search_shift(
        [luma(run.reference[i]) for i in run.search_frames],
        [luma(restored[i]) for i in run.search_frames],
        run.search_box,
        max_shift=spec.max_shift,
        step=spec.shift_step,
    )
    scored = run.score_box.cut_frames(shift_frames(restored, found.dy, found.dx))
    scored_luma = luma(scored)
    vmaf = vmaf_scores(
        run.reference_scored,
        scored,
        matrix=info.video.conversion.scale_matrix,
        threads=spec.cpu_threads,
        timeout_s=spec.vmaf_timeout_s,
    )
    gain = (
        10 * math.log10(found.mse_unshifted / found.mse) if found.mse > 0 and found.mse_unshifted > 0 else 0.0
    )
    return _Fidelity(
        psnr_frames=tuple(psnr(r, s) for r, s in zip(run.reference_luma, scored_luma, strict=True)),
        ssim_frames=tuple(ssim(r, s) for r, s in zip(run.reference_luma, scored_luma, strict=True)),
        vmaf=vmaf,
        shift=(found.dy, found.dx),
        gain_db=gain,
    )


def _measure(
    name: str,
    kind: Kind,
    description: str,
    upscaler: FrameUpscaler,
    spec: CompareSpec,
    run: _Run,
    info: MediaInfo,
    say: ProgressCallback,
) -> _Upscaled:
    say(f"{name}: fidelity on {len(run.degraded)} degraded frames of {_size(run.degraded)}")
    fidelity = _fidelity(upscaler, spec, run, info)

    say(f"{name}: real upscale of {len(run.frames)} frames of {_size(run.frames)} (x{spec.scale})")
    first = upscaler.upscale(run.frames[:1])  # warm-up: not timed
    started = time.perf_counter()
    rest = upscaler.upscale(run.frames[1:])
    elapsed = time.perf_counter() - started
    real = np.concatenate([first, rest])
    fps_measured = (len(run.frames) - 1) / elapsed if elapsed > 0 else math.inf
    fps = fps_measured / run.pixel_factor
    dedup = None
    if run.held is not None:
        say(f"{name}: --dedup: {len(run.held.upscaled)} of {len(run.frames)} frames upscaled")
        dedup = upscale_with_dedup(upscaler, run.frames, run.held, real, elapsed, run.bicubic_energy)
    row = ModelResult(
        name=name,
        kind=kind,
        status="ok",
        description=description,
        psnr=float(np.mean(fidelity.psnr_frames)),
        ssim=float(np.mean(fidelity.ssim_frames)),
        vmaf=fidelity.vmaf.vmaf,
        vmaf_neg=fidelity.vmaf.vmaf_neg,
        shift=fidelity.shift,
        shift_gain_db=fidelity.gain_db,
        flicker=flicker_ratio(temporal_energy(real), run.bicubic_energy),
        fps_measured=fps_measured,
        fps=fps,
        projected_s=info.video.frame_count / fps if fps > 0 else None,
        psnr_frames=fidelity.psnr_frames,
        ssim_frames=fidelity.ssim_frames,
        vmaf_frames=fidelity.vmaf.vmaf_frames,
        vmaf_neg_frames=fidelity.vmaf.vmaf_neg_frames,
        dedup=dedup,
    )
    middle = real[run.middle]
    return _Upscaled(row, crop=run.crop.cut(middle).copy(), slider=run.slider.cut(middle).copy())


def _size(frames: np.ndarray) -> str:
    return f"{frames.shape[2]}x{frames.shape[1]}"


def _skipped(name: str, kind: Kind, reason: str) -> _Upscaled:
    log.warning("%s skipped: %s", name, reason)
    return _Upscaled(ModelResult(name=name, kind=kind, status="skipped", reason=reason))


def _label(name: str) -> str:
    """A row's name: the catalog or baseline name, or a model file's stem."""
    return name if name in CATALOG or name in BASELINES else Path(name).stem


def runtime_settings(spec: CompareSpec) -> RuntimeSettings:
    """The model runtime's settings for ``spec``; raises ValueError for a bad device, precision or
    tile, or a device that is not there (a missing GPU is the whole comparison's error)."""
    runtime = settings_from(RuntimeSettings, spec)
    select_device(runtime.device)
    return runtime


def run_comparison(spec: CompareSpec, progress: ProgressCallback | None = None) -> Report:
    """Run ``spec`` and return the :class:`Report` (nothing is written; see :mod:`compare.html`)."""
    started = time.monotonic()

    def say(text: str) -> None:
        log.info("%s", text)
        if progress is not None:
            progress(text)

    runtime = runtime_settings(spec)
    info = probe(spec.input)
    window = frame_window(info, spec.start, spec.duration)
    if len(window) < spec.frames:
        raise CompareError(
            f"input {info.path} has {len(window)} frames in the window (frames {window.start + 1}-"
            f"{window.stop}), fewer than the {spec.frames} asked for"
        )
    frames_run = choose_run(window, spec.frames, spec.seed)
    say(f"reading frames {frames_run.start + 1}-{frames_run.stop} of {info.path}")
    frames = read_run(info, frames_run)
    region = _place_region(spec, info, frames, len(frames_run) // 2)
    held = None
    if spec.dedup:
        say("--dedup: finding the held frames of the run")
        held = find_held_frames(info, frames_run, frames, dedup_level(spec.dedup_level))
    run = _prepare(spec, info, frames, region, held)

    results, machine = _compare_models(spec, runtime, run, info, say)
    if not any(r.row.ok for r in results):
        reasons = "; ".join(f"{r.row.name}: {r.row.reason}" for r in results)
        raise CompareError(f"no model could be compared ({reasons})")
    height, width = run.reference_scored.shape[1:3]
    return Report(
        input=str(info.path),
        width=info.video.width,
        height=info.video.height,
        frame_count=info.video.frame_count,
        frame_rate=info.video.frame_rate_str,
        duration_s=float(info.video.duration),
        scale=spec.scale,
        seed=spec.seed,
        window=(window.start + 1, window.stop),
        run=(frames_run.start + 1, frames_run.stop),
        region=region,
        region_automatic=spec.region is not None and spec.region.x is None,
        fidelity_size=(width, height),
        max_shift=spec.max_shift,
        shift_step=spec.shift_step,
        crop=run.crop,
        slider=run.slider,
        slider_frame=frames_run.start + run.middle + 1,
        machine=machine,
        rows=tuple(r.row for r in results),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        elapsed_s=time.monotonic() - started,
        dedup=held.record(frames_run.start + 1) if held is not None else None,
        images=_images(results, run, spec.scale),
    )


def _compare_models(
    spec: CompareSpec, runtime: RuntimeSettings, run: _Run, info: MediaInfo, say: ProgressCallback
) -> tuple[list[_Upscaled], Machine]:
    """Every model's (and baseline's) row, in the order asked, and where the models ran."""
    models = spec.models or default_models()
    results: list[_Upscaled] = []
    device_name, precision = str(select_device(runtime.device)), None
    for position, name in enumerate(models, start=1):
        kind: Kind = "baseline" if name in BASELINES else "model"
        label = _label(name)
        say(f"[{position}/{len(models)}] {label}")
        if kind == "baseline":
            baseline = PillowUpscaler(name, spec.scale)
            results.append(_measure(label, kind, f"Pillow {name} resize", baseline, spec, run, info, say))
            continue
        try:
            upscaler = load_upscaler(name, runtime, allow_download=spec.allow_download)
        except ModelLoadError as exc:
            results.append(_skipped(label, kind, f"cannot load: {exc}"))
            continue
        device_name, precision = upscaler.device_name, upscaler.precision
        if upscaler.native_scale < spec.scale:
            reason = (
                f"a x{upscaler.native_scale} model cannot serve x{spec.scale} "
                "(its output would only be enlarged by a resize)"
            )
            results.append(_skipped(label, kind, reason))
        else:
            description = f"{upscaler.architecture} x{upscaler.native_scale}"
            try:
                results.append(_measure(label, kind, description, upscaler, spec, run, info, say))
            except (InferenceError, RuntimeError, MemoryError) as exc:
                results.append(_skipped(label, kind, f"failed while upscaling: {exc}"))
        del upscaler
        gc.collect()
    return results, describe_machine(device_name, precision)


def _images(results: list[_Upscaled], run: _Run, scale: int) -> ReportImages:
    ok = [r for r in results if r.row.ok]
    crops = {r.row.name: _png(r.crop) for r in ok if r.crop is not None}
    crop = run.crop
    small = Box(crop.top // scale, crop.left // scale, crop.height // scale, crop.width // scale)
    nearest = np.repeat(np.repeat(small.cut(run.frames[run.middle]), scale, axis=0), scale, axis=1)
    bicubic = PillowUpscaler("bicubic", scale).upscale(run.frames[run.middle : run.middle + 1])[0]
    models = [r for r in ok if r.row.kind == "model"] or ok
    after = max(models, key=lambda r: r.row.vmaf_neg or 0.0)
    return ReportImages(
        crops=crops,
        input_crop=_png(nearest),
        slider_before=_png(run.slider.cut(bicubic)),
        slider_after=_png(after.slider) if after.slider is not None else None,
        slider_after_name=after.row.name,
    )
