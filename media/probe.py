"""Probe an input video with PyAV and reject what can't be upscaled, with a one-line reason.

:func:`probe` opens the file in-process, reads every video packet (the frame count and timestamps
come from the packets, never from the header), decodes the first frames (or all of them with
``full_decode=True``) and returns a :class:`MediaInfo`. Anything FFmpeg logs at error level
while doing so (a garbled cluster, a truncated file, undecodable slices) makes the input corrupt.

Rejected with :class:`InputError`: a missing or unreadable path, a file FFmpeg can't open, a file
with no video stream (audio only, cover art only), zero frames, corrupt or truncated data.

Colour: the tags (primaries, transfer, matrix, range) are reported as ffmpeg names, ``None`` when
the file leaves them unspecified. :attr:`VideoInfo.conversion` is the YUV<->RGB conversion every
step uses (extraction, encoding); for an untagged matrix it is BT.709 when the height is >= 720
and BT.601 (``smpte170m``) below, and for an untagged range it is limited (``tv``) unless the
pixel format is a full-range ``yuvj*`` one -- the same guess players make.

Depth and HDR: :attr:`VideoInfo.bit_depth` is the source's bits per sample (8, 10, 12...), from its
pixel format; :attr:`VideoInfo.hdr` the HDR10 static metadata of its first frame (mastering display
colour volume, content light level) and the dynamic HDR metadata found in the decoded frames
(HDR10+, Dolby Vision), which cannot survive an upscale and is dropped with a warning.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import av
import av.logging

from media.errors import InputError, OutputPathError

log = logging.getLogger(__name__)

#: Frames decoded by :func:`probe` to check the input is decodable (``full_decode`` decodes all).
HEAD_FRAMES = 8
#: Output container formats esrfarm writes, by file suffix (the ``-f`` given to ffmpeg).
CONTAINER_FORMATS: Mapping[str, str] = MappingProxyType(
    {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
)
TEXT_SUBTITLE_CODECS = frozenset(
    {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text", "microdvd", "subviewer", "sami", "mpl2"}
)

# FFmpeg's enum values (stable ABI) -> the names ffmpeg's -color_* options take.
_PRIMARIES = {
    1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020",
    10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "jedec-p22",
}  # fmt: skip
_TRANSFERS = {
    1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear", 9: "log100",
    10: "log316", 11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10",
    15: "bt2020-12", 16: "smpte2084", 17: "smpte428", 18: "arib-std-b67",
}  # fmt: skip
_MATRICES = {
    0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco",
    9: "bt2020nc", 10: "bt2020c", 11: "smpte2085", 12: "chroma-derived-nc", 13: "chroma-derived-c",
    14: "ictcp",
}  # fmt: skip
_RANGES = {1: "tv", 2: "pc"}
# Matrix tag -> the name the scale filter's in_color_matrix/out_color_matrix take.
_SCALE_MATRICES = {
    "bt709": "bt709", "fcc": "fcc", "bt470bg": "bt601", "smpte170m": "bt601", "smpte240m": "smpte240m",
    "bt2020nc": "bt2020", "bt2020c": "bt2020",
}  # fmt: skip


@dataclass(frozen=True)
class ColorInfo:
    """Colour tags as ffmpeg names (``bt709``, ``smpte170m``, ``tv``...); ``None`` = unspecified."""

    primaries: str | None = None
    transfer: str | None = None
    matrix: str | None = None
    range: str | None = None


@dataclass(frozen=True)
class MasteringDisplay:
    """SMPTE ST 2086 mastering display colour volume: CIE 1931 xy chromaticities of the red, green
    and blue primaries and the white point, and the luminance range in cd/m2 (exact fractions)."""

    red: tuple[Fraction, Fraction]
    green: tuple[Fraction, Fraction]
    blue: tuple[Fraction, Fraction]
    white_point: tuple[Fraction, Fraction]
    max_luminance: Fraction
    min_luminance: Fraction

    def x265_value(self) -> str:
        """As x265's ``master-display`` takes it: ``G(x,y)B(x,y)R(x,y)WP(x,y)L(max,min)``, in units of
        0.00002 (chromaticity) and 0.0001 cd/m2 (luminance)."""

        def xy(point: tuple[Fraction, Fraction]) -> str:
            return f"{round(point[0] * 50000)},{round(point[1] * 50000)}"

        luminance = f"{round(self.max_luminance * 10000)},{round(self.min_luminance * 10000)}"
        return (
            f"G({xy(self.green)})B({xy(self.blue)})R({xy(self.red)})WP({xy(self.white_point)})L({luminance})"
        )

    def svtav1_value(self) -> str:
        """As SVT-AV1's ``mastering-display`` takes it: ``G(x,y)B(x,y)R(x,y)WP(x,y)L(max,min)`` in
        decimal chromaticities and cd/m2."""

        def xy(point: tuple[Fraction, Fraction]) -> str:
            return f"{float(point[0]):.5f},{float(point[1]):.5f}"

        luminance = f"{float(self.max_luminance):.4f},{float(self.min_luminance):.4f}"
        return (
            f"G({xy(self.green)})B({xy(self.blue)})R({xy(self.red)})WP({xy(self.white_point)})L({luminance})"
        )


@dataclass(frozen=True)
class HdrInfo:
    """HDR metadata beyond the colour tags. ``mastering`` and ``content_light`` (MaxCLL, MaxFALL in
    cd/m2) are HDR10 static metadata, carried into the output; ``dynamic`` names the dynamic metadata
    found (``HDR10+``, ``Dolby Vision``), which is dropped."""

    mastering: MasteringDisplay | None = None
    content_light: tuple[int, int] | None = None
    dynamic: tuple[str, ...] = ()


def parse_mastering_display(data: bytes) -> MasteringDisplay | None:
    """FFmpeg's ``AVMasteringDisplayMetadata`` (frame side data): 10 rationals (R, G, B primaries and
    the white point as x, y; then min and max luminance) and two flags; None unless both are set."""
    if len(data) < 88:
        return None
    values = struct.unpack_from("<20i2i", data)
    has_primaries, has_luminance = values[20], values[21]
    if not has_primaries or not has_luminance or any(values[i] == 0 for i in range(1, 20, 2)):
        return None
    rationals = [Fraction(values[i], values[i + 1]) for i in range(0, 20, 2)]

    def point(i: int) -> tuple[Fraction, Fraction]:
        return rationals[i], rationals[i + 1]

    return MasteringDisplay(
        red=point(0), green=point(2), blue=point(4), white_point=point(6),
        min_luminance=rationals[8], max_luminance=rationals[9],
    )  # fmt: skip


def parse_content_light(data: bytes) -> tuple[int, int] | None:
    """FFmpeg's ``AVContentLightMetadata``: (MaxCLL, MaxFALL), None when absent or both zero."""
    if len(data) < 8:
        return None
    max_cll, max_fall = struct.unpack_from("<2I", data)
    return (max_cll, max_fall) if max_cll or max_fall else None


