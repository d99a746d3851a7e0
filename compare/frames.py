"""The frames a comparison looks at: a contiguous run read from the video, degraded copies, baselines.

:func:`read_run` decodes frames ``first .. first+count-1`` with the coordinator's own RGB conversion
(:func:`media.extract.rgb_filter`: the pixels ``esrfarm upscale`` gives the model), seeking
to the run instead of decoding the video from its start. :func:`degrade` is the "degrade" half of
the degrade-then-restore protocol; :class:`PillowUpscaler` gives the bicubic and Lanczos baselines.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import numpy as np
from PIL import Image

from manifests.colour import i420_shape
from media.errors import FFmpegError, InputError
from media.extract import YUV_SOURCE_FORMATS, rgb_filter
from media.ffmpeg import FFmpegProcess
from media.probe import MediaInfo


class FrameUpscaler(Protocol):
    """What a comparison runs: ``(N, H, W, 3)`` uint8 in, ``(N, H*s, W*s, 3)`` uint8 out.

    :class:`worker.runtime.Upscaler` (loaded with the comparison's scale) is one, and so is
    :class:`PillowUpscaler`.
    """

    def upscale(self, frames: np.ndarray) -> np.ndarray: ...


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
BASELINES = tuple(RESAMPLING)


@dataclass(frozen=True)
class PillowUpscaler:
    """A classical resize by Pillow (``bicubic`` or ``lanczos``), frame by frame."""

    name: str
    scale: int

    def __post_init__(self) -> None:
        if self.name not in RESAMPLING:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {self.name!r}")

    def upscale(self, frames: np.ndarray) -> np.ndarray:
        return resize_frames(frames, frames.shape[1] * self.scale, frames.shape[2] * self.scale, self.name)


def resize_frames(frames: np.ndarray, height: int, width: int, method: str = "bicubic") -> np.ndarray:
    """Each ``(H, W, 3)`` uint8 frame resized to ``height`` x ``width`` with Pillow.

    Pillow widens its filter by the reduction factor when shrinking, so downscaling is antialiased.
    """
    resample = RESAMPLING[method]
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        out[index] = np.asarray(Image.fromarray(frame).resize((width, height), resample))
    return out


def degrade(frames: np.ndarray, scale: int) -> np.ndarray:
    """Frames of a multiple of ``scale`` in size, downscaled by ``scale`` (antialiased bicubic)."""
    _, height, width, _ = frames.shape
    if height % scale or width % scale:
        raise ValueError(f"frames of {width}x{height} are not a multiple of the scale {scale}")
    return resize_frames(frames, height // scale, width // scale, "bicubic")


def choose_run(window: range, count: int, seed: int) -> range:
    """``count`` contiguous frame indexes inside ``window``, at a position drawn with ``seed``."""
    if count > len(window):
        raise ValueError(f"a run of {count} frames does not fit in a window of {len(window)}")
    offset = random.Random(seed).randrange(len(window) - count + 1)
    return range(window.start + offset, window.start + offset + count)


def frame_times(info: MediaInfo) -> list[Fraction]:
    """Each frame's time in seconds from the first frame (display order)."""
    video = info.video
    first = video.frame_pts[0]
    return [(pts - first) * video.time_base for pts in video.frame_pts]


def _seek_seconds(info: MediaInfo, index: int) -> Fraction | None:
    """The ``-ss`` that makes ffmpeg's first decoded frame frame ``index`` (0-based): halfway
    between it and the frame before, on ffmpeg's input timeline (the container's start time is 0)."""
    if index == 0:
        return None
    video = info.video
    halfway = Fraction(video.frame_pts[index] + video.frame_pts[index - 1], 2) * video.time_base
    return max(Fraction(0), halfway - info.start_time)


def read_run(info: MediaInfo, run: range, *, yuv: bool = False) -> np.ndarray:
    """Frames ``run`` (0-based, contiguous) of the probed video as ``(N, H, W, 3)`` uint8 RGB, or with
    ``yuv`` as the decoder's own planar 4:2:0 samples, unconverted (``(N, H * 3/2, W)``, uint16 above
    8 bits: what :func:`media.extract.decode_frames` gives a job with YUV frames).

    ffmpeg seeks (accurately: it decodes from the keyframe before and drops what precedes the seek
    point) to halfway before the first frame of the run, so only the run and its GOP are decoded.
    """
    if run.step != 1 or not run or run.start < 0 or run.stop > info.video.frame_count:
        raise ValueError(f"frames {run} are not a contiguous run of the video's {info.video.frame_count}")
    video = info.video
    if yuv and video.pix_fmt not in YUV_SOURCE_FORMATS:
        raise ValueError(f"{video.pix_fmt} frames are not planar YUV 4:2:0")
    seek = _seek_seconds(info, run.start)
    args = ["-noautorotate"]
    if seek is not None:
        args += ["-ss", f"{float(seek):.6f}"]
    output = ["-pix_fmt", str(video.pix_fmt)] if yuv else ["-vf", rgb_filter(video), "-pix_fmt", "rgb24"]
    args += [
        "-i", str(info.path), "-map", f"0:{video.index}", "-an", "-sn", "-dn", "-frames:v", str(len(run)),
        "-fps_mode", "passthrough", *output, "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip
    shape = i420_shape(video.height, video.width) if yuv else (video.height, video.width, 3)
    dtype = np.dtype("<u2") if yuv and video.high_depth else np.dtype(np.uint8)
    frame_bytes = math.prod(shape) * dtype.itemsize
    out = np.empty((len(run), *shape), dtype=dtype)
    read = 0
    with FFmpegProcess(args, action=f"decoding frames of {info.path}", stdout=True) as ffmpeg:
        while read < len(run):
            data = ffmpeg.stdout.read(frame_bytes)
            if len(data) != frame_bytes:
                break
            out[read] = np.frombuffer(data, dtype=dtype).reshape(shape)
            read += 1
        try:
            ffmpeg.finish()
        except FFmpegError as exc:
            raise InputError(info.path, f"could not be decoded: {exc.last_line}") from exc
    if read != len(run):
        first, last = run.start + 1, run.stop
        raise InputError(info.path, f"gave {read} of its frames {first}-{last} when decoded")
    return out
