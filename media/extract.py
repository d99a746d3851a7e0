"""Decode the input video into RGB frames: in memory (:func:`decode_frames`) or as files in a
job's ``input/`` directory (:func:`extract_frames`).

One decoder for both: the ffmpeg binary, ``-fps_mode passthrough`` (exactly one RGB frame per
decoded frame: nothing resampled, dropped or duplicated), ``-noautorotate`` (frames stay in coded
orientation; the rotation travels as metadata to the output), converting YUV to 8-bit RGB with the
matrix and range of :attr:`VideoInfo.conversion <media.probe.VideoInfo.conversion>` (the
source's tags, or the documented guess) and accurate rounding. ffmpeg writes raw ``rgb24`` to a
pipe; a small thread pool encodes PNG / ``.npy`` files. A source with more than 8 bits per sample
(:attr:`VideoInfo.high_depth <media.probe.VideoInfo.high_depth>`: 10-bit, 12-bit, p010...)
is converted to ``rgb48le`` instead, and its frames are uint16 ``.npy`` files: nothing is rounded
to 8 bits.

Why the binary rather than PyAV in-process: measured on a 2-core machine with a 1280x720
H.264 clip (132 frames), the binary + pipe is faster for both formats (it decodes in its own
process while Python threads compress PNGs): PNG level 1 25.6 fps vs 15-17 fps, NPY 106 fps vs
81 fps.

Every frame file is written by :mod:`manifests.frames` under a temporary name in the same directory
and renamed into place, so a crash never leaves a truncated frame under its final name.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np

from manifests.colour import i420_shape
from manifests.frames import write_frame
from manifests.layout import FrameFormat, frame_filename
from media.cputime import METER
from media.errors import FFmpegError, InputError
from media.ffmpeg import FFmpegProcess
from media.probe import MediaInfo, VideoInfo, probe

log = logging.getLogger(__name__)

#: swscale flags for YUV -> RGB: bicubic chroma upsampling, full horizontal chroma interpolation,
#: accurate rounding (costs ~4 ms per 720p frame; the model sees these pixels).
SCALE_FLAGS = "bicubic+accurate_rnd+full_chroma_int"
DEFAULT_PNG_COMPRESSION = 1

ProgressCallback = Callable[[int], None]
"""Called as ``progress(done)`` (frames written or skipped so far, in order) from the calling thread."""

FrameGate = Callable[[int], bool]
"""Called as ``gate(index)`` before frame ``index`` is written: False skips the frame, and the call
may block (back pressure: ffmpeg then waits on its full pipe)."""

FrameDone = Callable[[int], None]
"""Called as ``on_frame(index)`` once frame ``index`` is on disk under its final name, or skipped;
from a writer thread, in no particular order (frames before a blocking gate are reported too)."""


def rgb_pix_fmt(video: VideoInfo) -> str:
    """The RGB format frames of this video are decoded to: ``rgb24``, or ``rgb48le`` above 8 bits."""
    return "rgb48le" if video.high_depth else "rgb24"


def rgb_filter(video: VideoInfo) -> str:
    """The ffmpeg filter that turns this video's decoded frames into :func:`rgb_pix_fmt` frames."""
    conversion = video.conversion
    return (
        f"scale=w={video.width}:h={video.height}:in_color_matrix={conversion.scale_matrix}"
        f":in_range={conversion.range}:flags={SCALE_FLAGS},format={rgb_pix_fmt(video)}"
    )


#: Source pixel formats whose frames can be stored as they are decoded (planar YUV 4:2:0, 8 to 12
#: bits), with the bits each holds: a job of such a source may keep YUV frames (no conversion here).
YUV_SOURCE_FORMATS = {"yuv420p": 8, "yuv420p10le": 10, "yuv420p12le": 12}


