"""VMAF and VMAF NEG through the libvmaf filter of the ffmpeg binary (:mod:`media.ffmpeg`).

The ffmpeg shipped by ``imageio-ffmpeg`` is built with libvmaf and its built-in models, so nothing is
downloaded: ``vmaf_v0.6.1`` (plain VMAF) and ``vmaf_v0.6.1neg`` (the "no enhancement gain" model,
which does not reward sharpening or contrast enhancement beyond the reference).

The frames go to ffmpeg as raw RGB files, are converted to YUV 4:4:4 with the video's own matrix
(studio range), and are scored as one sequence (VMAF's motion feature looks at consecutive frames,
so the frames should be a contiguous run). Each score is libvmaf's mean over the frames.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from compare.spec import CompareError
from media.ffmpeg import run_ffmpeg

MODELS = {"vmaf": "vmaf_v0.6.1", "vmaf_neg": "vmaf_v0.6.1neg"}
#: The smallest frame side scored: libvmaf's multi-scale features shrink the frame four times, and the
#: bundled ffmpeg crashed (SIGSEGV) on 16x16 frames here.
MIN_SIDE = 32
DEFAULT_TIMEOUT_S = 600.0


class VmafError(CompareError, RuntimeError):
    """libvmaf did not give scores (ffmpeg failed, or its log could not be read)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"VMAF could not be computed: {reason}")


@dataclass(frozen=True)
class VmafScores:
    """Mean VMAF and VMAF NEG over the frames, and each frame's scores."""

    vmaf: float
    vmaf_neg: float
    vmaf_frames: tuple[float, ...]
    vmaf_neg_frames: tuple[float, ...]


def vmaf_scores(
    reference: np.ndarray,
    distorted: np.ndarray,
    *,
    matrix: str = "bt709",
    threads: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> VmafScores:
    """Score ``(N, H, W, 3)`` uint8 RGB ``distorted`` frames against ``reference`` (same shape).

    ``matrix`` is the scale filter's colour matrix name (``bt709``, ``bt601``, ``bt2020``).
    """
    if reference.shape != distorted.shape or reference.ndim != 4 or reference.shape[3] != 3:
        shapes = f"{reference.shape} and {distorted.shape}"
        raise ValueError(f"VMAF takes two (N, H, W, 3) arrays of one shape, not {shapes}")
    count, height, width, _ = reference.shape
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"VMAF needs frames of at least {MIN_SIDE}x{MIN_SIDE} pixels, not {width}x{height}")
    n_threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="esrfarm-vmaf-") as tmp:
        folder = Path(tmp)
        ref_path, dist_path, log_path = folder / "ref.rgb", folder / "dist.rgb", folder / "vmaf.json"
        np.ascontiguousarray(reference).tofile(ref_path)
        np.ascontiguousarray(distorted).tofile(dist_path)
        raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "25"]
        to_yuv = f"scale=out_color_matrix={matrix}:out_range=tv,format=yuv444p"
        models = "|".join(f"version={version}\\\\:name={name}" for name, version in MODELS.items())
        graph = (
            f"[0:v]{to_yuv}[dist];[1:v]{to_yuv}[ref];"
            f"[dist][ref]libvmaf=model={models}:log_fmt=json:log_path={log_path}:n_threads={n_threads}"
        )
        args = [*raw, "-i", str(dist_path), *raw, "-i", str(ref_path), "-lavfi", graph, "-f", "null", "-"]
        run_ffmpeg(args, action="computing VMAF", timeout=timeout_s)
        try:
            result = orjson.loads(log_path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise VmafError(f"libvmaf's log {log_path.name} could not be read ({exc})") from exc
    frames = result.get("frames", [])
    if len(frames) != count:
        raise VmafError(f"libvmaf scored {len(frames)} frames, {count} were given")
    try:
        per_frame = {name: tuple(float(f["metrics"][name]) for f in frames) for name in MODELS}
        pooled = {name: float(result["pooled_metrics"][name]["mean"]) for name in MODELS}
    except (KeyError, TypeError, ValueError) as exc:
        raise VmafError(f"libvmaf's log lacks a score ({exc!r})") from exc
    return VmafScores(
        vmaf=pooled["vmaf"],
        vmaf_neg=pooled["vmaf_neg"],
        vmaf_frames=per_frame["vmaf"],
        vmaf_neg_frames=per_frame["vmaf_neg"],
    )
