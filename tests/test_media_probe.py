"""Probing and input validation on real clips made by the real ffmpeg binary."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from media.errors import FFmpegError, FFmpegNotFoundError, InputError, OutputPathError
from media.ffmpeg import FFmpegProcess, find_ffmpeg, run_ffmpeg
from media.probe import ColorInfo, MediaInfo, check_output_path, probe, rgb_conversion
from tests import clips


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe-clips")


def test_one_frame(clip_dir: Path) -> None:
    info = probe(clips.video(clip_dir / "one.mp4", frames=1))
    assert info.video.frame_count == 1
    assert info.video.frame_pts == (0,)
    assert info.video.frame_rate_str == "25/1"
    assert not info.video.is_vfr


def test_seven_frames_cfr(clip_dir: Path) -> None:
    info = probe(clips.video(clip_dir / "seven.mkv", frames=7, rate="25"))
    video = info.video
    assert (video.frame_count, video.width, video.height) == (7, 64, 36)
    assert video.frame_rate == Fraction(25)
    assert video.time_base == Fraction(1, 1000)
    assert video.frame_pts == (0, 40, 80, 120, 160, 200, 240)
    assert info.audio == () and info.subtitles == () and info.chapters == ()


def test_ntsc_rate_with_stereo_audio(clip_dir: Path) -> None:
    info = probe(clips.video_with_audio(clip_dir / "ntsc.mp4", rate="30000/1001", seconds=3.0))
    video = info.video
    assert video.frame_count == 90
    assert video.frame_rate_str == "30000/1001"
    assert not video.is_vfr
    assert [(a.codec, a.channels, a.sample_rate) for a in info.audio] == [("aac", 2, 48000)]


def test_ntsc_rate_survives_a_millisecond_time_base(clip_dir: Path) -> None:
    """MKV rounds 1001/30000 s to whole milliseconds; the exact rate must still be found."""
    info = probe(clips.video(clip_dir / "ntsc.mkv", rate="30000/1001", frames=40))
    assert info.video.time_base == Fraction(1, 1000)
    assert info.video.frame_rate_str == "30000/1001"
    assert not info.video.is_vfr


def test_odd_size(clip_dir: Path) -> None:
    info = probe(clips.odd_size_video(clip_dir / "odd.mkv", size=(161, 91), frames=12))
    assert (info.video.width, info.video.height, info.video.frame_count) == (161, 91, 12)


def test_vfr_timestamps(clip_dir: Path) -> None:
    info = probe(clips.vfr_video(clip_dir / "vfr.mp4", frames=30))
    video = info.video
    assert video.is_vfr
    assert video.frame_count == 30
    assert video.time_base == Fraction(1, 90000)
    # The expression in clips.vfr_video, frame by frame.
    expected = [
        n * 3000 + (4500 if n > 10 else 0) + (1170 if n % 3 == 0 else 0) + (n * 500 if n > 20 else 0)
        for n in range(30)
    ]
    assert list(video.frame_pts) == expected
    assert info.start_time == Fraction(1170, 90000)


def test_rich_mkv(clip_dir: Path) -> None:
    info = probe(clips.rich_mkv(clip_dir / "rich.mkv", seconds=2.0))
    assert info.video.frame_count == 48
    assert [(a.codec, a.channels, a.language) for a in info.audio] == [("aac", 2, "eng"), ("flac", 1, "fra")]
    assert len(info.subtitles) == 1 and info.subtitles[0].is_text and info.subtitles[0].language == "eng"
    assert [(c.start, c.end, c.title) for c in info.chapters] == [
        (0, 1, "Opening"),
        (1, 2, "Ending"),
    ]
    assert info.metadata["title"] == "esrfarm test clip"


@pytest.mark.parametrize(
    ("matrix", "size", "expected_tag", "expected_scale_matrix"),
    [("bt709", "64x36", "bt709", "bt709"), ("bt601", "1280x720", "smpte170m", "bt601")],
)
def test_colour_tags_win_over_the_size_guess(
    clip_dir: Path, matrix: str, size: str, expected_tag: str, expected_scale_matrix: str
) -> None:
    path = clips.flat_color(clip_dir / f"tagged-{matrix}.mp4", (200, 60, 40), matrix=matrix, size=size)
    video = probe(path).video
    assert video.color == ColorInfo(expected_tag, expected_tag, expected_tag, "tv")
    assert video.conversion.matrix == expected_tag
    assert video.conversion.scale_matrix == expected_scale_matrix
    assert not video.conversion.guessed


def test_rotation_and_sample_aspect_ratio(clip_dir: Path) -> None:
    path = clips.video(
        clip_dir / "rotated.mp4",
        frames=5,
        extra=("-vf", "setsar=4/3"),
        input_args=("-display_rotation", "90"),
    )
    video = probe(path).video
    assert video.rotation == 90
    assert video.sample_aspect_ratio == Fraction(4, 3)


@pytest.mark.parametrize(
    ("color", "height", "pix_fmt", "matrix", "range_", "guessed"),
    [
        (ColorInfo(), 36, "yuv420p", "smpte170m", "tv", True),
        (ColorInfo(), 719, "yuv420p", "smpte170m", "tv", True),
        (ColorInfo(), 720, "yuv420p", "bt709", "tv", True),
        (ColorInfo(), 2160, "yuvj420p", "bt709", "pc", True),
        (ColorInfo(matrix="bt709", range="tv"), 36, "yuv420p", "bt709", "tv", False),
        (ColorInfo(matrix="smpte170m", range="pc"), 1080, "yuv420p", "smpte170m", "pc", False),
        (ColorInfo(matrix="bt470bg", range="tv"), 576, "yuv420p", "bt470bg", "tv", False),
        (ColorInfo(matrix="bt2020nc", range="tv"), 2160, "yuv420p10le", "bt2020nc", "tv", False),
        (ColorInfo(matrix="gbr", range="pc"), 36, "gbrp", "smpte170m", "pc", True),
    ],
)
def test_rgb_conversion_table(
    color: ColorInfo, height: int, pix_fmt: str, matrix: str, range_: str, guessed: bool
) -> None:
    conversion = rgb_conversion(color, height, pix_fmt)
    assert (conversion.matrix, conversion.range, conversion.guessed) == (matrix, range_, guessed)


# --- bad inputs: the error type and a one-line message -------------------------------------------


def _reject(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        probe(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"input {path} ")
    return message


def test_missing_input(tmp_path: Path) -> None:
    assert _reject(tmp_path / "nope.mp4").endswith("does not exist")


def test_directory_input(tmp_path: Path) -> None:
    assert "is a directory" in _reject(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert "is empty" in _reject(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a video\n" * 20)
    assert "is not a media file FFmpeg can read" in _reject(path)


def test_audio_only(tmp_path: Path) -> None:
    path = tmp_path / "sound.m4a"
    clips.ffmpeg(["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(path)])
    assert _reject(path).endswith("has no video stream (it has only audio streams)")


def test_cover_art_is_not_a_video(tmp_path: Path) -> None:
    cover = clips.video(tmp_path / "cover.png", frames=1, codec=("-c:v", "png"), extra=("-update", "1"))
    path = tmp_path / "song.m4a"
    clips.ffmpeg(
        ["-f", "lavfi", "-i", "sine=duration=1", "-i", str(cover), "-map", "0", "-map", "1",
         "-c:a", "aac", "-c:v", "png", "-disposition:v", "attached_pic", str(path)]
    )  # fmt: skip
    assert _reject(path).endswith("has no video stream (it has only audio and cover art streams)")


def test_zero_frames(tmp_path: Path) -> None:
    path = clips.zero_frame_video(tmp_path / "zero.mkv")
    assert _reject(path).endswith("has a video stream with no frames")


@pytest.fixture(scope="module")
def longer_mkv(clip_dir: Path) -> Path:
    return clips.video(clip_dir / "longer.mkv", size="320x180", frames=100, extra=("-g", "25"))


@pytest.fixture(scope="module")
def longer_mp4(clip_dir: Path) -> Path:
    return clips.video(
        clip_dir / "longer.mp4", size="320x180", frames=100, extra=("-g", "25", "-movflags", "+faststart")
    )


def test_garbled_mkv(tmp_path: Path, longer_mkv: Path) -> None:
    message = _reject(clips.corrupt_copy(longer_mkv, tmp_path / "garbled.mkv"))
    assert " is corrupt: " in message


def test_garbled_codec_data_is_noticed_with_full_decode(tmp_path: Path, longer_mp4: Path) -> None:
    """Garbage inside one frame's data: the container is intact, only decoding notices."""
    garbled = clips.corrupt_copy(longer_mp4, tmp_path / "garbled.mp4", garble_at=0.6, garble_bytes=300)
    with pytest.raises(InputError, match=r" is corrupt: ") as caught:
        probe(garbled, full_decode=True)
    assert "\n" not in str(caught.value)


