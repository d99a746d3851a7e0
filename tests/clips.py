"""Generate small test clips with the real ffmpeg binary (``testsrc2``, ``sine``, ``color``...).

Every helper writes one file and returns its path. Clips are tiny (64x36 or so, a few dozen
frames) so a whole test module builds its clips in a second or two.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from media.ffmpeg import run_ffmpeg

X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")


def ffmpeg(args: Sequence[str]) -> None:
    run_ffmpeg(["-y", *args], action="generating a test clip")


def video(
    path: Path,
    *,
    size: str = "64x36",
    rate: str = "25",
    frames: int = 10,
    codec: Sequence[str] = X264,
    extra: Sequence[str] = (),
    input_args: Sequence[str] = (),
) -> Path:
    """A ``testsrc2`` clip of exactly ``frames`` frames at ``rate``, no audio.

    ``input_args`` go before the input (``-display_rotation 90`` tags a rotation); ``extra`` after
    the codec options.
    """
    rotation = ["-noautorotate"] if "-display_rotation" in input_args else []
    ffmpeg(
        [
            *rotation, *input_args, "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
            "-frames:v", str(frames), *codec, *extra, str(path),
        ]
    )  # fmt: skip
    return path


def video_with_audio(
    path: Path,
    *,
    size: str = "64x36",
    rate: str = "30000/1001",
    seconds: float = 3.0,
    audio_delay: float = 0.0,
) -> Path:
    """``testsrc2`` plus a stereo AAC ``sine``, both ``seconds`` long; the audio starts
    ``audio_delay`` seconds after the video (negative: before it)."""
    ffmpeg(
        [
            "-itsoffset", str(max(0.0, -audio_delay)),
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}",
            "-itsoffset", str(max(0.0, audio_delay)),
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
            "-filter:a", "aformat=channel_layouts=stereo",
            *X264, "-c:a", "aac", "-b:a", "64k", str(path),
        ]
    )  # fmt: skip
    return path


def odd_size_video(path: Path, *, size: tuple[int, int] = (161, 91), frames: int = 12) -> Path:
    """An odd-sized clip (yuv444p: 4:2:0 can't have odd dimensions)."""
    width, height = size
    ffmpeg(
        [
            "-f", "lavfi", "-i", f"testsrc2=size={width + 1}x{height + 1}:rate=25",
            "-vf", f"format=yuv444p,crop={width}:{height}:0:0", "-frames:v", str(frames),
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p", str(path),
        ]
    )  # fmt: skip
    return path


def vfr_video(path: Path, *, frames: int = 30) -> Path:
    """A variable-frame-rate clip in a 1/90000 time base: irregular gaps, first pts not 0."""
    expr = "N*3000 + if(gt(N,10),4500,0) + if(eq(mod(N,3),0),1170,0) + if(gt(N,20),N*500,0)"
    ffmpeg(
        [
            "-f", "lavfi", "-i", "testsrc2=size=64x36:rate=30",
            "-vf", f"settb=1/90000,setpts='{expr}'", "-frames:v", str(frames),
            "-fps_mode", "passthrough", "-enc_time_base:v", "1/90000", *X264,
            "-video_track_timescale", "90000", str(path),
        ]
    )  # fmt: skip
    return path


def hevc_open_gop_video(path: Path, *, frames: int = 30, keyint: int = 8) -> Path:
    """HEVC with B-frames and open GOPs: a CRA every ``keyint`` frames, whose leading (RASL) frames
    refer to the GOP before it, so a decoder that starts at a CRA cannot show them."""
    params = f"log-level=error:keyint={keyint}:min-keyint={keyint}:scenecut=0:open-gop=1:bframes=3:b-adapt=0"
    ffmpeg(
        [
            "-f", "lavfi", "-i", "testsrc2=size=64x36:rate=24", "-frames:v", str(frames),
            "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", params, "-pix_fmt", "yuv420p",
            str(path),
        ]
    )  # fmt: skip
    return path


def late_start_video(path: Path, *, frames: int = 20, start_s: float = 1.5, keyint: int = 6) -> Path:
    """H.264 with B-frames whose first frame (a keyframe) is at ``start_s``, not at time zero."""
    return video(
        path, frames=frames, rate="25",
        codec=("-c:v", "libx264", "-preset", "veryfast", "-g", str(keyint), "-pix_fmt", "yuv420p"),
        extra=("-output_ts_offset", str(start_s)),
    )  # fmt: skip


SRT = """1
00:00:00,100 --> 00:00:00,800
Hello, subtitles.

2
00:00:01,000 --> 00:00:01,800
Second line.
"""

FFMETADATA = """;FFMETADATA1
title=esrfarm test clip

[CHAPTER]
TIMEBASE=1/1000
START=0
END=1000
title=Opening

[CHAPTER]
TIMEBASE=1/1000
START=1000
END=2000
title=Ending
"""


def rich_mkv(path: Path, *, seconds: float = 2.0) -> Path:
    """MKV: video, two audio tracks (AAC stereo, FLAC mono), an SRT track, chapters, a title."""
    srt = path.with_suffix(".srt")
    srt.write_text(SRT)
    meta = path.with_suffix(".ffmeta")
    meta.write_text(FFMETADATA)
    ffmpeg(
        [
            "-f", "lavfi", "-i", f"testsrc2=size=64x36:rate=24:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=880:sample_rate=44100:duration={seconds}",
            "-i", str(srt), "-f", "ffmetadata", "-i", str(meta),
            "-map", "0:v", "-map", "1:a", "-map", "2:a", "-map", "3:s",
            "-map_metadata", "4", "-map_chapters", "4",
            "-filter:a:0", "aformat=channel_layouts=stereo",
            *X264, "-c:a:0", "aac", "-b:a:0", "64k", "-c:a:1", "flac", "-c:s", "srt",
            "-metadata:s:a:0", "language=eng", "-metadata:s:a:1", "language=fra",
            "-metadata:s:s:0", "language=eng", str(path),
        ]
    )  # fmt: skip
    return path


def flat_color(
    path: Path,
    rgb: tuple[int, int, int],
    *,
    matrix: str | None,
    size: str = "64x36",
    frames: int = 3,
    full_range: bool = False,
    tag: bool = True,
) -> Path:
    """A flat ``rgb`` clip converted to YUV with ``matrix`` (scale filter name: bt709, bt601).

    ``tag`` writes the matching colour tags (matrix, primaries, transfer, range) into the file;
    without it the file is untagged and a reader must guess the matrix. Encoded with qp 0 so the
    YUV values are exactly the converter's.
    """
    hex_color = "0x{:02X}{:02X}{:02X}".format(*rgb)
    out_range = "pc" if full_range else "tv"
    convert = f"scale=out_color_matrix={matrix or 'bt601'}:out_range={out_range},format=yuv420p"
    # setparams tags the frames (the encoder takes its colour tags from them), or clears the tags
    # the scale filter set.
    name = {"bt709": "bt709", "bt601": "smpte170m"}[matrix or "bt601"] if tag else "unknown"
    range_tag = out_range if tag else "unknown"
    convert += f",setparams=color_primaries={name}:color_trc={name}:colorspace={name}:range={range_tag}"
    ffmpeg(
        [
            "-f", "lavfi", "-i", f"color=c={hex_color}:size={size}:rate=25",
            "-vf", f"format=rgb24,{convert}", "-frames:v", str(frames),
            "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", str(path),
        ]
    )  # fmt: skip
    return path


def zero_frame_video(path: Path) -> Path:
    """An MKV with an (FFV1) video stream holding no frames, beside a second of silent FLAC.

    Written with PyAV: the ffmpeg CLI refuses to write a video stream it never got a frame for.
    """
    import av

    with av.open(str(path), "w") as container:
        video_stream = container.add_stream("ffv1", rate=25)
        video_stream.width, video_stream.height, video_stream.pix_fmt = 64, 36, "yuv420p"
        audio_stream = container.add_stream("flac", rate=8000)
        audio_stream.layout = "mono"
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 800
            container.mux(audio_stream.encode(frame))
        container.mux(audio_stream.encode(None))
        container.mux(video_stream.encode(None))
    return path


def corrupt_copy(source: Path, target: Path, *, garble_at: float = 0.4, garble_bytes: int = 4000) -> Path:
    """``source`` with ``garble_bytes`` random bytes overwritten at ``garble_at`` of its length."""
    data = bytearray(source.read_bytes())
    start = int(len(data) * garble_at)
    rng = np.random.default_rng(1)
    data[start : start + garble_bytes] = rng.integers(0, 256, size=garble_bytes, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    return target


def truncated_copy(source: Path, target: Path, *, keep: float = 0.5) -> Path:
    """The first ``keep`` fraction of ``source``."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def upscale_nearest(frame: np.ndarray, scale: int) -> np.ndarray:
    """Deterministic stand-in for the model: each pixel repeated ``scale`` x ``scale`` times."""
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def ramp_10bit(path: Path, *, width: int = 1024, height: int = 16, frames: int = 3) -> Path:
    """A slow horizontal luma ramp in ``yuv420p10le`` (FFV1, lossless): codes 64 to 940 (10-bit
    limited range) across ``width`` pixels, one new code every ~1.2 pixels, grey chroma."""
    luma = np.tile(np.round(np.linspace(64, 940, width)).astype("<u2"), (height, 1))
    chroma = np.full((height // 2, width // 2), 512, dtype="<u2")
    frame = luma.tobytes() + chroma.tobytes() + chroma.tobytes()
    raw = path.with_suffix(".yuv")
    raw.write_bytes(frame * frames)
    ffmpeg(
        [
            "-f", "rawvideo", "-pix_fmt", "yuv420p10le", "-s", f"{width}x{height}", "-r", "25",
            "-i", str(raw), "-c:v", "ffv1", "-pix_fmt", "yuv420p10le", str(path),
        ]
    )  # fmt: skip
    raw.unlink()
    return path


#: The HDR10 static metadata :func:`hdr10_video` writes (x265's units: 0.00002 and 0.0001 cd/m2).
HDR10_MASTER_DISPLAY = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)"
HDR10_MAX_CLL = (1000, 400)


def hdr10_video(path: Path, *, size: str = "64x48", frames: int = 4) -> Path:
    """An HDR10 clip made with x265: 10-bit, PQ, BT.2020 primaries and matrix, mastering display
    :data:`HDR10_MASTER_DISPLAY` and content light level :data:`HDR10_MAX_CLL`."""
    params = (
        "log-level=error:hdr10=1:colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc"
        f":master-display={HDR10_MASTER_DISPLAY}:max-cll={HDR10_MAX_CLL[0]},{HDR10_MAX_CLL[1]}"
    )
    ffmpeg(
        [
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25", "-frames:v", str(frames),
            "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", params, "-pix_fmt", "yuv420p10le",
            "-color_primaries", "bt2020", "-color_trc", "smpte2084", "-colorspace", "bt2020nc",
            "-color_range", "tv", str(path),
        ]
    )  # fmt: skip
    return path


# -- clips for --dedup: held frames, and changes a detector must not call repeats ------------------


def held_video(
    path: Path, source: Path, *, hold: int, frames: int, size: str = "128x72", crf: int = 18, rate: str = "25"
) -> Path:
    """``source``'s frames each held for ``hold`` frames (animation "on twos" / "on threes"), scaled
    to ``size`` and re-encoded with libx264 at ``crf``: the repeats are near, not exact. The clip has
    ``frames`` frames; frame ``i`` (1-based) shows source frame ``(i - 1) // hold``."""
    width, height = size.split("x")
    ffmpeg(
        [
            "-i", str(source), "-vf", f"setpts={hold}*PTS,scale={width}:{height},fps={rate}",
            "-frames:v", str(frames), "-c:v", "libx264", "-preset", "medium", "-crf", str(crf),
            "-pix_fmt", "yuv420p", str(path),
        ]
    )  # fmt: skip
    return path


def still_image(path: Path, *, size: str = "256x144", source: Path | None = None, at: int = 0) -> Path:
    """One frame as a PNG: frame ``at`` of ``source``, or a ``testsrc2`` frame of ``size``."""
    inputs = ["-i", str(source)] if source is not None else ["-f", "lavfi", "-i", f"testsrc2=size={size}"]
    ffmpeg([*inputs, "-vf", f"select=eq(n\\,{at})", "-frames:v", "1", str(path)])
    return path


def pan_video(path: Path, still: Path, *, size: str = "128x72", frames: int = 24, crf: int = 18) -> Path:
    """A window of ``size`` moving right over ``still`` by 1 pixel per frame (a slow pan)."""
    width, height = size.split("x")
    return _from_still(path, still, f"crop={width}:{height}:n:(ih-{height})/2", frames, crf)


def fade_video(path: Path, still: Path, *, size: str = "128x72", frames: int = 24, crf: int = 18) -> Path:
    """``still`` (scaled to ``size``) fading out to black over all ``frames`` frames."""
    width, height = size.split("x")
    return _from_still(path, still, f"scale={width}:{height},fade=out:0:{frames}", frames, crf)


def small_change_video(
    path: Path,
    still: Path,
    *,
    size: str = "128x72",
    frames: int = 24,
    crf: int = 18,
    square: int = 16,
    opacity: float = 0.3,
) -> Path:
    """``still`` (scaled to ``size``) where only a ``square`` x ``square`` pixel area changes every
    fourth frame: a grey box at ``opacity`` over it shows in frames 5-8, 13-16, ... (1-based). The box
    lies off the 8-pixel grid (at x = 37, y = 21), across the detector's windows."""
    width, height = size.split("x")
    box = f"drawbox=x=37:y=21:w={square}:h={square}:color=gray@{opacity}:t=fill:enable='mod(floor(n/4),2)'"
    return _from_still(path, still, f"scale={width}:{height},{box}", frames, crf)


def _from_still(path: Path, still: Path, video_filter: str, frames: int, crf: int) -> Path:
    """``frames`` frames at 25 fps of ``still`` looped through ``video_filter``, libx264 at ``crf``."""
    ffmpeg(
        [
            "-loop", "1", "-i", str(still), "-vf", video_filter, "-frames:v", str(frames), "-r", "25",
            "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", str(path),
        ]
    )  # fmt: skip
    return path
