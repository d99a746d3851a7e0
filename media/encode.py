"""Encoder settings and the building blocks of the encode that :mod:`media.segments` runs.

::

    frames (PNG / .npy) --read, in order--> PyAV NUT muxer (rawvideo rgb24, exact pts) --pipe-->
    ffmpeg -f nut -i pipe:0 (run_frame_encoder) --> temp file --> checked (packet count) --> renamed

Frames may come from files (PNG / ``.npy``, read ahead on threads: :func:`read_frames`) or from
memory (a worker of the segment transport feeds its upscaled frames as they come); the feed is the
same :class:`FrameFeed` either way.

This module owns :class:`EncodeSettings` (codecs, quality, presets, pixel formats, and the checks
that fail a job up front: :func:`check_encode`), reading frame files, feeding them to ffmpeg, and
the pieces of the ffmpeg command line: the timing and colour of the video encode (used by every
segment) and the carry-over from the source (used once, by the join).

Timing: a CFR source is fed with time base ``1/rate`` and pts ``0, 1, 2...`` (so ``30000/1001``
stays ``30000/1001``); a VFR source with its own time base and per-frame pts. Either way ffmpeg
runs ``-fps_mode passthrough`` with ``-enc_time_base`` equal to that time base, so no frame is
dropped, duplicated or moved. Video keeps its offset from the container start (``-itsoffset``),
so audio stays in sync.

Colour: RGB -> YUV uses the source's matrix and range (:attr:`VideoInfo.conversion`, the same
one extraction used) and the output is tagged with them plus the source's primaries and transfer.
RGB pixel formats (``gbrp``, ``bgr0``, ``rgb24``) skip the conversion: with ``ffv1`` + ``gbrp``
(:meth:`EncodeSettings.lossless`) decoded output frames equal the frames given, bit for bit.

Depth: a source of more than 8 bits per sample has uint16 frames, fed as ``rgb48le``; the output
keeps the source's depth unless ``--pix-fmt`` says otherwise (:func:`settings_for_depth`: libx265
``yuv420p10le`` / ``yuv420p12le``, libx264 and libsvtav1 ``yuv420p10le``, NVENC ``p010le``, ffv1
``gbrp16le``), and an encoder that cannot hold the depth is refused before any frame is upscaled.
HDR10 static metadata (mastering display, content light level) goes into the bitstream (x264's
``mastering-display`` / ``cll``, x265's ``master-display`` / ``max-cll``, SVT-AV1's
``mastering-display`` / ``content-light``); no tone mapping is done anywhere.

Carried over from the source: audio (copied), subtitles (copied or converted), attachments,
chapters, metadata, rotation and SAR.

Nothing half-written ever has a final name (:func:`atomic_output`): ffmpeg writes
``.<name>.<pid>.<token>.part`` in the target's directory; it is renamed only after ffmpeg succeeded
and the video packet count matched, and deleted on any failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import av
import numpy as np

from manifests.atomic import atomic_path
from manifests.frames import frame_size, read_frame
from manifests.layout import HIGH_BIT_DEPTH, FrameFormat, frame_filename
from media.cputime import METER
from media.errors import EncodeSettingsError, FFmpegError, FramesError, MediaError
from media.ffmpeg import FFmpegProcess, available_encoders, encoder_pix_fmts
from media.probe import (
    CONTAINER_FORMATS,
    HdrInfo,
    MediaInfo,
    SubtitleInfo,
    check_output_path,
    pix_fmt_bit_depth,
)

log = logging.getLogger(__name__)

X264_PRESETS = frozenset(
    [
        "ultrafast",
        "superfast",
        "veryfast",
        "faster",
        "fast",
        "medium",
        "slow",
        "slower",
        "veryslow",
        "placebo",
    ]
)
NVENC_PRESETS = frozenset({"p1", "p2", "p3", "p4", "p5", "p6", "p7"})
SVTAV1_PRESETS = frozenset(str(p) for p in range(-1, 14))
#: The suffix of every temporary file beside an output (a segment, the joined video, the output).
PART_SUFFIX = ".part"
RGB_PIX_FMTS = frozenset({"gbrp", "bgr0", "rgb0", "bgr24", "rgb24", "gbrp10le", "gbrp12le", "gbrp16le"})


@dataclass(frozen=True)
class CodecSpec:
    """What esrfarm knows about one encoder: quality option, range, defaults, containers."""

    name: str
    family: str  # h264, hevc, av1, ffv1
    quality_option: str | None  # "-crf", "-cq", or None (lossless-only codecs)
    quality_default: int | None
    quality_max: int
    presets: frozenset[str]
    preset_default: str | None
    pix_fmt_default: str
    containers: frozenset[str]
    needs_gpu: bool = False


_MP4ISH = frozenset({"mp4", "mov", "matroska"})
CODECS: Mapping[str, CodecSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            CodecSpec("libx264", "h264", "-crf", 18, 51, X264_PRESETS, "medium", "yuv420p", _MP4ISH),
            CodecSpec("libx264rgb", "h264", "-crf", 18, 51, X264_PRESETS, "medium", "rgb24", _MP4ISH),
            CodecSpec("libx265", "hevc", "-crf", 20, 51, X264_PRESETS, "medium", "yuv420p", _MP4ISH),
            CodecSpec("libsvtav1", "av1", "-crf", 30, 63, SVTAV1_PRESETS, "8", "yuv420p", _MP4ISH | {"webm"}),
            CodecSpec("ffv1", "ffv1", None, None, 0, frozenset(), None, "gbrp", frozenset({"matroska"})),
            CodecSpec("h264_nvenc", "h264", "-cq", 19, 51, NVENC_PRESETS, "p5", "yuv420p", _MP4ISH, True),
            CodecSpec("hevc_nvenc", "hevc", "-cq", 21, 51, NVENC_PRESETS, "p5", "yuv420p", _MP4ISH, True),
            CodecSpec(
                "av1_nvenc", "av1", "-cq", 30, 51, NVENC_PRESETS, "p5", "yuv420p", _MP4ISH | {"webm"}, True
            ),
        )
    }
)

#: The output pixel format for a source of more than 8 bits, per codec: (most bits held, pix_fmt),
#: the first that holds the source's depth is the default. A codec without one that does is refused.
HIGH_DEPTH_PIX_FMTS: Mapping[str, tuple[tuple[int, str], ...]] = MappingProxyType(
    {
        "libx264": ((10, "yuv420p10le"),),
        "libx264rgb": (),
        "libx265": ((10, "yuv420p10le"), (12, "yuv420p12le")),
        "libsvtav1": ((10, "yuv420p10le"),),
        "ffv1": ((16, "gbrp16le"),),
        "h264_nvenc": ((10, "p010le"),),
        "hevc_nvenc": ((10, "p010le"),),
        "av1_nvenc": ((10, "p010le"),),
    }
)

# Audio codecs that can be copied (not re-encoded) into each container; absent = anything goes.
_AUDIO_COPYABLE: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "mp4": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "opus", "flac", "alac", "dts", "truehd"}),
        "webm": frozenset({"opus", "vorbis"}),
    }
)


@dataclass(frozen=True)
class EncodeSettings:
    """How the output video stream is encoded; validated on construction.

    ``crf`` (``-cq`` for NVENC), ``preset`` and ``pix_fmt`` default per codec (``None``): libx264
    crf 18 / medium / yuv420p, libx265 crf 20 / medium, libsvtav1 crf 30 / preset 8, NVENC cq
    19-30 / p5, ``ffv1`` lossless RGB (``gbrp``; it ignores crf). ``extra_args`` go to ffmpeg
    verbatim after the encoder options (e.g. ``("-x264-params", "aq-mode=3")``).
    """

    codec: str = "libx264"
    crf: int | None = None
    preset: str | None = None
    pix_fmt: str | None = None
    extra_args: Sequence[str] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_args", tuple(self.extra_args))  # a list is fine; stored frozen
        spec = CODECS.get(self.codec)
        if spec is None:
            known = ", ".join(sorted(CODECS))
            raise EncodeSettingsError(f"unknown codec {self.codec!r}; esrfarm encodes with {known}")
        if self.crf is not None and spec.quality_option is not None and not 0 <= self.crf <= spec.quality_max:
            raise EncodeSettingsError(
                f"crf {self.crf} is out of range for {self.codec} (0 to {spec.quality_max})"
            )
        if self.preset is not None:
            if not spec.presets:
                raise EncodeSettingsError(f"{self.codec} has no presets (got {self.preset!r})")
            if str(self.preset) not in spec.presets:
                choices = ", ".join(sorted(spec.presets, key=lambda p: (len(p), p)))
                raise EncodeSettingsError(
                    f"preset {self.preset!r} is not one of {self.codec}'s presets: {choices}"
                )
        if not all(isinstance(arg, str) for arg in self.extra_args):
            raise EncodeSettingsError(f"extra_args must be strings, not {self.extra_args!r}")
        if self.codec == "libx264rgb" and self.effective_pix_fmt not in {"rgb24", "bgr24", "bgr0"}:
            raise EncodeSettingsError(f"libx264rgb takes rgb24, bgr24 or bgr0, not {self.pix_fmt}")
        if self.codec != "libx264rgb" and self.codec != "ffv1" and self.is_rgb:
            raise EncodeSettingsError(f"{self.codec} can't encode RGB pixel format {self.pix_fmt}")

    @classmethod
    def for_codec(
        cls,
        codec: str,
        *,
        crf: int | None = None,
        preset: str | None = None,
        pix_fmt: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> EncodeSettings:
        """Settings for ``codec``; every ``None`` takes that codec's default (CLI flags map 1:1)."""
        return cls(codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, extra_args=tuple(extra_args))

    @classmethod
    def lossless(cls) -> EncodeSettings:
        """FFV1 in RGB (``gbrp``, MKV only): decoded output frames equal the input frames exactly."""
        return cls(codec="ffv1", pix_fmt="gbrp")

    @property
    def spec(self) -> CodecSpec:
        return CODECS[self.codec]

    @property
    def effective_crf(self) -> int | None:
        return self.crf if self.crf is not None else self.spec.quality_default

    @property
    def effective_preset(self) -> str | None:
        return self.preset if self.preset is not None else self.spec.preset_default

    @property
    def effective_pix_fmt(self) -> str:
        return self.pix_fmt or self.spec.pix_fmt_default

    @property
    def is_rgb(self) -> bool:
        """RGB output: no YUV conversion at all (with a lossless codec, bit-exact frames)."""
        return self.effective_pix_fmt in RGB_PIX_FMTS

    @property
    def is_lossless(self) -> bool:
        return self.codec == "ffv1" or (self.codec in {"libx264", "libx264rgb"} and self.effective_crf == 0)

    def codec_args(self, hdr: HdrInfo | None = None) -> list[str]:
        """The ffmpeg output options for the video encoder (codec, quality, preset, pix_fmt, HDR10
        static metadata from ``hdr`` where the encoder takes it, extra)."""
        spec = self.spec
        args = ["-c:v", self.codec]
        if spec.family == "ffv1":
            args += ["-level", "3", "-g", "1", "-slicecrc", "1"]
        elif spec.needs_gpu:
            args += ["-preset", str(self.effective_preset), "-rc", "vbr", "-cq", str(self.effective_crf)]
            args += ["-b:v", "0"]
        else:
            args += [str(spec.quality_option), str(self.effective_crf), "-preset", str(self.effective_preset)]
            params = _hdr_params(self.codec, hdr)
            if self.codec == "libx265":
                params = ["log-level=error", *params]
            if params:
                args += [f"-{self.codec.removeprefix('lib')}-params", ":".join(params)]
        args += ["-pix_fmt", self.effective_pix_fmt, *self.extra_args]
        return args

    @property
    def carries_hdr10(self) -> bool:
        """Whether this encoder writes HDR10 static metadata into the video (x264, x265, SVT-AV1)."""
        return self.codec in {"libx264", "libx265", "libsvtav1"}

    def check_depth(self, bit_depth: int) -> None:
        """Raise :class:`EncodeSettingsError` if this ffmpeg's encoder cannot take the pixel format
        chosen for a source of ``bit_depth`` bits (say, a libx264 built without high bit depth)."""
        if bit_depth <= 8:
            return
        pix_fmt = self.effective_pix_fmt
        supported = encoder_pix_fmts(self.codec)
        if supported and pix_fmt not in supported:
            raise EncodeSettingsError(
                f"this ffmpeg's {self.codec} cannot write {pix_fmt} "
                f"(it takes {' '.join(sorted(supported))}); "
                f"for the {bit_depth}-bit source use {_codecs_holding(bit_depth, self.codec)}"
            )

    def check_container(self, container: str) -> None:
        """Raise :class:`EncodeSettingsError` if this codec can't go into ``container``."""
        if container not in self.spec.containers:
            fits = sorted(suffix for suffix, fmt in CONTAINER_FORMATS.items() if fmt in self.spec.containers)
            raise EncodeSettingsError(
                f"{self.codec} can't be written to a {container} file; use {' or '.join(fits)}"
            )

    def check_available(self) -> None:
        """Raise :class:`EncodeSettingsError` if the ffmpeg in use has no encoder of this codec."""
        if self.codec not in available_encoders():
            raise EncodeSettingsError(f"this ffmpeg has no {self.codec} encoder")

    def check_frame_size(self, width: int, height: int) -> None:
        """Raise :class:`EncodeSettingsError` if the pixel format can't hold ``width`` x ``height``."""
        pix_fmt = self.effective_pix_fmt
        needs_even_width = "420" in pix_fmt or "422" in pix_fmt or pix_fmt in {"nv12", "p010le"}
        needs_even_height = "420" in pix_fmt or pix_fmt in {"nv12", "p010le"}
        if (needs_even_width and width % 2) or (needs_even_height and height % 2):
            raise EncodeSettingsError(
                f"{pix_fmt} needs even dimensions but the frames are {width}x{height}; "
                "use pix_fmt yuv444p (or a scale that gives even sizes)"
            )