def test_truncated_mkv(tmp_path: Path, longer_mkv: Path) -> None:
    message = _reject(clips.truncated_copy(longer_mkv, tmp_path / "cut.mkv"))
    assert "corrupt" in message or "truncated" in message


def test_truncated_mp4_index_at_end(tmp_path: Path, clip_dir: Path) -> None:
    source = clips.video(clip_dir / "index-at-end.mp4", size="320x180", frames=50)
    assert "is not a media file FFmpeg can read" in _reject(
        clips.truncated_copy(source, tmp_path / "cut.mp4")
    )


def test_truncated_mp4_faststart(tmp_path: Path, longer_mp4: Path) -> None:
    message = _reject(clips.truncated_copy(longer_mp4, tmp_path / "cut-faststart.mp4"))
    assert "truncated or corrupt" in message or "is corrupt" in message


def test_full_decode_agrees_on_a_good_file(longer_mp4: Path) -> None:
    quick, full = probe(longer_mp4), probe(longer_mp4, full_decode=True)
    assert isinstance(full, MediaInfo)
    assert full.video.frame_count == quick.video.frame_count == 100
    assert full.video.frame_pts == quick.video.frame_pts


# --- check_output_path -------------------------------------------------------------------------


def test_output_path_checks(tmp_path: Path) -> None:
    source = tmp_path / "in.mp4"
    source.write_bytes(b"x")
    check_output_path(source, tmp_path / "out.mp4", overwrite=False)  # fine: nothing raised
    cases = {
        source: "is the input file",
        tmp_path / "." / "in.mp4": "is the input file",
        tmp_path / "out.avi": "has .avi; esrfarm writes",
        tmp_path / "out": "has no extension",
        tmp_path / "missing" / "out.mp4": "directory",
    }
    (tmp_path / "exists.mkv").write_bytes(b"old")
    cases[tmp_path / "exists.mkv"] = "already exists (pass --overwrite to replace it)"
    (tmp_path / "adir.mp4").mkdir()
    cases[tmp_path / "adir.mp4"] = "is a directory"
    (tmp_path / "afile").write_bytes(b"")
    cases[tmp_path / "afile" / "out.mp4"] = "is not a directory"
    for output, expected in cases.items():
        with pytest.raises(OutputPathError) as caught:
            check_output_path(source, output, overwrite=False)
        assert isinstance(caught.value, InputError)
        assert expected in str(caught.value), (output, str(caught.value))
        assert str(caught.value).startswith(f"output {output} ")
    check_output_path(source, tmp_path / "exists.mkv", overwrite=True)
    (tmp_path / "link.mp4").symlink_to(source)
    with pytest.raises(OutputPathError, match="is the input file"):
        check_output_path(source, tmp_path / "link.mp4", overwrite=True)


