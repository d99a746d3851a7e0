"""Long videos: encode the upscaled frames as segments, then join the segments without re-encoding.

::

    frames a..b --(encode_segment, one ffmpeg per segment, several in parallel)--> seg-0001.mp4 ...
    (or frames in memory, a worker's segment: encode_segment_frames)
    segments, in order --(join_segments: packets copied, exact timestamps)--> .video.part (MP4)
    .video.part + source --ffmpeg: -c:v copy; audio, subtitles, chapters, metadata, rotation, colour
    tags carried over once from the source--> temp file --> checked --> output

Segment container: MP4 (non-fragmented, video only). It stores every packet's pts *and* dts
exactly, in a track timescale taken from the encoder time base (``1001/30000`` -> 30000, VFR
``1/90000`` -> 90000), keeps the codec's extradata, colour (``colr``) and SAR (``pasp``), and holds
every codec esrfarm writes (H.264, H.264 RGB, HEVC, AV1, FFV1). Matroska would round timestamps to
1 ms (a ``30000/1001`` rate would not survive), MPEG-TS to 1/90000 s, and NUT keeps no dts. A
segment is written whole and renamed only once checked, so it needs no fragmentation; a truncated
one (no ``moov``) simply does not open.

Segment boundaries: every segment is its own encoder run with the same settings, so it starts on
an IDR frame and references nothing outside itself (closed at both ends, whatever the GOP
settings inside). Its frames carry the pts they have in the source timeline (not restarted at 0).
What does differ between runs is the encoder delay: x264 with B-frames gives a 1-frame segment
``dts == pts`` but a longer one ``dts = pts - 2 frames`` at its start, so the segments' own dts
are not monotonic across a join. The join therefore re-stamps: pts from the source timing (the
segment's frame of rank r is source frame ``first + r``; checked against the segment's own pts),
dts from one reorder depth ``D`` for the whole stream (``dts[i] = pts_sorted[i - D]``, the
smallest depth that keeps every ``dts <= pts``), as a single encoder run would.

Joining checks every segment first: readable, one video stream, starts with a keyframe, the
same codec, size and extradata (parameter sets) as segment 1 (a stream copy keeps only one set),
and timestamps that are exactly the next frames of the source. Any failure names the segment and
leaves neither the output nor a temporary file.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from manifests.atomic import temp_path
from manifests.frames import frame_size
from manifests.layout import FrameFormat
from media.encode import (
    PART_SUFFIX,
    EncodeSettings,
    FrameFeed,
    _carry_over_args,
    _color_args,
    _container_args,
    _input_args,
    _Timing,
    _timing,
    _video_encode_args,
    atomic_output,
    check_packet_count,
    count_video_packets,
    frame_paths,
    frames_pix_fmt,
    output_container,
    read_frames,
    run_frame_encoder,
)
from media.errors import MediaError, OutputPathError, SegmentError
from media.ffmpeg import FFmpegProcess
from media.probe import MediaInfo

log = logging.getLogger(__name__)

#: The container every segment is written in (``-f mp4``), whatever its file name.
SEGMENT_FORMAT = "mp4"
#: The suffix segment files should have (the caller names them).
SEGMENT_SUFFIX = ".mp4"


def segment_timing(info: MediaInfo, first_frame: int, count: int) -> _Timing:
    """The timing of frames ``first_frame .. first_frame + count - 1`` within the whole video's."""
    whole = _timing(info)
    return replace(whole, pts=whole.pts[first_frame - 1 : first_frame - 1 + count])


def encode_segment(
    info: MediaInfo,
    frames_dir: str | Path,
    first_frame: int,
    count: int,
    segment_path: str | Path,
    *,
    settings: EncodeSettings,
    frame_format: FrameFormat = FrameFormat.PNG,
    threads: int | None = None,
    encoder_threads: int | None = None,
    sources: Sequence[int] | None = None,
) -> Path:
    """Encode frames ``first_frame .. first_frame + count - 1`` (1-based) into one video-only segment.

    ``sources`` (one per frame) name the frame file each frame is read from, for held frames that
    reuse another's upscaled file (``--dedup``); default: its own. Each keeps its own timestamp.
    ``threads`` frame readers run ahead of the encoder. Otherwise :func:`encode_segment_frames`,
    with the frames read from ``frames_dir``.
    """
    _check_range(info, first_frame, count)
    directory = Path(frames_dir)
    paths = frame_paths(directory, first_frame, count, frame_format, sources)
    frames = read_frames(paths, frame_format, directory, threads, first_frame, info.video.frame_bit_depth)
    return encode_segment_frames(
        info, frames, first_frame, count, segment_path, settings=settings, frame_format=frame_format,
        encoder_threads=encoder_threads, where=directory, names=[path.name for path in paths],
    )  # fmt: skip