def _codecs_holding(bit_depth: int, but: str) -> str:
    """The CPU codecs other than ``but`` that keep ``bit_depth`` bits, as a phrase for a refusal."""
    names = []
    for codec, choices in HIGH_DEPTH_PIX_FMTS.items():
        fit = next((pix_fmt for bits, pix_fmt in choices if bits >= bit_depth), None)
        if fit is not None and codec != but and not CODECS[codec].needs_gpu:
            names.append(f"--codec {codec} ({fit})")
    return " or ".join(names)


def settings_for_depth(settings: EncodeSettings, bit_depth: int) -> EncodeSettings:
    """The settings a source of ``bit_depth`` bits per sample is encoded with: unchanged for 8 bits
    or a ``pix_fmt`` given; else the codec's first pixel format that holds the depth
    (:data:`HIGH_DEPTH_PIX_FMTS`). Raises :class:`EncodeSettingsError` for a codec without one,
    naming the codecs that keep the depth."""
    if bit_depth <= 8:
        return settings
    if settings.pix_fmt is not None:
        kept = pix_fmt_bit_depth(settings.pix_fmt)
        if kept < bit_depth:
            log.warning(
                "the source has %d bits per sample; --pix-fmt %s keeps %d", bit_depth, settings.pix_fmt, kept
            )
        return settings
    for bits, pix_fmt in HIGH_DEPTH_PIX_FMTS.get(settings.codec, ()):
        if bits >= bit_depth:
            return replace(settings, pix_fmt=pix_fmt)
    held = max((bits for bits, _ in HIGH_DEPTH_PIX_FMTS.get(settings.codec, ())), default=8)
    raise EncodeSettingsError(
        f"{settings.codec} writes at most {held} bits per sample, and the source has {bit_depth}; "
        f"use {_codecs_holding(bit_depth, settings.codec)} to keep them, "
        "or give an 8-bit --pix-fmt to drop them"
    )