# --- the ffmpeg module --------------------------------------------------------------------------


def test_ffmpeg_error_reads_as_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(FFmpegError) as caught:
        run_ffmpeg(["-i", str(tmp_path / "absent.mp4"), str(tmp_path / "x.mp4")], action="testing")
    error = caught.value
    assert error.returncode != 0
    assert error.command[0] == find_ffmpeg()
    assert str(error).startswith(f"ffmpeg exited with code {error.returncode} while testing: ")
    assert "No such file or directory" in str(error)
    assert "\n" not in str(error)
    assert "command: " in error.details()


def test_ffmpeg_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = find_ffmpeg()
    wrapper = tmp_path / "my-ffmpeg"
    wrapper.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("ESRFARM_FFMPEG", str(wrapper))
    assert find_ffmpeg() == str(wrapper)
    monkeypatch.setenv("ESRFARM_FFMPEG", str(tmp_path / "absent"))
    with pytest.raises(FFmpegNotFoundError, match=r"ESRFARM_FFMPEG=.* is not an executable file"):
        find_ffmpeg()


def test_ffmpeg_process_killed_on_error() -> None:
    with pytest.raises(RuntimeError), FFmpegProcess(["-f", "nut", "-i", "pipe:0", "-f", "null", "-"],
                                                   action="waiting", stdin=True) as process:  # fmt: skip
        assert process.running()
        raise RuntimeError("leave early")
    assert not process.running()
