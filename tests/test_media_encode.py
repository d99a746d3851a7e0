"""Encoding (real ffmpeg, generated clips): probe -> extract -> "upscale" -> encode -> check.

A 2x nearest-neighbour numpy upscale stands in for the model; the model path is tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from coordinator.encode import EncodeSettings, encode_video, read_frame, subtitle_codec_for
from coordinator.errors import EncodeSettingsError, FFmpegError, FramesError, OutputPathError
from coordinator.extract import decode_frames, extract_frames, write_frame
from coordinator.probe import MediaInfo, SubtitleInfo, probe
from manifests.layout import FrameFormat, frame_filename
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


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "one.mp4": (lambda p: clips.video(p, frames=1), ".mp4"),
    "seven.mp4": (lambda p: clips.video(p, frames=7), ".mkv"),
    "ntsc.mp4": (lambda p: clips.video_with_audio(p, rate="30000/1001", seconds=3.0), ".mp4"),
    "late-audio.mkv": (
        lambda p: clips.video_with_audio(p, rate="24000/1001", seconds=2.0, audio_delay=0.5),
        ".mp4",
    ),
    "late-video.mkv": (lambda p: clips.video_with_audio(p, rate="25", seconds=2.0, audio_delay=-0.3), ".mkv"),
    "odd.mkv": (lambda p: clips.odd_size_video(p, size=(161, 91)), ".mkv"),
    "vfr.mp4": (lambda p: clips.vfr_video(p, frames=30), ".mp4"),
    "vfr-to-mkv.mp4": (lambda p: clips.vfr_video(p, frames=30), ".mkv"),
    "rich.mkv": (lambda p: clips.rich_mkv(p, seconds=2.0), ".mkv"),
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
    done: list[int] = []
    assert (
        encode_video(info, frames, output, settings=FAST, frame_format=frame_format, progress=done.append)
        == output
    )
    assert done == list(range(1, info.video.frame_count + 1))
    no_leftovers(output.parent, output.name)
    assert_faithful_upscale(source, output, 2)


def test_colour_round_trip_through_yuv(clip_dir: Path, tmp_path: Path) -> None:
    """Flat colours survive extract -> encode (scale 1, yuv420p) -> decode; a mix-up would not."""
    rgb = (200, 60, 40)
    for matrix, size in (("bt601", "1280x720"), ("bt709", "64x36")):
        info = probe(
            clips.flat_color(clip_dir / f"round-{matrix}.mp4", rgb, matrix=matrix, size=size, frames=2)
        )
        work = tmp_path / matrix
        frames = upscale_frames(info, work, 1, FrameFormat.NPY)
        output = encode_video(info, frames, work / "out.mp4", settings=FAST, frame_format=FrameFormat.NPY)
        result = probe(output)
        assert result.video.color.matrix == info.video.color.matrix
        decoded = list(decode_frames(result))
        assert len(decoded) == 2
        mean = np.mean([f.reshape(-1, 3).mean(axis=0) for f in decoded], axis=0)
        assert np.abs(mean - rgb).max() <= 3.0, (matrix, mean)


@pytest.mark.parametrize(
    "settings",
    [EncodeSettings.lossless(), EncodeSettings(codec="libx264rgb", crf=0, preset="ultrafast")],
    ids=["ffv1-gbrp", "libx264rgb-crf0"],
)
def test_lossless_mode_is_bit_exact(clip_dir: Path, tmp_path: Path, settings: EncodeSettings) -> None:
    info = probe(clips.video(clip_dir / "timing.mp4", frames=7))
    rng = np.random.default_rng(7)
    noise = [rng.integers(0, 256, size=(72, 128, 3), dtype=np.uint8) for _ in range(7)]
    for i, frame in enumerate(noise, start=1):
        write_frame(tmp_path / frame_filename(i), frame, FrameFormat.PNG, png_compression=1)
    assert settings.is_lossless and settings.is_rgb
    (tmp_path / "out").mkdir()
    output = encode_video(info, tmp_path, tmp_path / "out" / "lossless.mkv", settings=settings)
    decoded = list(decode_frames(output))
    assert len(decoded) == 7
    for given, got in zip(noise, decoded, strict=True):
        np.testing.assert_array_equal(got, given)


def test_rotation_and_sar_carried(clip_dir: Path, tmp_path: Path) -> None:
    source = clips.video(
        clip_dir / "rotated.mp4",
        frames=5,
        extra=("-vf", "setsar=4/3"),
        input_args=("-display_rotation", "-90"),
    )
    info = probe(source)
    assert (info.video.rotation, info.video.sample_aspect_ratio) == (-90, Fraction(4, 3))
    frames = upscale_frames(info, tmp_path, 2, FrameFormat.NPY)
    output = encode_video(info, frames, tmp_path / "out.mp4", settings=FAST, frame_format=FrameFormat.NPY)
    result = probe(output)
    assert result.video.rotation == -90
    assert result.video.sample_aspect_ratio == Fraction(4, 3)
    assert (result.video.width, result.video.height) == (128, 72)  # coded orientation, as extracted


@pytest.mark.parametrize(
    ("settings", "decoders", "tag"),
    [
        (EncodeSettings(codec="libx265", preset="ultrafast"), {"hevc"}, "hvc1"),
        (EncodeSettings(codec="libsvtav1", preset="12"), {"av1", "libdav1d"}, "av01"),
    ],
)
def test_other_codecs_in_mp4(
    clip_dir: Path, tmp_path: Path, settings: EncodeSettings, decoders: set[str], tag: str
) -> None:
    info = probe(clips.video(clip_dir / "codec.mp4", frames=6))
    frames = upscale_frames(info, tmp_path, 2, FrameFormat.NPY)
    output = encode_video(info, frames, tmp_path / "out.mp4", settings=settings, frame_format=FrameFormat.NPY)
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in decoders
        assert stream.codec_tag == tag
    assert probe(output).video.frame_count == 6


# --- failures leave nothing behind ---------------------------------------------------------------


@pytest.fixture
def twelve(clip_dir: Path, tmp_path: Path) -> tuple[MediaInfo, Path]:
    info = probe(clips.video(clip_dir / "twelve.mp4", frames=12))
    return info, upscale_frames(info, tmp_path / "work", 2, FrameFormat.PNG)


def test_missing_frame_in_the_middle(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    (frames / frame_filename(6)).unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(FramesError) as caught:
        encode_video(info, frames, out_dir / "out.mp4", settings=FAST)
    assert caught.value.frame == 6
    assert (
        str(caught.value) == f"frame 6 in {frames}: 00000006.png is missing (1 of the 12 frames are missing)"
    )
    no_leftovers(out_dir)


def test_frame_of_another_size_in_the_middle(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    write_frame(
        frames / frame_filename(9), np.zeros((10, 10, 3), np.uint8), FrameFormat.PNG, png_compression=1
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(FramesError, match=r"frame 9 in .*: 00000009.png is 10x10, but frame 1 is 128x72"):
        encode_video(info, frames, out_dir / "out.mkv", settings=FAST)
    no_leftovers(out_dir)


def test_unreadable_frame(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    (frames / frame_filename(3)).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(FramesError, match=r"frame 3 in .*: 00000003.png can't be read"):
        encode_video(info, frames, out_dir / "out.mp4", settings=FAST)
    no_leftovers(out_dir)


def test_bad_encoder_options(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    settings = EncodeSettings(preset="ultrafast", extra_args=("-profile:v", "no-such-profile"))
    with pytest.raises(FFmpegError) as caught:
        encode_video(info, frames, out_dir / "out.mp4", settings=settings)
    message = str(caught.value)
    assert message.startswith(f"ffmpeg exited with code {caught.value.returncode} while encoding {out_dir}")
    assert "\n" not in message
    assert "profile" in caught.value.stderr_tail.lower()
    no_leftovers(out_dir)


def test_extra_frames_are_refused(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    write_frame(
        frames / frame_filename(13), np.zeros((72, 128, 3), np.uint8), FrameFormat.PNG, png_compression=1
    )
    with pytest.raises(FramesError, match=r"holds 00000013\.png, but the input has only 12 frames"):
        encode_video(info, frames, tmp_path / "out.mp4", settings=FAST)


def test_existing_output_needs_overwrite(twelve: tuple[MediaInfo, Path], tmp_path: Path) -> None:
    info, frames = twelve
    output = tmp_path / "out.mkv"
    output.write_bytes(b"old")
    with pytest.raises(OutputPathError, match="already exists"):
        encode_video(info, frames, output, settings=FAST)
    assert output.read_bytes() == b"old"
    encode_video(info, frames, output, settings=FAST, overwrite=True)
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