def _hdr10_params(
    hdr: HdrInfo | None, mastering: str, light: str, *, svtav1_units: bool = False
) -> list[str]:
    """HDR10 static metadata as an encoder's ``key=value`` parameters: the mastering display under
    ``mastering`` (x265's units and spelling, which x264 takes too, or SVT-AV1's decimals) and
    MaxCLL, MaxFALL under ``light``."""
    params = []
    if hdr is not None and hdr.mastering is not None:
        value = hdr.mastering.svtav1_value() if svtav1_units else hdr.mastering.x265_value()
        params.append(f"{mastering}={value}")
    if hdr is not None and hdr.content_light is not None:
        params.append(f"{light}={hdr.content_light[0]},{hdr.content_light[1]}")
    return params


def _hdr_params(codec: str, hdr: HdrInfo | None) -> list[str]:
    """The encoder parameters (``-x264-params`` and the like) carrying ``hdr``'s static metadata."""
    if codec == "libx265":
        params = _hdr10_params(hdr, "master-display", "max-cll")
        return ["hdr10=1", *params] if params else []
    if codec == "libx264":
        return _hdr10_params(hdr, "mastering-display", "cll")
    if codec == "libsvtav1":
        return _hdr10_params(hdr, "mastering-display", "content-light", svtav1_units=True)
    return []