def pix_fmt_bit_depth(pix_fmt: str | None) -> int:
    """Bits per sample of a pixel format (``yuv420p10le``: 10, ``p010le``: 10); 8 when unknown."""
    if not pix_fmt:
        return 8
    try:
        components = av.VideoFormat(pix_fmt).components
    except (ValueError, av.error.FFmpegError):
        return 8
    return max((c.bits for c in components), default=8)


@dataclass(frozen=True)
class RgbConversion:
    """The YUV<->RGB conversion used for a video: a matrix and a range, each tagged or guessed.

    ``matrix`` is an ffmpeg colourspace name (``bt709``, ``smpte170m``, ``bt2020nc``...);
    ``scale_matrix`` the scale filter's name for it (``bt709``, ``bt601``, ``bt2020``...).
    """

    matrix: str
    scale_matrix: str
    range: str
    guessed: bool

    @property
    def full_range(self) -> bool:
        return self.range == "pc"


@dataclass(frozen=True)
class VideoInfo:
    """The video stream, with the frame count and timestamps counted from its packets.

    ``frame_pts`` are presentation timestamps in ``time_base`` units, in display order, one per
    frame. ``frame_rate`` is exact for CFR (``Fraction(30000, 1001)``) and the average for VFR.
    ``rotation`` is the display rotation in degrees counter-clockwise (ffmpeg's
    ``-display_rotation``), 0 when none. Frames are extracted in coded orientation; the rotation
    is carried to the output as metadata.
    """

    index: int
    codec: str
    width: int
    height: int
    pix_fmt: str | None
    frame_count: int
    frame_rate: Fraction
    time_base: Fraction
    is_vfr: bool
    frame_pts: tuple[int, ...]
    last_frame_duration: int
    sample_aspect_ratio: Fraction | None
    rotation: int
    color: ColorInfo
    metadata: Mapping[str, str] = field(default_factory=dict)
    bit_depth: int = 8
    hdr: HdrInfo = field(default_factory=HdrInfo)

    @property
    def high_depth(self) -> bool:
        """More than 8 bits per sample: frames go through 16-bit RGB, end to end."""
        return self.bit_depth > 8

    @property
    def frame_bit_depth(self) -> int:
        """Bits per sample of its frames on shared storage: 8, or 16 for a high-depth source."""
        return 16 if self.high_depth else 8

    @property
    def frame_rate_str(self) -> str:
        """The rate as ffprobe writes it: ``"30000/1001"``, ``"25/1"``."""
        return f"{self.frame_rate.numerator}/{self.frame_rate.denominator}"

    @property
    def duration(self) -> Fraction:
        """Seconds from the first frame's start to the last frame's end."""
        if not self.frame_pts:
            return Fraction(0)
        return (self.frame_pts[-1] - self.frame_pts[0] + self.last_frame_duration) * self.time_base

    @property
    def conversion(self) -> RgbConversion:
        """The YUV<->RGB matrix and range for this video (tagged, or the documented guess)."""
        return rgb_conversion(self.color, self.height, self.pix_fmt)