def decode_frames(source: MediaInfo | str | Path, *, yuv: bool = False) -> Iterator[np.ndarray]:
    """Yield the input's frames as (H, W, 3) RGB arrays, frame 1 first: uint8, or uint16 for a
    source of more than 8 bits per sample.

    Exactly the pixels :func:`extract_frames` writes ("the decoded input frame i"). ``source`` is a
    :class:`MediaInfo` from :func:`probe`, or a path (probed here). With ``yuv``, the frames are the
    decoder's own planar 4:2:0 samples, unconverted, as ``(H * 3 / 2, W)`` arrays (the source's
    pixel format must be one of :data:`YUV_SOURCE_FORMATS`). Raises :class:`InputError` if ffmpeg
    reports a decoding error.
    """
    info = source if isinstance(source, MediaInfo) else probe(source)
    video = info.video
    dtype = np.dtype("<u2") if video.high_depth else np.dtype(np.uint8)
    if yuv:
        if video.pix_fmt not in YUV_SOURCE_FORMATS:
            raise ValueError(f"{video.pix_fmt} frames are not planar YUV 4:2:0")
        shape: tuple[int, ...] = i420_shape(video.height, video.width)
        # The decoder's samples as they are: no filter, no conversion (the worker's device converts).
        output = ["-f", "rawvideo", "-pix_fmt", video.pix_fmt, "pipe:1"]
    else:
        shape = (video.height, video.width, 3)
        output = ["-vf", rgb_filter(video), "-f", "rawvideo", "-pix_fmt", rgb_pix_fmt(video), "pipe:1"]
    frame_bytes = math.prod(shape) * dtype.itemsize
    args = [
        "-noautorotate", "-i", str(info.path), "-map", f"0:{video.index}", "-an", "-sn", "-dn",
        "-fps_mode", "passthrough", "-enc_time_base:v", _ratio(video.time_base), *output,
    ]  # fmt: skip
    with FFmpegProcess(args, action=f"decoding {info.path}", stdout=True, stage="decode") as ffmpeg:
        while True:
            with METER.measure("extract_read"):
                data = ffmpeg.stdout.read(frame_bytes)
            if not data:
                break
            if len(data) != frame_bytes:
                raise InputError(info.path, "could not be decoded: ffmpeg stopped in the middle of a frame")
            yield np.frombuffer(data, dtype=dtype).reshape(shape)
        try:
            stderr = ffmpeg.finish()
        except FFmpegError as exc:
            raise InputError(info.path, f"is corrupt: decoding failed ({exc.last_line})") from exc
    if stderr.strip():
        first = stderr.strip().splitlines()[0]
        raise InputError(info.path, f"is corrupt: ffmpeg reported a decoding error ({first})")


def _ratio(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def extract_frames(
    info: MediaInfo,
    input_dir: str | Path,
    *,
    frame_format: FrameFormat = FrameFormat.PNG,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    fsync: bool = False,
    gate: FrameGate | None = None,
    on_frame: FrameDone | None = None,
) -> int:
    """Write every frame of the probed input to ``input_dir`` as ``frame_filename(i, frame_format)``
    (``00000001.png``, ...), and return how many were decoded.

    ``gate(index)``, if given, decides frame by frame whether to write it, and may block to hold
    extraction back (a streaming job admits frames only as disk space is freed); ``on_frame(index)``
    reports each frame written or skipped as soon as that is so.

    ``png_compression`` is zlib's level 0-9 (1: fast, about half the size of 0). ``threads`` PNG /
    NPY writers run beside ffmpeg (default: the CPU count, at most 4). ``fsync`` flushes each
    file to disk before its rename. Raises :class:`InputError` if decoding fails or yields a
    different number of frames than the probe counted.
    """
    if not 0 <= png_compression <= 9:
        raise ValueError(f"png_compression must be between 0 and 9, not {png_compression}")
    directory = Path(input_dir)
    directory.mkdir(parents=True, exist_ok=True)
    total = info.video.frame_count
    workers = threads or min(4, os.cpu_count() or 1)
    pending: deque[Future[None]] = deque()
    written = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="extract") as pool:
        try:
            frames = decode_frames(info, yuv=frame_format is FrameFormat.YUV)
            for index, frame in enumerate(frames, start=1):
                if gate is not None and not gate(index):
                    skipped: Future[None] = Future()
                    skipped.set_result(None)
                    pending.append(skipped)
                    if on_frame is not None:
                        on_frame(index)
                else:
                    path = directory / frame_filename(index, frame_format)
                    pending.append(
                        pool.submit(
                            _write_and_report,
                            path,
                            frame,
                            frame_format,
                            png_compression,
                            fsync,
                            index,
                            on_frame,
                        )
                    )
                while len(pending) > 2 * workers:
                    written = _finish_one(pending, written, progress)
            while pending:
                written = _finish_one(pending, written, progress)
        finally:
            for future in pending:
                future.cancel()
    if written != total:
        raise InputError(
            info.path, f"is corrupt: {written} video frames could be decoded, the probe counted {total}"
        )
    log.info("extracted %d frames from %s into %s", written, info.path, directory)
    return written


def _write_and_report(
    path: Path,
    frame: np.ndarray,
    frame_format: FrameFormat,
    png_compression: int,
    fsync: bool,
    index: int,
    on_frame: FrameDone | None,
) -> None:
    with METER.measure("extract_write"):
        write_frame(path, frame, frame_format, png_compression=png_compression, fsync=fsync)
    if on_frame is not None:
        on_frame(index)


def _finish_one(pending: deque[Future[None]], written: int, progress: ProgressCallback | None) -> int:
    pending.popleft().result()
    written += 1
    if progress is not None:
        progress(written)
    return written