@dataclass(frozen=True)
class _Timing:
    time_base: Fraction
    pts: tuple[int, ...]
    rate: Fraction
    offset: Fraction  # seconds from the container start to the first frame


def _timing(info: MediaInfo) -> _Timing:
    video = info.video
    offset = max(Fraction(0), video.frame_pts[0] * video.time_base - info.start_time)
    if video.is_vfr:
        first = video.frame_pts[0]
        return _Timing(video.time_base, tuple(p - first for p in video.frame_pts), video.frame_rate, offset)
    return _Timing(1 / video.frame_rate, tuple(range(video.frame_count)), video.frame_rate, offset)


def subtitle_codec_for(sub: SubtitleInfo, container: str) -> str | None:
    """The ffmpeg subtitle codec for ``sub`` in ``container`` ("copy"), or None: can't be carried."""
    if container == "matroska":
        return "srt" if sub.codec == "mov_text" else "copy"
    if container in {"mp4", "mov"}:
        if sub.codec in {"mov_text", "dvd_subtitle"}:
            return "copy"
        return "mov_text" if sub.is_text else None
    if container == "webm":
        if sub.codec == "webvtt":
            return "copy"
        return "webvtt" if sub.is_text else None
    return None


def _color_args(
    info: MediaInfo, settings: EncodeSettings, frames_pix_fmt: str = "rgb24"
) -> tuple[str, list[str]]:
    """(video filter chain, colour tag options) converting RGB frames as the source was; frames
    already in the output's pixel format (YUV frames) are only tagged."""
    video = info.video
    color = video.color
    tags: dict[str, str] = {}
    if color.primaries:
        tags["color_primaries"] = color.primaries
    if color.transfer:
        tags["color_trc"] = color.transfer
    pix_fmt = settings.effective_pix_fmt
    if settings.is_rgb:
        chain = [f"format={pix_fmt}"]
        tags["colorspace"] = "gbr"
        tags["range"] = "pc"
    elif frames_pix_fmt == pix_fmt:  # the source's own YUV, converted back on the worker's device
        chain = []
        tags["colorspace"] = video.conversion.matrix
        tags["range"] = video.conversion.range
    else:
        conversion = video.conversion
        chain = [
            f"scale=out_color_matrix={conversion.scale_matrix}:out_range={conversion.range}"
            ":flags=bicubic+accurate_rnd",
            f"format={pix_fmt}",
        ]
        tags["colorspace"] = conversion.matrix
        tags["range"] = conversion.range
    chain.append("setparams=" + ":".join(f"{key}={value}" for key, value in tags.items()))
    if video.sample_aspect_ratio:
        sar = video.sample_aspect_ratio
        # setsar reduces its ratio to terms of at most ``max`` (default 100): 128/117 became 93/85.
        chain.append(f"setsar=r={sar.numerator}/{sar.denominator}:max={max(sar.numerator, sar.denominator)}")
    options = {"color_primaries": "-color_primaries", "color_trc": "-color_trc"}
    options |= {"colorspace": "-colorspace", "range": "-color_range"}
    # The encoder options spell the RGB "matrix" rgb where filters and ffprobe say gbr.
    tag_args = [
        arg for key, value in tags.items() for arg in (options[key], "rgb" if value == "gbr" else value)
    ]
    return ",".join(chain), tag_args