def encode_segment_frames(
    info: MediaInfo,
    frames: Iterable[np.ndarray],
    first_frame: int,
    count: int,
    segment_path: str | Path,
    *,
    settings: EncodeSettings,
    frame_format: FrameFormat,
    encoder_threads: int | None = None,
    where: str | Path | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Encode ``frames`` (``count`` arrays: the upscaled frames ``first_frame ..`` in the layout
    frame files of ``frame_format`` hold for this source: (H, W, 3) uint8 / uint16 RGB, or I420
    planes (H * 3 / 2, W) of the source's own pixel format for ``yuv``) into one video-only segment.

    The frames keep the timestamps they have in the source (``info``), and are converted with the
    source's matrix and range and tagged with its colour and SAR (see :mod:`media.encode`).
    ``encoder_threads`` caps the encoder's own threads (``-threads``; useful when several segments
    are encoded at once). ``where`` and ``names`` say what an error names the frames by (default:
    the source, and "frame N"). An existing file at ``segment_path`` (say, a damaged segment of an
    earlier run) is replaced. Written under a temporary name, checked (``count`` packets) and
    renamed; on failure (an exception out of ``frames`` included) nothing is left and
    :class:`FramesError`, :class:`FFmpegError`, :class:`EncodeSettingsError` or :class:`MediaError`
    is raised. ``frames`` is closed, however this ends. Returns ``segment_path``.
    """
    target = Path(segment_path)
    iterator = iter(frames)
    try:
        _check_range(info, first_frame, count)
        if not target.parent.is_dir():
            raise OutputPathError(target, f"cannot be written: directory {target.parent} does not exist")
        settings.check_available()
        head = next(iterator, None)
        if head is None:
            raise MediaError(f"no frames came for segment {target}")
        width, height = frame_size(head, frame_format)
        settings.check_frame_size(width, height)
        pix_fmt = frames_pix_fmt(frame_format, info.video.pix_fmt, info.video.frame_bit_depth)
        timing = segment_timing(info, first_frame, count)
        action = f"encoding frames {first_frame}-{first_frame + count - 1} into segment {target}"
        log.info("%s with %s", action, settings.codec)
        with atomic_output(target) as tmp:
            # -copyts: the frames keep their place in the source timeline (ffmpeg would restart at 0).
            args = ["-y", "-copyts", "-f", "nut", "-i", "pipe:0", "-map", "0:v:0"]
            args += _video_encode_args(info, settings, timing, pix_fmt)
            if encoder_threads:
                args += ["-threads:v", str(encoder_threads)]
            # One timescale for the track and the movie (its edit list): the source ticks, kept exact.
            scale = str(timing.time_base.denominator)
            args += ["-video_track_timescale", scale, "-movie_timescale", scale, "-map_metadata", "-1"]
            args += ["-f", SEGMENT_FORMAT, str(tmp)]
            feed = FrameFeed(
                itertools.chain([head], iterator), frame_format, (width, height), timing,
                Path(where if where is not None else info.path), first_frame, pix_fmt, names,
            )  # fmt: skip
            run_frame_encoder(args, action, feed)
            check_packet_count(tmp, target, count)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return target


def _check_range(info: MediaInfo, first_frame: int, count: int) -> None:
    total = info.video.frame_count
    if count < 1 or first_frame < 1 or first_frame + count - 1 > total:
        raise ValueError(f"frames {first_frame}..{first_frame + count - 1} are not within 1..{total}")


def segment_is_complete(path: str | Path, expected_count: int) -> bool:
    """Whether ``path`` is a finished segment of ``expected_count`` frames (opens, one video stream,
    that many packets). A missing, truncated or garbled file is not."""
    try:
        return count_video_packets(Path(path)) == expected_count
    except (av.error.FFmpegError, IndexError, OSError):
        return False


@dataclass(frozen=True)
class _Segment:
    path: Path
    count: int
    first_frame: int
    depth: int  # reorder depth: the most packets any packet is decoded ahead of its display rank


def _scan_segment(path: Path, number: int, first_frame: int, timing: _Timing, reference: Any) -> _Segment:
    """Check one segment (see the module docstring) and measure its reorder depth."""
    try:
        container = av.open(str(path))
    except FileNotFoundError as exc:
        raise SegmentError(path, number, "does not exist") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise SegmentError(path, number, f"can't be read (truncated or damaged?): {exc}") from exc
    with container:
        if len(container.streams.video) != 1:
            raise SegmentError(path, number, f"holds {len(container.streams.video)} video streams, not 1")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if reference is not None:
            ref_name, ref_size, ref_extradata = reference
            if ctx.name != ref_name or (ctx.width, ctx.height) != ref_size:
                raise SegmentError(
                    path, number, f"holds {ctx.name} {ctx.width}x{ctx.height}, but segment 1 holds "
                    f"{ref_name} {ref_size[0]}x{ref_size[1]}",
                )  # fmt: skip
            if bytes(ctx.extradata or b"") != ref_extradata:
                raise SegmentError(
                    path, number, "was encoded with other settings than segment 1 (its parameter sets differ)"
                )
        stream_tb = Fraction(stream.time_base or 1)
        pts: list[Fraction] = []
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if not pts and not packet.is_keyframe:
                    raise SegmentError(path, number, "does not start with a keyframe")
                if packet.pts is None or packet.is_corrupt:
                    raise SegmentError(path, number, f"packet {len(pts) + 1} is damaged or has no timestamp")
                pts.append(packet.pts * stream_tb)
        except av.error.FFmpegError as exc:
            raise SegmentError(path, number, f"can't be read after {len(pts)} packets: {exc}") from exc
    if not pts:
        raise SegmentError(path, number, "holds no video frames")
    total = len(timing.pts)
    last_frame = first_frame + len(pts) - 1
    if last_frame > total:
        raise SegmentError(
            path, number, f"holds frames {first_frame}-{last_frame}, but the video has only {total} frames"
        )
    expected = [p * timing.time_base for p in timing.pts[first_frame - 1 : last_frame]]
    display = sorted(pts)
    half_tick = min(timing.time_base, stream_tb) / 2
    for rank, (got, want) in enumerate(zip(display, expected, strict=True)):
        if abs(got - want) > half_tick:
            raise SegmentError(
                path, number, f"should start at frame {first_frame}, but its frame {rank + 1} is at "
                f"{float(got):.6f} s where frame {first_frame + rank} is at {float(want):.6f} s",
            )  # fmt: skip
    ranks = {value: rank for rank, value in enumerate(display)}
    depth = max(i - ranks[value] for i, value in enumerate(pts))
    return _Segment(path, len(pts), first_frame, depth)


def _decode_timestamps(timing: _Timing, depth: int) -> list[int]:
    """``dts[i] = pts[i - depth]``, mirrored before the first frame (``pts[0] - (pts[k] - pts[0])``)."""
    pts = timing.pts
    return [pts[i - depth] if i >= depth else 2 * pts[0] - pts[depth - i] for i in range(len(pts))]


def _add_video_stream(output: Any, template: Any, settings: EncodeSettings) -> Any:
    """An output stream with ``template``'s codec parameters, to copy its packets into.

    PyAV builds it with the template's codec by name; where that codec is a decoder only (AV1 is
    read by ``libdav1d``), it is built with the encoder of ``settings`` and the parameters that
    matter copied one by one.
    """
    try:
        return output.add_stream_from_template(template)
    except av.codec.codec.UnknownCodecError:
        pass
    stream = output.add_stream(settings.codec)
    source, ctx = template.codec_context, stream.codec_context
    ctx.width, ctx.height, ctx.pix_fmt = source.width, source.height, source.pix_fmt
    ctx.extradata = source.extradata
    ctx.sample_aspect_ratio = source.sample_aspect_ratio
    for name in ("color_primaries", "color_trc", "colorspace", "color_range"):
        setattr(ctx, name, getattr(source, name))
    return stream


def _write_joined_video(
    segments: Sequence[_Segment], timing: _Timing, last_duration: int, settings: EncodeSettings, target: Path
) -> None:
    """Copy every segment's packets, in order, into one MP4 with the source's exact timestamps."""
    depth = max(segment.depth for segment in segments)
    dts = _decode_timestamps(timing, depth)
    durations = [b - a for a, b in itertools.pairwise(timing.pts)]
    durations.append(last_duration)
    with av.open(str(segments[0].path)) as first:
        template = first.streams.video[0]
        output: Any = av.open(str(target), mode="w", format="mp4")
        try:
            out_stream = _add_video_stream(output, template, settings)
            out_stream.time_base = timing.time_base
            decoded = 0
            for segment in segments:
                with av.open(str(segment.path)) as container:
                    stream = container.streams.video[0]
                    packets = [p for p in container.demux(stream) if p.size]
                    display = sorted(int(p.pts or 0) for p in packets)
                    rank = {value: r for r, value in enumerate(display)}
                    for packet in packets:
                        frame = segment.first_frame - 1 + rank[int(packet.pts or 0)]
                        packet.stream = out_stream
                        packet.time_base = timing.time_base
                        packet.pts = timing.pts[frame]
                        packet.dts = dts[decoded]
                        packet.duration = durations[frame]
                        output.mux(packet)
                        decoded += 1
        finally:
            output.close()


def join_segments(
    info: MediaInfo,
    segments: Sequence[str | Path],
    output: str | Path,
    *,
    settings: EncodeSettings,
    overwrite: bool = False,
) -> Path:
    """Join ``segments`` (in order, covering frames 1..N of ``info``) into ``output``, without
    re-encoding, and carry over once from the source: audio (copied), subtitles, attachments,
    chapters, metadata, rotation, SAR, colour tags, ``hvc1`` for HEVC in MP4/MOV. ``settings`` are
    the ones the segments were encoded with.

    Raises :class:`SegmentError` (a segment missing, damaged, out of place or encoded otherwise),
    :class:`MediaError` (the segments don't add up to the video), :class:`OutputPathError`,
    :class:`EncodeSettingsError`, :class:`FFmpegError`. On any failure neither the output nor a
    temporary file is left. The segments are only read; the caller may delete them afterwards.
    """
    target = Path(output)
    container = output_container(info, target, settings, overwrite=overwrite)
    if not segments:
        raise MediaError(f"no segments to join into {target}")
    timing = _timing(info)
    total = info.video.frame_count
    scanned: list[_Segment] = []
    reference = None
    next_frame = 1
    for number, path in enumerate(map(Path, segments), start=1):
        segment = _scan_segment(path, number, next_frame, timing, reference)
        if reference is None:
            with av.open(str(path)) as first:
                ctx = first.streams.video[0].codec_context
                reference = (ctx.name, (ctx.width, ctx.height), bytes(ctx.extradata or b""))
        scanned.append(segment)
        next_frame += segment.count
    if next_frame - 1 != total:
        raise MediaError(
            f"the {len(scanned)} segments for {target} hold {next_frame - 1} frames, "
            f"but the video has {total}"
        )
    log.info("joining %d segments (%d frames) into %s", len(scanned), total, target)
    video_part = temp_path(target, ".video" + PART_SUFFIX)
    try:
        try:
            last_duration = info.video.last_frame_duration if info.video.is_vfr else 1  # in timing ticks
            _write_joined_video(scanned, timing, last_duration, settings, video_part)
        except av.error.FFmpegError as exc:
            raise MediaError(f"the segments could not be joined into {target}: {exc}") from exc
        with atomic_output(target) as tmp:
            args = _join_args(info, settings, container, timing, video_part, tmp)
            with FFmpegProcess(args, action=f"joining segments into {target}", stage="join") as ffmpeg:
                ffmpeg.finish()
            check_packet_count(tmp, target, total)
    finally:
        with contextlib.suppress(FileNotFoundError):
            video_part.unlink()
    log.info("wrote %s", target)
    return target


def _join_args(
    info: MediaInfo, settings: EncodeSettings, container: str, timing: _Timing, video: Path, target: Path
) -> list[str]:
    """The ffmpeg arguments of the join: the joined video (input 0, copied), the source (input 1).

    The colour tags are given again: a stream copy takes them from the options as an encoder would.
    """
    _, tag_args = _color_args(info, settings)
    return [
        *_input_args(info, timing, ["-i", str(video)]),
        *_carry_over_args(info, container),
        "-c:v",
        "copy",
        *tag_args,
        *_container_args(settings, container, target),
    ]


__all__ = [
    "SEGMENT_FORMAT",
    "SEGMENT_SUFFIX",
    "SegmentError",
    "encode_segment",
    "encode_segment_frames",
    "join_segments",
    "segment_is_complete",
    "segment_timing",
]
