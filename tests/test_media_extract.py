"""Frame extraction (real ffmpeg, generated clips): counts, names, atomic files, exact colours."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from manifests.frames import read_frame
from manifests.layout import FrameFormat, frame_filename
from media.errors import InputError
from media.extract import decode_frames, extract_frames
from media.probe import ColorInfo, MediaInfo, probe
from tests import clips

RGB = (200, 60, 40)  # saturated enough that a BT.601/BT.709 mix-up moves it by > 10 levels


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extract-clips")


@pytest.mark.parametrize(
    ("name", "make", "count"),
    [
        ("one.mp4", lambda p: clips.video(p, frames=1), 1),
        ("seven.mp4", lambda p: clips.video(p, frames=7), 7),
        ("ntsc.mp4", lambda p: clips.video_with_audio(p, seconds=3.0), 90),
        ("odd.mkv", lambda p: clips.odd_size_video(p, size=(161, 91), frames=12), 12),
        ("vfr.mp4", lambda p: clips.vfr_video(p, frames=30), 30),
        ("rich.mkv", lambda p: clips.rich_mkv(p, seconds=2.0), 48),
    ],
)
def test_extract_gives_exactly_the_frame_count(
    clip_dir: Path, tmp_path: Path, name: str, make: object, count: int
) -> None:
    source = clip_dir / name
    if not source.exists():
        make(source)  # type: ignore[operator]
    info = probe(source)
    assert info.video.frame_count == count
    seen: list[int] = []
    written = extract_frames(info, tmp_path / "input", progress=seen.append)
    assert written == count
    names = sorted(p.name for p in (tmp_path / "input").iterdir())
    assert names == [frame_filename(i) for i in range(1, count + 1)]  # no temp files left behind
    assert seen == list(range(1, count + 1))
    first = read_frame(tmp_path / "input" / frame_filename(1), FrameFormat.PNG)
    assert first.shape == (info.video.height, info.video.width, 3)


def test_png_and_npy_hold_the_same_pixels_as_decode_frames(clip_dir: Path, tmp_path: Path) -> None:
    info = probe(clips.video(clip_dir / "pixels.mkv", frames=9))
    assert extract_frames(info, tmp_path / "png", png_compression=0) == 9
    assert extract_frames(info, tmp_path / "npy", frame_format=FrameFormat.NPY, threads=1) == 9
    decoded = list(decode_frames(info))
    assert len(decoded) == 9
    for i, frame in enumerate(decoded, start=1):
        png = read_frame(tmp_path / "png" / frame_filename(i), FrameFormat.PNG)
        npy = np.load(tmp_path / "npy" / frame_filename(i, FrameFormat.NPY))
        assert npy.dtype == np.uint8 and npy.shape == (36, 64, 3)
        np.testing.assert_array_equal(png, frame)
        np.testing.assert_array_equal(npy, frame)
    # Same frames in the same order as PyAV's own decoder gives (nothing dropped or duplicated):
    # the same pattern of repeats (testsrc2's first two frames are equal) and the same motion.
    with av.open(str(info.path)) as container:
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(reference) == len(decoded)

    def repeats(frames: list[np.ndarray]) -> list[bool]:
        return [np.array_equal(a, b) for a, b in itertools.pairwise(frames)]

    assert repeats(decoded) == repeats(reference)
    for i, frame in enumerate(decoded):
        distances = [np.abs(frame.astype(int) - ref).mean() for ref in reference]
        assert distances[i] == min(distances)


def test_extract_refuses_a_bad_compression_level(clip_dir: Path, tmp_path: Path) -> None:
    info = probe(clips.video(clip_dir / "level.mp4", frames=2))
    with pytest.raises(ValueError, match="png_compression"):
        extract_frames(info, tmp_path, png_compression=10)


def test_corrupt_codec_data_fails_extraction(clip_dir: Path, tmp_path: Path) -> None:
    source = clips.video(
        clip_dir / "long.mp4", size="320x180", frames=100, extra=("-g", "25", "-movflags", "+faststart")
    )
    garbled = clips.corrupt_copy(source, tmp_path / "garbled.mp4", garble_at=0.6, garble_bytes=300)
    info = probe(garbled)  # the quick probe decodes only the first frames: it passes
    with pytest.raises(InputError, match=r"is corrupt") as caught:
        extract_frames(info, tmp_path / "input")
    assert "\n" not in str(caught.value)


# --- colour: the right matrix and range, tagged or guessed ---------------------------------------


def _mean_rgb(frames: list[np.ndarray]) -> np.ndarray:
    return np.mean([f.reshape(-1, 3).mean(axis=0) for f in frames], axis=0)


@pytest.mark.parametrize(
    ("matrix", "size", "tag", "full_range"),
    [
        ("bt709", "64x36", True, False),  # tags say 709; the size guess would be 601
        ("bt601", "1280x720", True, False),  # tags say 601; the size guess would be 709
        ("bt601", "64x36", False, False),  # untagged SD: guessed BT.601
        ("bt709", "1280x720", False, False),  # untagged HD: guessed BT.709
        ("bt709", "64x36", True, True),  # full range, tagged
    ],
)
def test_flat_colour_comes_out_right(
    clip_dir: Path, tmp_path: Path, matrix: str, size: str, tag: bool, full_range: bool
) -> None:
    name = f"flat-{matrix}-{size}-{'tagged' if tag else 'untagged'}-{'pc' if full_range else 'tv'}.mp4"
    info = probe(
        clips.flat_color(clip_dir / name, RGB, matrix=matrix, size=size, tag=tag, full_range=full_range)
    )
    assert info.video.conversion.guessed is not tag
    count = extract_frames(info, tmp_path, frame_format=FrameFormat.NPY)
    frames = [np.load(tmp_path / frame_filename(i, FrameFormat.NPY)) for i in range(1, count + 1)]
    assert np.abs(_mean_rgb(frames) - RGB).max() <= 2.0
    assert np.abs(frames[0].astype(int) - RGB).max() <= 3  # flat: every pixel, not only the mean

    # The test can tell: the other matrix would have been far off.
    other = {"bt709": "smpte170m", "bt601": "bt709"}[matrix]
    wrong = dataclasses.replace(info.video, color=ColorInfo(matrix=other, range="pc" if full_range else "tv"))
    wrong_frames = list(decode_frames(dataclasses.replace(info, video=wrong)))
    assert np.abs(_mean_rgb(wrong_frames) - RGB).max() > 10


def test_decode_frames_accepts_a_path(clip_dir: Path) -> None:
    path = clips.video(clip_dir / "bypath.mp4", frames=3)
    frames = list(decode_frames(path))
    info = probe(path)
    assert isinstance(info, MediaInfo)
    assert len(frames) == 3
    np.testing.assert_array_equal(frames[2], list(decode_frames(info))[2])


def test_gate_skips_frames_and_holds_extraction_back(clip_dir: Path, tmp_path: Path) -> None:
    info = probe(clips.video(clip_dir / "gated.mkv", frames=12))
    calls: list[int] = []
    done: list[int] = []

    def gate(index: int) -> bool:
        calls.append(index)
        return index % 3 != 0  # frames 3, 6, 9, 12 are not wanted

    reported: list[int] = []
    decoded = extract_frames(
        info,
        tmp_path,
        frame_format=FrameFormat.NPY,
        gate=gate,
        progress=done.append,
        on_frame=reported.append,
    )
    assert decoded == 12
    assert (
        calls == list(range(1, 13)) and done == list(range(1, 13)) and sorted(reported) == list(range(1, 13))
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        frame_filename(i, FrameFormat.NPY) for i in range(1, 13) if i % 3
    ]
    expected = list(decode_frames(info))
    for i in (1, 5, 11):
        assert np.array_equal(
            read_frame(tmp_path / frame_filename(i, FrameFormat.NPY), FrameFormat.NPY), expected[i - 1]
        )