def _input_args(info: MediaInfo, timing: _Timing, video_input: Sequence[str]) -> list[str]:
    """The inputs: the video (input 0: ``video_input``, e.g. NUT on stdin), then the source (input 1).

    The video input takes the source's rotation (display matrix) and its offset from the container
    start (``-itsoffset``), so audio stays in sync.
    """
    args: list[str] = ["-y"]
    if info.video.rotation:
        args += ["-noautorotate", "-display_rotation:v:0", str(info.video.rotation)]
    if timing.offset:
        args += ["-itsoffset", f"{float(timing.offset):.6f}"]
    return [*args, *video_input, "-i", str(info.path), "-map", "0:v:0"]


def _carry_over_args(info: MediaInfo, container: str) -> list[str]:
    """Audio (copied), subtitles (copied or converted), attachments, chapters and metadata from the
    source (input 1) into a ``container`` output."""
    video = info.video
    args: list[str] = []
    mapped_audio: list[int] = []
    for audio in info.audio:
        copyable = _AUDIO_COPYABLE.get("mp4" if container in {"mp4"} else container)
        if copyable is not None and audio.codec not in copyable:
            raise EncodeSettingsError(
                f"audio stream #{audio.index} ({audio.codec}) can't be copied into a {container} file; "
                "write an .mkv output instead"
            )
        args += ["-map", f"1:{audio.index}", f"-map_metadata:s:a:{len(mapped_audio)}", f"1:s:{audio.index}"]
        mapped_audio.append(audio.index)
    if info.audio:
        args += ["-c:a", "copy"]

    out_sub = 0
    for sub in info.subtitles:
        codec = subtitle_codec_for(sub, container)
        if codec is None:
            log.warning(
                "subtitle stream #%d (%s) can't be carried into a %s file; it is left out "
                "(write an .mkv output to keep it)",
                sub.index,
                sub.codec,
                container,
            )
            continue
        args += ["-map", f"1:{sub.index}", f"-c:s:{out_sub}", codec]
        args += [f"-map_metadata:s:s:{out_sub}", f"1:s:{sub.index}"]
        out_sub += 1
    if info.attachments and container == "matroska":
        args += ["-map", "1:t", "-c:t", "copy"]  # fonts used by ASS subtitles

    # Naming one stream's metadata source turns off ffmpeg's default per-stream copy: name them all.
    args += ["-map_metadata", "1", "-map_metadata:s:v:0", f"1:s:{video.index}"]
    args += ["-map_chapters", "1" if info.chapters else "-1"]
    args += ["-metadata:s:v:0", "DURATION=", "-metadata:s:v:0", "encoder="]
    return args


