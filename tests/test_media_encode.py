"""The encode the job runs (real ffmpeg, generated clips): probe -> extract -> "upscale" -> one
segment per chunk (``encode_segment``) -> ``join_segments`` -> check.

A 2x nearest-neighbour numpy upscale stands in for the model; the model path is tested elsewhere.
Segment mechanics (B-frames across boundaries, parallel encodes, the join's refusals) are in
``test_media_segments.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from manifests.chunks import plan_chunks
from manifests.frames import read_frame, write_frame
from manifests.layout import FrameFormat, frame_filename
from media.encode import EncodeSettings, settings_for_depth, subtitle_codec_for
from media.errors import EncodeSettingsError, FFmpegError, FramesError, OutputPathError, SegmentError
from media.extract import decode_frames, extract_frames
from media.probe import MediaInfo, SubtitleInfo, probe
from media.segments import SEGMENT_SUFFIX, encode_segment, join_segments, segment_is_complete
from tests import clips
from tests.videocheck import assert_faithful_upscale

FAST = EncodeSettings(preset="ultrafast")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encode-clips")


def upscale_frames(info: MediaInfo, work: Path, scale: int, frame_format: FrameFormat) -> Path:
    """Extract ``info``'s frames and write them ``scale`` x bigger into ``work/output``."""
    extract_frames(info, work / "input", frame_format=FrameFormat.NPY)
    out = work / "output"
    out.mkdir()
    for i in range(1, info.video.frame_count + 1):
        frame = np.load(work / "input" / frame_filename(i, FrameFormat.NPY))
        write_frame(
            out / frame_filename(i, frame_format), clips.upscale_nearest(frame, scale), frame_format,
            png_compression=1,
        )  # fmt: skip
    return out


def no_leftovers(directory: Path, *keep: str) -> None:
    leftovers = sorted(p.name for p in directory.iterdir() if p.name not in keep)
    assert leftovers == [], leftovers


def segment_path(segments_dir: Path, index: int) -> Path:
    """Where the job keeps segment ``index`` (``job._segment_path``)."""
    return segments_dir / f"{index:06d}{SEGMENT_SUFFIX}"