@dataclass(frozen=True)
class AudioInfo:
    index: int
    codec: str
    channels: int
    sample_rate: int
    language: str | None
    title: str | None


@dataclass(frozen=True)
class SubtitleInfo:
    index: int
    codec: str
    language: str | None
    title: str | None

    @property
    def is_text(self) -> bool:
        """Text subtitles can be converted between containers (to mov_text, srt, webvtt)."""
        return self.codec in TEXT_SUBTITLE_CODECS


@dataclass(frozen=True)
class ChapterInfo:
    start: Fraction
    end: Fraction
    title: str | None


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found. ``start_time`` (seconds) is the container's earliest timestamp,
    the origin ffmpeg shifts every stream by."""

    path: Path
    format_name: str
    duration: Fraction | None
    start_time: Fraction
    video: VideoInfo
    audio: tuple[AudioInfo, ...]
    subtitles: tuple[SubtitleInfo, ...]
    chapters: tuple[ChapterInfo, ...]
    attachments: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def frame_count(self) -> int:
        """Shorthand for ``video.frame_count``."""
        return self.video.frame_count


def rgb_conversion(color: ColorInfo, height: int, pix_fmt: str | None) -> RgbConversion:
    """The conversion for these tags: tagged values where usable, else the documented guess."""
    guessed = False
    matrix = color.matrix
    if matrix is None or matrix not in _SCALE_MATRICES:
        if matrix is not None and matrix != "gbr":
            log.warning("colour matrix %s is not supported by the converter; using a default", matrix)
        matrix = "bt709" if height >= 720 else "smpte170m"
        guessed = True
    range_ = color.range
    if range_ is None:
        range_ = "pc" if pix_fmt is not None and pix_fmt.startswith("yuvj") else "tv"
        guessed = True
    return RgbConversion(matrix=matrix, scale_matrix=_SCALE_MATRICES[matrix], range=range_, guessed=guessed)


@contextlib.contextmanager
def capture_libav_errors() -> Iterator[list[str]]:
    """Collect the messages FFmpeg's libraries log at error level or worse inside the block.

    PyAV keeps libav logging off by default; this turns it on at ERROR for the block (all
    threads: decoder threads log too) and restores the previous level.
    """
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    messages: list[str] = []
    try:
        with av.logging.Capture(local=False) as captured:
            yield messages
            messages.extend(
                f"{name}: {text.strip()}" if name else text.strip()
                for level, name, text in captured
                if level <= av.logging.ERROR
            )
    finally:
        av.logging.set_level(previous)


def probe(path: str | Path, *, full_decode: bool = False, head_frames: int = HEAD_FRAMES) -> MediaInfo:
    """Probe ``path``; raise :class:`InputError` (one-line message) if it can't be upscaled.

    Reads every video packet (count, timestamps), decodes the first ``head_frames`` frames, or
    every frame with ``full_decode=True`` (then the count and timestamps come from the decoded
    frames). Extraction decodes everything anyway and re-checks the count.
    """
    source = Path(path)
    _check_readable(source)
    with capture_libav_errors() as errors:
        try:
            container = av.open(str(source), metadata_errors="replace")
        except av.error.FFmpegError as exc:
            raise InputError(source, f"is not a media file FFmpeg can read ({_av_reason(exc)})") from exc
    if errors:
        raise InputError(source, f"is corrupt: {errors[0]}")
    with container:
        video_stream = _pick_video_stream(container, source)
        _check_is_video(container, video_stream, source)
        packets = _read_video_packets(container, video_stream, source)
        if not packets:
            raise InputError(source, "has a video stream with no frames")
        decoded = _decode_check(source, video_stream.index, None if full_decode else head_frames)
        if decoded.count == 0:
            raise InputError(source, "is corrupt: none of its video frames could be decoded")
        pts_list: list[int | None] = [p.pts for p in packets]
        if full_decode:
            if decoded.count != len(packets):
                raise InputError(
                    source,
                    f"is corrupt: {decoded.count} of its {len(packets)} video frames could be decoded",
                )
            if None not in decoded.pts:
                pts_list = list(decoded.pts)
        return _media_info(container, video_stream, source, packets, pts_list, decoded)


@dataclass(frozen=True)
class _Packet:
    pts: int | None
    duration: int


@dataclass
class _Decoded:
    count: int
    pts: list[int | None]
    rotation: int
    mastering: MasteringDisplay | None = None
    content_light: tuple[int, int] | None = None
    dynamic: set[str] = field(default_factory=set)


_DYNAMIC_HDR = {
    "DYNAMIC_HDR_PLUS": "HDR10+",
    "DOVI_METADATA": "Dolby Vision",
    "DOVI_RPU_BUFFER": "Dolby Vision",
}


def _read_side_data(decoded: _Decoded, frame: Any) -> None:
    """HDR10 static metadata from the first frame; dynamic HDR metadata from any decoded frame."""
    for side_data in frame.side_data:
        name = getattr(side_data.type, "name", str(side_data.type))
        if name in _DYNAMIC_HDR:
            decoded.dynamic.add(_DYNAMIC_HDR[name])
        elif decoded.count == 0 and name == "MASTERING_DISPLAY_METADATA":
            decoded.mastering = parse_mastering_display(bytes(side_data))
        elif decoded.count == 0 and name == "CONTENT_LIGHT_LEVEL":
            decoded.content_light = parse_content_light(bytes(side_data))


def _check_readable(source: Path) -> None:
    if not source.exists():
        raise InputError(source, "does not exist")
    if source.is_dir():
        raise InputError(source, "is a directory, not a video file")
    if not os.access(source, os.R_OK):
        raise InputError(source, "is not readable (permission denied)")
    if source.stat().st_size == 0:
        raise InputError(source, "is empty (0 bytes)")


def _av_reason(exc: av.error.FFmpegError) -> str:
    return str(exc.strerror or exc).strip() or type(exc).__name__


def _pick_video_stream(container: Any, source: Path) -> Any:
    streams = [
        s
        for s in container.streams.video
        if not (s.disposition & av.stream.Disposition.attached_pic)  # cover art is not a video
    ]
    if not streams:
        kinds = sorted(
            {
                "cover art" if s.disposition & av.stream.Disposition.attached_pic else str(s.type)
                for s in container.streams
            }
        )
        found = f" (it has only {' and '.join(kinds)} streams)" if kinds else ""
        raise InputError(source, f"has no video stream{found}")
    return streams[0]


#: FFmpeg's demuxers of single still images (``<codec>_pipe``) and of numbered image files.
_IMAGE_DEMUXERS = ("image2", "image2pipe")


def is_still_image_format(format_name: str) -> bool:
    """Whether an FFmpeg demuxer name (``png_pipe``, ``jpeg_pipe``, ``image2``...) reads still images."""
    return any(name.endswith("_pipe") or name in _IMAGE_DEMUXERS for name in format_name.split(","))


def _check_is_video(container: Any, stream: Any, source: Path) -> None:
    """A still image is not a video (whatever its file name says); a stream without a frame size
    cannot be decoded into frames."""
    if is_still_image_format(container.format.name):
        raise InputError(
            source,
            f"is a still image ({stream.codec_context.name}), not a video; to upscale it as an image, "
            "give an image output (.png, .jpg, .webp)",
        )
    ctx = stream.codec_context
    if not ctx.width or not ctx.height:
        raise InputError(
            source,
            f"has a video stream of {ctx.width}x{ctx.height} pixels: its header gives no frame size, "
            "so it cannot be decoded (the file is damaged)",
        )


def _read_video_packets(container: Any, stream: Any, source: Path) -> list[_Packet]:
    packets: list[_Packet] = []
    with capture_libav_errors() as errors:
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the flush packet PyAV yields at the end
                if packet.is_corrupt:
                    raise InputError(source, f"is corrupt: video packet {len(packets) + 1} is damaged")
                pts = packet.pts if packet.pts is not None else packet.dts
                packets.append(_Packet(pts=pts, duration=int(packet.duration or 0)))
        except av.error.FFmpegError as exc:
            raise InputError(
                source, f"is corrupt: reading failed after {len(packets)} video frames ({_av_reason(exc)})"
            ) from exc
    if errors:
        raise InputError(source, f"is corrupt: {errors[0]}")
    header_frames = int(stream.frames or 0)
    if header_frames > len(packets):
        raise InputError(
            source,
            f"is truncated or corrupt: its header lists {header_frames} video frames "
            f"but only {len(packets)} can be read",
        )
    return packets


def _decode_check(source: Path, stream_index: int, limit: int | None) -> _Decoded:
    """Decode the first ``limit`` frames (all when ``None``); any libav error makes it corrupt."""
    decoded = _Decoded(count=0, pts=[], rotation=0)
    with capture_libav_errors() as errors:
        try:
            with av.open(str(source)) as container:
                stream: Any = container.streams[stream_index]
                # One decoding thread: with FFmpeg's frame threads, closing the decoder early joins
                # threads that may be logging into PyAV's capture, which needs the GIL this thread
                # holds: a deadlock (seen here, in avcodec_free_context). The probe decodes a few
                # frames; extraction decodes with the ffmpeg binary, threaded.
                stream.codec_context.thread_count = 1
                frame: Any
                for frame in container.decode(stream):
                    if decoded.count == 0:
                        decoded.rotation = round(frame.rotation or 0)
                    _read_side_data(decoded, frame)
                    decoded.count += 1
                    decoded.pts.append(frame.pts)
                    if limit is not None and decoded.count >= limit:
                        break
        except av.error.FFmpegError as exc:
            raise InputError(
                source,
                f"is corrupt: decoding failed after {decoded.count} video frames ({_av_reason(exc)})",
            ) from exc
    if errors:
        raise InputError(source, f"is corrupt: {errors[0]}")
    return decoded


def _frame_timing(
    pts_list: list[int | None], packets: list[_Packet], stream: Any
) -> tuple[tuple[int, ...], Fraction, bool, int]:
    """(frame_pts, frame_rate, is_vfr, last_frame_duration) from the timestamps found."""
    time_base = Fraction(stream.time_base)
    candidates = [Fraction(r) for r in (stream.average_rate, stream.base_rate, stream.guessed_rate) if r]
    nominal = next((r for r in candidates if r > 0), Fraction(25))
    count = len(pts_list)
    known = [p for p in pts_list if p is not None]
    if len(known) != count or len(set(known)) != count:
        if known:
            log.warning("video timestamps are missing or repeated; assuming a constant %s fps", nominal)
        tick = 1 / (nominal * time_base)
        first = min(known) if known else 0
        frame_pts = tuple(first + round(i * tick) for i in range(count))
        return frame_pts, nominal, False, max(1, round(tick))
    frame_pts = tuple(sorted(known))
    last_duration = packets[-1].duration if packets and packets[-1].duration > 0 else 0
    for rate in candidates:
        tick = 1 / (rate * time_base)
        if all(abs(p - frame_pts[0] - round(i * tick)) <= 1 for i, p in enumerate(frame_pts)):
            return frame_pts, rate, False, last_duration or max(1, round(tick))
    deltas = {b - a for a, b in itertools.pairwise(frame_pts)}
    if len(deltas) == 1:
        (delta,) = deltas
        return frame_pts, 1 / (delta * time_base), False, last_duration or delta
    span = frame_pts[-1] - frame_pts[0]
    average = Fraction(count - 1) / (span * time_base)
    return frame_pts, average, True, last_duration or (frame_pts[-1] - frame_pts[-2])


def _media_info(
    container: Any,
    stream: Any,
    source: Path,
    packets: list[_Packet],
    pts_list: list[int | None],
    decoded: _Decoded,
) -> MediaInfo:
    video = _video_info(stream, packets, pts_list, decoded)
    start_time = Fraction(container.start_time, av.time_base) if container.start_time is not None else None
    if start_time is None:
        start_time = video.frame_pts[0] * video.time_base
    duration = Fraction(container.duration, av.time_base) if container.duration else None
    _check_header_duration(source, video, stream)
    return MediaInfo(
        path=source,
        format_name=container.format.name,
        duration=duration,
        start_time=start_time,
        video=video,
        audio=_audio_infos(container.streams.audio),
        subtitles=_subtitle_infos(container.streams.subtitles),
        chapters=_chapter_infos(container.chapters()),
        attachments=len(container.streams.attachments),
        metadata=MappingProxyType(dict(container.metadata)),
    )


def _video_info(
    stream: Any, packets: list[_Packet], pts_list: list[int | None], decoded: _Decoded
) -> VideoInfo:
    frame_pts, frame_rate, is_vfr, last_duration = _frame_timing(pts_list, packets, stream)
    ctx = stream.codec_context
    sar = stream.sample_aspect_ratio
    return VideoInfo(
        index=stream.index,
        codec=ctx.name,
        width=ctx.width,
        height=ctx.height,
        pix_fmt=ctx.pix_fmt,
        frame_count=len(frame_pts),
        frame_rate=frame_rate,
        time_base=Fraction(stream.time_base),
        is_vfr=is_vfr,
        frame_pts=frame_pts,
        last_frame_duration=last_duration,
        sample_aspect_ratio=Fraction(sar) if sar else None,
        rotation=decoded.rotation,
        color=ColorInfo(
            primaries=_PRIMARIES.get(ctx.color_primaries),
            transfer=_TRANSFERS.get(ctx.color_trc),
            matrix=_MATRICES.get(ctx.colorspace),
            range=_RANGES.get(ctx.color_range),
        ),
        metadata=MappingProxyType(dict(stream.metadata)),
        bit_depth=pix_fmt_bit_depth(ctx.pix_fmt),
        hdr=HdrInfo(decoded.mastering, decoded.content_light, tuple(sorted(decoded.dynamic))),
    )


def _audio_infos(streams: Any) -> tuple[AudioInfo, ...]:
    return tuple(
        AudioInfo(
            index=s.index,
            codec=s.codec_context.name,
            channels=s.codec_context.channels,
            sample_rate=s.codec_context.sample_rate,
            language=s.metadata.get("language"),
            title=s.metadata.get("title"),
        )
        for s in streams
    )


def _subtitle_infos(streams: Any) -> tuple[SubtitleInfo, ...]:
    return tuple(
        SubtitleInfo(
            index=s.index,
            codec=s.codec_context.name if s.codec_context is not None else s.codec.name,
            language=s.metadata.get("language"),
            title=s.metadata.get("title"),
        )
        for s in streams
    )


def _chapter_infos(chapters: list[dict[str, Any]]) -> tuple[ChapterInfo, ...]:
    return tuple(
        ChapterInfo(
            start=chapter["start"] * Fraction(chapter["time_base"] or 1),
            end=chapter["end"] * Fraction(chapter["time_base"] or 1),
            title=chapter["metadata"].get("title"),
        )
        for chapter in chapters
    )


_DURATION_TAG = re.compile(r"^(\d+):(\d\d):(\d\d(?:\.\d+)?)$")


def _check_header_duration(source: Path, video: VideoInfo, stream: Any) -> None:
    """A header that promises much more video than the packets hold means a truncated file."""
    declared: Fraction | None = None
    if stream.duration:
        declared = stream.duration * video.time_base
    else:
        match = _DURATION_TAG.match(stream.metadata.get("DURATION", ""))  # Matroska's per-track tag
        if match:
            hours, minutes, seconds = match.groups()
            declared = Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
    if declared is None:
        return
    tolerance = max(Fraction(1), declared / 50)
    if declared - video.duration > tolerance:
        raise InputError(
            source,
            f"is truncated or corrupt: its header says the video lasts {float(declared):.2f} s "
            f"but its frames end after {float(video.duration):.2f} s",
        )


def check_output_path(input_path: str | Path, output_path: str | Path, overwrite: bool) -> None:
    """Raise :class:`OutputPathError` unless ``output_path`` can take the upscaled video.

    Checks: a supported container suffix, not the input file itself, not an existing file
    (unless ``overwrite``), not a directory, and a directory that exists and accepts new files.
    """
    output = Path(output_path)
    suffix = output.suffix.lower()
    if suffix not in CONTAINER_FORMATS:
        supported = ", ".join(sorted(CONTAINER_FORMATS))
        shown = suffix or "no extension"
        raise OutputPathError(output, f"has {shown}; esrfarm writes {supported}")
    if os.path.realpath(output) == os.path.realpath(input_path) or (
        output.exists() and Path(input_path).exists() and os.path.samefile(output, input_path)
    ):
        raise OutputPathError(output, "is the input file; choose another output path")
    if output.is_dir():
        raise OutputPathError(output, "is a directory; give a file name")
    if output.exists() and not overwrite:
        raise OutputPathError(output, "already exists (pass --overwrite to replace it)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise OutputPathError(output, f"cannot be written: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputPathError(output, f"cannot be written: {parent} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".esrfarm-write-check-"):
            pass
    except OSError as exc:
        raise OutputPathError(
            output, f"cannot be written: directory {parent} does not accept new files ({exc.strerror})"
        ) from exc