def _video_encode_args(
    info: MediaInfo, settings: EncodeSettings, timing: _Timing, frames_pix_fmt: str = "rgb24"
) -> list[str]:
    """Filters, encoder options and colour tags of the video encode; timestamps passed through."""
    vf, tag_args = _color_args(info, settings, frames_pix_fmt)
    args = ["-vf", vf, *settings.codec_args(info.video.hdr), *tag_args]
    return [*args, "-fps_mode", "passthrough", "-enc_time_base:v", _ratio(timing.time_base)]


def _container_args(settings: EncodeSettings, container: str, target: Path) -> list[str]:
    """The output: ``hvc1`` for HEVC in MP4/MOV, the index up front, the format and the path."""
    args: list[str] = []
    if container in {"mp4", "mov"}:
        if settings.spec.family == "hevc":
            args += ["-tag:v", "hvc1"]  # Apple players need hvc1, not hev1
        args += ["-movflags", "+faststart"]
    return [*args, "-f", container, str(target)]


def _ratio(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def output_container(
    info: MediaInfo, output: str | Path, settings: EncodeSettings, *, overwrite: bool
) -> str:
    """The container format of ``output``, after checking the path and that ``settings``' codec fits."""
    target = Path(output)
    check_output_path(info.path, target, overwrite)
    container = CONTAINER_FORMATS[target.suffix.lower()]
    settings.check_container(container)
    return container


def check_encode(
    info: MediaInfo,
    output: str | Path,
    settings: EncodeSettings,
    *,
    overwrite: bool,
    size: tuple[int, int] | None = None,
) -> str:
    """Everything that would stop the encode (segments, then their join) before it starts, up front.

    The coordinator calls this before any frame is upscaled, so a bad output path, a codec the
    container or this ffmpeg cannot take, or an output ``size`` (width, height) the pixel format
    cannot hold fails at once. Returns the container format name.
    """
    container = output_container(info, output, settings, overwrite=overwrite)
    settings.check_available()
    settings.check_depth(info.video.bit_depth)
    if size is not None:
        settings.check_frame_size(*size)
    return container


def atomic_output(target: Path) -> contextlib.AbstractContextManager[Path]:
    """A hidden ``.part`` path beside ``target`` that becomes ``target`` once the block succeeds
    (:func:`manifests.atomic.atomic_path`). Nothing half-written ever has the target's name."""
    return atomic_path(target, suffix=PART_SUFFIX)


@dataclass(frozen=True)
class FrameFeed:
    """Frames of one size (arrays in ``frame_format``'s layout, holding ``pix_fmt`` samples), frame
    numbers ``first_frame``, ``first_frame + 1``..., one per pts of ``timing.pts``, to be fed to
    ffmpeg by :func:`run_frame_encoder`. A frame of another size raises :class:`FramesError` in
    ``where`` (the frames' directory, or the video they come from), naming the frame by its
    ``names`` entry (its file) when given."""

    frames: Iterable[np.ndarray]
    frame_format: FrameFormat
    size: tuple[int, int]
    timing: _Timing
    where: Path
    first_frame: int = 1
    pix_fmt: str = "rgb24"  # what the frames hold (:func:`frames_pix_fmt`)
    names: Sequence[str] | None = None


def run_frame_encoder(args: Sequence[str], action: str, feed: FrameFeed) -> None:
    """Run ffmpeg with ``args`` (NUT frames on stdin as input 0) and feed it ``feed``'s frames.

    Raises :class:`FramesError` for a bad frame, :class:`FFmpegError` when ffmpeg fails.
    """
    with FFmpegProcess(args, action=action, stdin=True, stage="encode") as ffmpeg:
        try:
            _feed(ffmpeg, feed)
        except (OSError, av.error.FFmpegError) as exc:
            # ffmpeg stopped reading its stdin; its own error says why.
            try:
                ffmpeg.finish(timeout=60)
            except FFmpegError as ffmpeg_error:
                raise ffmpeg_error from exc
            except subprocess.TimeoutExpired:
                pass
            raise MediaError(f"ffmpeg stopped taking frames while {action}: {exc}") from exc
        ffmpeg.finish()


def frame_paths(
    directory: Path,
    first: int,
    count: int,
    frame_format: FrameFormat,
    sources: Sequence[int] | None = None,
) -> list[Path]:
    """The files of frames ``first .. first + count - 1``; :class:`FramesError` names the first missing.

    ``sources``, one per frame, name the file each frame is read from (``--dedup``: a held frame is
    its reference's upscaled file); default: its own."""
    if not directory.is_dir():
        raise FramesError(directory, "is not a directory of frames")
    numbers = list(range(first, first + count)) if sources is None else list(sources)
    if len(numbers) != count:
        raise ValueError(f"{len(numbers)} sources for {count} frames")
    paths = [directory / frame_filename(i, frame_format) for i in numbers]
    missing = [i for i, path in zip(numbers, paths, strict=True) if not path.is_file()]
    if missing:
        raise FramesError(
            directory,
            f"{frame_filename(missing[0], frame_format)} is missing "
            f"({len(missing)} of the {count} frames are missing)",
            frame=missing[0],
        )
    return paths


def _read(
    path: Path, index: int, frame_format: FrameFormat, directory: Path, bit_depth: int = 8
) -> np.ndarray:
    try:
        with METER.measure("encode_read"):
            return read_frame(path, frame_format, bit_depth=bit_depth)
    except FileNotFoundError as exc:
        raise FramesError(directory, f"{path.name} is missing", frame=index) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError on some broken PNGs
        raise FramesError(directory, f"{path.name} can't be read: {exc}", frame=index) from exc


def read_frames(
    paths: Sequence[Path],
    frame_format: FrameFormat,
    directory: Path,
    threads: int | None,
    first_frame: int,
    bit_depth: int,
) -> Iterator[np.ndarray]:
    """The frames in order, read by ``threads`` threads (default: the CPU count, at most 4) up to
    ``2 * threads`` frames ahead; :class:`FramesError` names a frame that cannot be read."""
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode-read") as pool:
        pending: deque[Future[np.ndarray]] = deque()
        next_index = 0
        try:
            while next_index < len(paths) or pending:
                while next_index < len(paths) and len(pending) < 2 * threads:
                    pending.append(
                        pool.submit(
                            _read,
                            paths[next_index],
                            first_frame + next_index,
                            frame_format,
                            directory,
                            bit_depth,
                        )
                    )
                    next_index += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def frames_pix_fmt(frame_format: FrameFormat, source_pix_fmt: str | None, bit_depth: int) -> str:
    """The raw pixel format frame files of a job hold: the source's own planar YUV for YUV frames,
    else packed RGB (``rgb24``, or ``rgb48le`` for 16-bit frames)."""
    if frame_format is FrameFormat.YUV:
        if source_pix_fmt is None:
            raise ValueError("YUV frames need the source's pixel format")
        return source_pix_fmt
    return "rgb48le" if bit_depth == HIGH_BIT_DEPTH else "rgb24"


def _feed(ffmpeg: FFmpegProcess, feed: FrameFeed) -> None:
    """Mux every frame's samples as they are, with its pts, as rawvideo packets (``feed.pix_fmt``)
    into NUT on ffmpeg's stdin: no conversion and no copy beyond the packet's. The frames'
    iterator is closed at the end, however it ends."""
    width, height = feed.size
    timing = feed.timing
    frames = iter(feed.frames)
    muxer: Any = av.open(ffmpeg.stdin, mode="w", format="nut")
    try:
        stream = muxer.add_stream("rawvideo", rate=timing.rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = feed.pix_fmt
        stream.time_base = timing.time_base
        stream.codec_context.time_base = timing.time_base
        fed = 0
        for array in frames:
            with METER.measure("encode_feed"):
                number = feed.first_frame + fed
                if fed == len(timing.pts):
                    raise MediaError(f"more frames than the {fed} of frames {feed.first_frame}-{number - 1}")
                if frame_size(array, feed.frame_format) != (width, height):
                    got_w, got_h = frame_size(array, feed.frame_format)
                    name = feed.names[fed] if feed.names is not None else f"frame {number}"
                    raise FramesError(
                        feed.where,
                        f"{name} is {got_w}x{got_h}, but frame {feed.first_frame} is {width}x{height}",
                        frame=number,
                    )
                packet = av.Packet(np.ascontiguousarray(array).data)  # type: ignore[arg-type]
                packet.stream = stream
                packet.pts = packet.dts = timing.pts[fed]
                packet.time_base = timing.time_base
                packet.is_keyframe = True
                muxer.mux(packet)
                fed += 1
        if fed != len(timing.pts):
            last = feed.first_frame + len(timing.pts) - 1
            raise MediaError(f"only {fed} frames came of frames {feed.first_frame}-{last}")
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
        with contextlib.suppress(Exception):
            muxer.close()


def count_video_packets(path: Path) -> int:
    """The number of (non-empty) packets of ``path``'s first video stream.

    Raises ``av.error.FFmpegError`` (unreadable file) or ``IndexError`` (no video stream).
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def check_packet_count(tmp: Path, target: Path, expected: int) -> None:
    """Trust the file, not ffmpeg's exit code: the output must hold ``expected`` video packets."""
    try:
        count = count_video_packets(tmp)
    except (av.error.FFmpegError, IndexError) as exc:
        raise MediaError(f"the encoded file for {target} can't be read back: {exc}") from exc
    if count != expected:
        raise MediaError(f"the encoded file for {target} holds {count} video frames, not {expected}")


__all__ = [
    "CODECS",
    "HIGH_DEPTH_PIX_FMTS",
    "CodecSpec",
    "EncodeSettings",
    "settings_for_depth",
    "subtitle_codec_for",
]
