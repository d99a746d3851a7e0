"""What "correct" means for an upscaled video, as one assertion shared by the media and end-to-end tests.

Output against source: the same frame count, dimensions times the scale, the exact frame-rate string
(CFR) or per-frame timestamps within one tick (VFR), every audio stream's packets byte-identical and
in sync, subtitles, chapters, title, and colour tags.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from media.probe import MediaInfo, probe


def packets(path: Path, stream_type: str) -> list[list[tuple[int | None, bytes]]]:
    """Every stream of ``stream_type``: its packets' (pts in microseconds, bytes)."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == stream_type]
        if not streams:
            return []
        indices = [s.index for s in streams]  # read up front: PyAV streams go stale after EOF
        found: dict[int, list[tuple[int | None, bytes]]] = {index: [] for index in indices}
        for packet in container.demux(streams):
            if packet.size:
                pts = None if packet.pts is None else round(packet.pts * packet.time_base * 1_000_000)
                found[packet.stream_index].append((pts, bytes(packet)))
    return [found[index] for index in indices]


def relative_seconds(info: MediaInfo) -> list[Fraction]:
    video = info.video
    return [(p - info.start_time / video.time_base) * video.time_base for p in video.frame_pts]


def audio_lead(stream: list[tuple[int | None, bytes]], info: MediaInfo) -> Fraction:
    """Seconds from the first video frame to the first audio packet (negative: audio first)."""
    first_audio = stream[0][0]
    assert first_audio is not None
    first_video = info.video.frame_pts[0] * info.video.time_base
    return Fraction(first_audio, 1_000_000) - first_video


def assert_faithful_upscale(source: Path, output: Path, scale: int) -> None:
    """``output`` is ``source`` upscaled ``scale`` times, with everything else carried over."""
    info = probe(source, full_decode=True)
    result = probe(output, full_decode=True)
    src, out = info.video, result.video

    assert out.frame_count == src.frame_count
    assert (out.width, out.height) == (scale * src.width, scale * src.height)
    if src.is_vfr:
        tick = max(src.time_base, out.time_base)
        worst = max(abs(a - b) for a, b in zip(relative_seconds(info), relative_seconds(result), strict=True))
        assert worst <= tick, f"timestamps off by {float(worst)} s"
    else:
        assert out.frame_rate_str == src.frame_rate_str
        with av.open(str(output)) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == src.frame_rate
            assert stream.base_rate == src.frame_rate

    # Audio copied, not re-encoded: the same packets, at the same times relative to the video.
    assert len(result.audio) == len(info.audio)
    assert [(a.codec, a.channels, a.language or "und") for a in result.audio] == [
        (a.codec, a.channels, a.language or "und") for a in info.audio
    ]
    for source_stream, output_stream in zip(packets(source, "audio"), packets(output, "audio"), strict=True):
        assert [data for _, data in output_stream] == [data for _, data in source_stream]
        assert abs(audio_lead(source_stream, info) - audio_lead(output_stream, result)) <= Fraction(1, 1000)

    assert [s.language or "und" for s in result.subtitles] == [s.language or "und" for s in info.subtitles]
    if info.subtitles:
        assert result.subtitles[0].codec == (
            "mov_text" if output.suffix == ".mp4" else info.subtitles[0].codec
        )
    assert [(c.start, c.end, c.title) for c in result.chapters] == [
        (c.start, c.end, c.title) for c in info.chapters
    ]
    if "title" in info.metadata:
        assert result.metadata["title"] == info.metadata["title"]

    # Colour: the conversion extraction used, written as tags; primaries/transfer carried.
    assert out.color.matrix == src.conversion.matrix
    assert out.color.range == src.conversion.range
    assert (out.color.primaries, out.color.transfer) == (src.color.primaries, src.color.transfer)
    assert not out.conversion.guessed