def encode_as_the_job_does(
    info: MediaInfo,
    frames: Path,
    output: Path,
    segments_dir: Path,
    *,
    settings: EncodeSettings,
    frame_format: FrameFormat,
    chunk_frames: int,
    overwrite: bool = False,
) -> Path:
    """Chunks of ``chunk_frames`` frames (``plan_chunks``), each encoded as one segment in
    ``segments_dir``, then every segment joined into ``output``: the job's calls, in its order."""
    plan = plan_chunks(
        info.frame_count, batch_size=1, input_frame_bytes=1, output_frame_bytes=1, max_disk=1 << 40,
        max_chunk_frames=chunk_frames,
    )  # fmt: skip
    segments_dir.mkdir(exist_ok=True)
    segments = [segment_path(segments_dir, chunk.index) for chunk in plan.chunks]
    for chunk, path in zip(plan.chunks, segments, strict=True):
        assert (
            encode_segment(
                info, frames, chunk.first, chunk.count, path, settings=settings, frame_format=frame_format
            )
            == path
        )
        assert segment_is_complete(path, chunk.count)
    no_leftovers(segments_dir, *(path.name for path in segments))
    return join_segments(info, segments, output, settings=settings, overwrite=overwrite)


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    # NTSC audio into MP4, VFR into MP4 and subtitles/chapters/attachments into MKV are in
    # test_media_segments.py::test_joined_segments_are_a_faithful_upscale.
    "one.mp4": (lambda p: clips.video(p, frames=1), ".mp4"),
    "seven.mp4": (lambda p: clips.video(p, frames=7), ".mkv"),
    "late-audio.mkv": (
        lambda p: clips.video_with_audio(p, rate="24000/1001", seconds=2.0, audio_delay=0.5),
        ".mp4",
    ),
    "late-video.mkv": (lambda p: clips.video_with_audio(p, rate="25", seconds=2.0, audio_delay=-0.3), ".mkv"),
    "odd.mkv": (lambda p: clips.odd_size_video(p, size=(161, 91)), ".mkv"),
    "vfr-to-mkv.mp4": (lambda p: clips.vfr_video(p, frames=30), ".mkv"),
    "rich-to-mp4.mkv": (lambda p: clips.rich_mkv(p, seconds=2.0), ".mp4"),
    "bt709.mp4": (lambda p: clips.flat_color(p, (200, 60, 40), matrix="bt709"), ".mp4"),
    "bt601.mp4": (lambda p: clips.flat_color(p, (200, 60, 40), matrix="bt601", size="1280x720"), ".mp4"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_upscale_round_trip(clip_dir: Path, tmp_path: Path, name: str) -> None:
    make, suffix = CASES[name]
    source = make(clip_dir / name)
    info = probe(source)
    frame_format = FrameFormat.PNG if name.startswith(("seven", "rich")) else FrameFormat.NPY
    frames = upscale_frames(info, tmp_path, 2, frame_format)
    output = tmp_path / "result" / f"out{suffix}"
    output.parent.mkdir()
    chunk_frames = -(-info.frame_count // 2)  # two segments (one for a single frame)
    got = encode_as_the_job_does(
        info, frames, output, tmp_path / "segments", settings=FAST, frame_format=frame_format,
        chunk_frames=chunk_frames,
    )  # fmt: skip
    assert got == output
    no_leftovers(output.parent, output.name)
    assert_faithful_upscale(source, output, 2)


def test_colour_round_trip_through_yuv(clip_dir: Path, tmp_path: Path) -> None:
    """Flat colours survive extract -> segments (scale 1, yuv420p) -> join -> decode; a mix-up
    of matrix or range would not."""
    rgb = (200, 60, 40)
    for matrix, size in (("bt601", "1280x720"), ("bt709", "64x36")):
        info = probe(
            clips.flat_color(clip_dir / f"round-{matrix}.mp4", rgb, matrix=matrix, size=size, frames=2)
        )
        work = tmp_path / matrix
        frames = upscale_frames(info, work, 1, FrameFormat.NPY)
        output = encode_as_the_job_does(
            info, frames, work / "out.mp4", work / "segments", settings=FAST, frame_format=FrameFormat.NPY,
            chunk_frames=1,
        )  # fmt: skip
        result = probe(output)
        assert result.video.color.matrix == info.video.color.matrix
        decoded = list(decode_frames(result))
        assert len(decoded) == 2
        mean = np.mean([f.reshape(-1, 3).mean(axis=0) for f in decoded], axis=0)
        assert np.abs(mean - rgb).max() <= 3.0, (matrix, mean)


def test_av1_segments_join_into_mp4(clip_dir: Path, tmp_path: Path) -> None:
    """AV1 has no PyAV encoder by its decoder's name: the join builds the stream another way.
    (HEVC into MP4, ``hvc1``: test_media_segments.py::test_hevc_segments_join_into_mp4.)"""
    info = probe(clips.video(clip_dir / "codec.mp4", frames=6))
    frames = upscale_frames(info, tmp_path, 2, FrameFormat.NPY)
    output = encode_as_the_job_does(
        info, frames, tmp_path / "out.mp4", tmp_path / "segments",
        settings=EncodeSettings(codec="libsvtav1", preset="12"), frame_format=FrameFormat.NPY,
        chunk_frames=4,
    )  # fmt: skip
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in {"av1", "libdav1d"}
        assert stream.codec_tag == "av01"
        assert sum(1 for _ in container.decode(stream)) == 6
    assert probe(output).video.frame_count == 6


@pytest.mark.parametrize("sar", [Fraction(128, 117), Fraction(4, 3), Fraction(40, 33), Fraction(4000, 3999)])
def test_any_sample_aspect_ratio_is_carried_exactly(clip_dir: Path, tmp_path: Path, sar: Fraction) -> None:
    """128:117 (PAL/CIF) and any other SAR an encoder can store (libx264 takes terms up to 4096) come
    out as they went in, never reduced to small terms."""
    ratio = f"{sar.numerator}/{sar.denominator}"
    source = clips.video(
        clip_dir / f"sar-{sar.numerator}-{sar.denominator}.mp4", frames=3,
        extra=("-vf", f"setsar=r={ratio}:max={max(sar.numerator, sar.denominator)}"),
    )  # fmt: skip
    info = probe(source)
    assert info.video.sample_aspect_ratio == sar
    frames = upscale_frames(info, tmp_path, 2, FrameFormat.NPY)
    output = encode_as_the_job_does(
        info, frames, tmp_path / "out.mp4", tmp_path / "segments", settings=FAST,
        frame_format=FrameFormat.NPY, chunk_frames=2,
    )  # fmt: skip
    assert probe(output).video.sample_aspect_ratio == sar


def _hdr_side_data(path: Path) -> dict[str, bytes]:
    """The HDR10 static metadata of ``path``'s first decoded frame (its side data, by PyAV)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        wanted = {"MASTERING_DISPLAY_METADATA", "CONTENT_LIGHT_LEVEL"}
        return {sd.type.name: bytes(sd) for sd in frame.side_data if sd.type.name in wanted}


@pytest.mark.parametrize(
    "settings",
    [
        EncodeSettings(),  # the default codec, libx264
        EncodeSettings(codec="libx265", preset="ultrafast"),
        EncodeSettings(codec="libsvtav1", preset="12"),
    ],
    ids=lambda settings: settings.codec,
)
def test_hdr10_static_metadata_is_carried_by_every_codec_that_can(
    clip_dir: Path, tmp_path: Path, settings: EncodeSettings
) -> None:
    """The output's decoded frames carry the source's mastering display and content light level."""
    source = clip_dir / "hdr10.mp4"
    if not source.exists():
        clips.hdr10_video(source, frames=3)
    info = probe(source)
    assert settings.carries_hdr10
    frames = upscale_frames(info, tmp_path, 2, FrameFormat.NPY)
    output = encode_as_the_job_does(
        info, frames, tmp_path / "out.mp4", tmp_path / "segments",
        settings=settings_for_depth(settings, info.video.bit_depth), frame_format=FrameFormat.NPY,
        chunk_frames=2,
    )  # fmt: skip
    side_data = _hdr_side_data(output)
    assert set(side_data) == {"MASTERING_DISPLAY_METADATA", "CONTENT_LIGHT_LEVEL"}
    # The values, as decoded: AV1 stores them in other fixed-point units than H.264/HEVC, so compare
    # them in x265's units (0.00002, 0.0001 cd/m2), which both round to exactly.
    hdr = probe(output).video.hdr
    assert hdr.mastering is not None
    assert hdr.mastering.x265_value() == clips.HDR10_MASTER_DISPLAY
    assert hdr.content_light == clips.HDR10_MAX_CLL


# --- failures leave nothing behind ---------------------------------------------------------------
# (A missing frame, and an unreadable .npy frame: test_media_segments.py::
# test_a_failed_segment_encode_leaves_nothing; the join's refusals are there too.)


@pytest.fixture
def twelve(clip_dir: Path, tmp_path: Path) -> tuple[MediaInfo, Path]:
    info = probe(clips.video(clip_dir / "twelve.mp4", frames=12))
    return info, upscale_frames(info, tmp_path / "work", 2, FrameFormat.PNG)


def write_black_frame(frames: Path, index: int, shape: tuple[int, int]) -> None:
    """Frame ``index`` of ``frames`` as a black PNG of ``shape`` (height, width)."""
    write_frame(
        frames / frame_filename(index), np.zeros((*shape, 3), np.uint8), FrameFormat.PNG, png_compression=1
    )


def refused_join(info: MediaInfo, segments: list[Path], out_dir: Path) -> str:
    """Join ``segments`` into ``out_dir``, which must fail with a SegmentError and leave nothing."""
    out_dir.mkdir()
    with pytest.raises(SegmentError) as caught:
        join_segments(info, segments, out_dir / "out.mp4", settings=FAST)
    no_leftovers(out_dir)
    return str(caught.value)


def test_frame_of_another_size_in_a_segment(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    write_black_frame(frames, 9, (10, 10))
    out_dir = tmp_path / "segments"
    out_dir.mkdir()
    with pytest.raises(FramesError, match=r"frame 9 in .*: 00000009.png is 10x10, but frame 5 is 128x72"):
        encode_segment(info, frames, 5, 8, segment_path(out_dir, 1), settings=FAST)
    no_leftovers(out_dir)


def test_segments_of_another_size_are_not_joined(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    """Every frame of segment 2 has another size than segment 1's: each segment is fine on its own,
    the join refuses them."""
    info, frames = twelve
    for i in range(7, 13):
        write_black_frame(frames, i, (10, 10))
    segments_dir = tmp_path / "segments"
    segments_dir.mkdir()
    first = encode_segment(info, frames, 1, 6, segment_path(segments_dir, 0), settings=FAST)
    second = encode_segment(info, frames, 7, 6, segment_path(segments_dir, 1), settings=FAST)
    message = refused_join(info, [first, second], tmp_path / "out")
    assert message == f"segment 2 ({second}) holds h264 10x10, but segment 1 holds h264 128x72"


def test_unreadable_png_frame(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    (frames / frame_filename(3)).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out_dir = tmp_path / "segments"
    out_dir.mkdir()
    with pytest.raises(FramesError, match=r"frame 3 in .*: 00000003.png can't be read") as caught:
        encode_segment(info, frames, 1, 6, segment_path(out_dir, 0), settings=FAST)
    assert caught.value.frame == 3
    no_leftovers(out_dir)


def test_bad_encoder_options(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    out_dir = tmp_path / "segments"
    out_dir.mkdir()
    target = segment_path(out_dir, 0)
    settings = EncodeSettings(preset="ultrafast", extra_args=("-profile:v", "no-such-profile"))
    with pytest.raises(FFmpegError) as caught:
        encode_segment(info, frames, 1, 12, target, settings=settings)
    message = str(caught.value)
    assert message.startswith(
        f"ffmpeg exited with code {caught.value.returncode} while encoding frames 1-12 into segment {target}"
    )
    assert "\n" not in message
    assert "profile" in caught.value.stderr_tail.lower()
    no_leftovers(out_dir)


def test_frames_past_the_end_are_refused(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    """A segment can't take frames the source doesn't have, nor can the join."""
    info, frames = twelve
    write_black_frame(frames, 13, (72, 128))
    segments_dir = tmp_path / "segments"
    segments_dir.mkdir()
    with pytest.raises(ValueError, match=r"frames 10\.\.13 are not within 1\.\.12"):
        encode_segment(info, frames, 10, 4, segment_path(segments_dir, 3), settings=FAST)
    no_leftovers(segments_dir)

    whole = encode_segment(info, frames, 1, 12, segment_path(segments_dir, 0), settings=FAST)
    last = encode_segment(info, frames, 12, 1, segment_path(segments_dir, 1), settings=FAST)
    message = refused_join(info, [whole, last], tmp_path / "out")
    assert message == f"segment 2 ({last}) holds frames 13-13, but the video has only 12 frames"


def test_existing_output_needs_overwrite(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    output = tmp_path / "out.mkv"
    output.write_bytes(b"old")
    segments_dir = tmp_path / "segments"
    segments_dir.mkdir()
    segments = [encode_segment(info, frames, 1, 12, segment_path(segments_dir, 0), settings=FAST)]
    with pytest.raises(OutputPathError, match="already exists"):
        join_segments(info, segments, output, settings=FAST)
    assert output.read_bytes() == b"old"
    no_leftovers(tmp_path, output.name, "segments", "work")
    assert join_segments(info, segments, output, settings=FAST, overwrite=True) == output
    assert probe(output).video.frame_count == 12


# --- settings ------------------------------------------------------------------------------------


def test_default_settings() -> None:
    settings = EncodeSettings()
    assert settings.codec == "libx264"
    assert (settings.effective_crf, settings.effective_preset, settings.effective_pix_fmt) == (
        18,
        "medium",
        "yuv420p",
    )
    assert settings.codec_args() == [
        "-c:v",
        "libx264",
        "-crf",
        "18",
        "-preset",
        "medium",
        "-pix_fmt",
        "yuv420p",
    ]
    assert EncodeSettings(codec="libx265").effective_crf == 20
    svt = EncodeSettings.for_codec("libsvtav1")
    assert (svt.effective_crf, svt.effective_preset) == (30, "8")
    assert EncodeSettings(codec="ffv1", crf=18).codec_args()[:2] == ["-c:v", "ffv1"]  # crf ignored
    assert "-crf" not in EncodeSettings(codec="ffv1", crf=18).codec_args()


@pytest.mark.parametrize("codec", ["h264_nvenc", "hevc_nvenc", "av1_nvenc"])
def test_nvenc_names_are_accepted(codec: str) -> None:
    settings = EncodeSettings(codec=codec, crf=23, preset="p4", extra_args=["-tune", "hq"])
    assert settings.extra_args == ("-tune", "hq")
    args = settings.codec_args()
    assert args[:2] == ["-c:v", codec]
    assert args[args.index("-cq") + 1] == "23"
    assert args[args.index("-preset") + 1] == "p4"
    assert args[-2:] == ["-tune", "hq"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codec": "libvpx"}, "unknown codec 'libvpx'"),
        ({"crf": 52}, "crf 52 is out of range for libx264 (0 to 51)"),
        ({"codec": "libsvtav1", "crf": 64}, "out of range for libsvtav1 (0 to 63)"),
        ({"preset": "turbo"}, "preset 'turbo' is not one of libx264's presets"),
        ({"codec": "libsvtav1", "preset": "medium"}, "not one of libsvtav1's presets"),
        ({"codec": "ffv1", "preset": "fast"}, "ffv1 has no presets"),
        ({"pix_fmt": "gbrp"}, "libx264 can't encode RGB pixel format gbrp"),
        ({"codec": "libx264rgb", "pix_fmt": "yuv420p"}, "libx264rgb takes rgb24, bgr24 or bgr0"),
    ],
)
def test_impossible_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(EncodeSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EncodeSettings(**kwargs)  # type: ignore[arg-type]


def test_container_and_size_checks() -> None:
    with pytest.raises(EncodeSettingsError, match=r"ffv1 can't be written to a mp4 file; use \.mkv"):
        EncodeSettings.lossless().check_container("mp4")
    with pytest.raises(EncodeSettingsError, match="libx264 can't be written to a webm file"):
        EncodeSettings().check_container("webm")
    EncodeSettings(codec="libsvtav1").check_container("webm")
    with pytest.raises(EncodeSettingsError, match="yuv420p needs even dimensions but the frames are 161x91"):
        EncodeSettings().check_frame_size(161, 91)
    EncodeSettings(pix_fmt="yuv444p").check_frame_size(161, 91)
    EncodeSettings.lossless().check_frame_size(161, 91)


def test_read_frame_rejects_a_wrong_array(tmp_path: Path) -> None:
    path = tmp_path / frame_filename(1, FrameFormat.NPY)
    np.save(path, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"holds a float32 array of shape \(4, 4\)"):
        read_frame(path, FrameFormat.NPY)


@pytest.mark.parametrize(
    ("codec", "container", "expected"),
    [
        ("subrip", "matroska", "copy"),
        ("ass", "matroska", "copy"),
        ("hdmv_pgs_subtitle", "matroska", "copy"),
        ("mov_text", "matroska", "srt"),
        ("subrip", "mp4", "mov_text"),
        ("ass", "mov", "mov_text"),
        ("mov_text", "mp4", "copy"),
        ("dvd_subtitle", "mp4", "copy"),
        ("hdmv_pgs_subtitle", "mp4", None),  # left out, with a warning
        ("subrip", "webm", "webvtt"),
        ("webvtt", "webm", "copy"),
        ("dvb_subtitle", "webm", None),
    ],
)
def test_subtitle_codec_table(codec: str, container: str, expected: str | None) -> None:
    assert (
        subtitle_codec_for(SubtitleInfo(index=2, codec=codec, language=None, title=None), container)
        == expected
    )
