"""Segments (real ffmpeg, generated clips): extract -> "upscale" -> encode segments -> join -> check.

Segments of uneven sizes (one of a single frame), some encoded in parallel threads, with an x264
preset that uses B-frames (so encoder delay and reordering cross every boundary).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from manifests.frames import write_frame
from manifests.layout import FrameFormat, frame_filename
from media.encode import EncodeSettings
from media.errors import FramesError, MediaError, SegmentError
from media.extract import decode_frames
from media.probe import MediaInfo, probe
from media.segments import encode_segment, join_segments, segment_is_complete
from tests import clips
from tests.test_media_encode import no_leftovers, upscale_frames
from tests.videocheck import assert_faithful_upscale

BFRAMES = EncodeSettings(preset="veryfast")  # x264 veryfast: 3 B-frames, 2 frames of encoder delay


def split(total: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(first frame, count) per segment: ``sizes``, then the rest."""
    runs: list[tuple[int, int]] = []
    first = 1
    for size in [*sizes, total - sum(sizes)]:
        runs.append((first, size))
        first += size
    return runs


def encode_segments(
    info: MediaInfo,
    frames: Path,
    directory: Path,
    runs: Sequence[tuple[int, int]],
    settings: EncodeSettings,
    frame_format: FrameFormat = FrameFormat.NPY,
) -> list[Path]:
    """Segment 1 alone, the others two at a time in threads (as the coordinator may)."""
    directory.mkdir(exist_ok=True)
    paths = [directory / f"seg-{n:04d}.mp4" for n in range(1, len(runs) + 1)]

    def one(n: int) -> Path:
        first, count = runs[n]
        return encode_segment(
            info, frames, first, count, paths[n], settings=settings, frame_format=frame_format,
            encoder_threads=1,
        )  # fmt: skip

    assert one(0) == paths[0]
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(one, range(1, len(runs)))) == paths[1:]
    return paths


def video_timestamps(path: Path) -> tuple[list[Fraction], list[Fraction]]:
    """(pts in display order, dts in decode order), in seconds from the container's start, of the
    first video stream (Matroska stores no dts: those come back empty)."""
    with av.open(str(path)) as container:
        start = Fraction(container.start_time or 0, av.time_base)
        stream = container.streams.video[0]
        packets = [(p.pts, p.dts, p.time_base) for p in container.demux(stream) if p.size]
    pts = sorted(Fraction(p) * tb - start for p, _, tb in packets)
    dts = [Fraction(d) * tb - start for _, d, tb in packets if d is not None]
    return pts, dts


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "ntsc-stereo.mp4": (lambda p: clips.video_with_audio(p, rate="30000/1001", seconds=1.5), ".mp4"),
    "vfr.mp4": (lambda p: clips.vfr_video(p, frames=30), ".mp4"),
    "rich.mkv": (lambda p: clips.rich_mkv(p, seconds=1.5), ".mkv"),
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("segment-clips")


@pytest.mark.parametrize("name", list(CASES))
def test_joined_segments_are_a_faithful_upscale(clip_dir: Path, tmp_path: Path, name: str) -> None:
    make, suffix = CASES[name]
    source = make(clip_dir / name)
    info = probe(source)
    frames = upscale_frames(info, tmp_path / "work", 2, FrameFormat.NPY)
    runs = split(info.frame_count, [7, 8, 1])
    segments = encode_segments(info, frames, tmp_path / "segments", runs, BFRAMES)

    # Each segment is complete on its own, starts on a keyframe, at its frames' source time.
    for path, (first, count) in zip(segments, runs, strict=True):
        assert segment_is_complete(path, count)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            packets = [p for p in container.demux(stream) if p.size]
            assert packets[0].is_keyframe
            first_pts = min(Fraction(p.pts) * p.time_base for p in packets)
        expected = (info.video.frame_pts[first - 1] - info.video.frame_pts[0]) * info.video.time_base
        assert abs(first_pts - expected) <= info.video.time_base

    out_dir = tmp_path / "result"
    out_dir.mkdir()
    output = join_segments(info, segments, out_dir / f"out{suffix}", settings=BFRAMES)
    assert output == out_dir / f"out{suffix}"
    no_leftovers(out_dir, output.name)
    for path in segments:  # the caller deletes them: the output must not need them
        path.unlink()
    assert_faithful_upscale(source, output, 2)

    # Every frame where the source has it (from the container's start, read straight from the
    # files), within one tick (Matroska: 1 ms).
    joined_pts, joined_dts = video_timestamps(output)
    source_pts, _ = video_timestamps(source)
    in_mkv = ".mkv" in {suffix, source.suffix}
    tick = max(info.video.time_base, Fraction(1, 1000) if in_mkv else Fraction(0))
    assert len(joined_pts) == len(source_pts) == info.frame_count
    assert max(abs(a - b) for a, b in zip(joined_pts, source_pts, strict=True)) <= tick
    # B-frames crossed the boundaries: packets are reordered, and decode times still only increase.
    if suffix == ".mp4":
        assert joined_dts != sorted(joined_pts)
        assert all(a < b for a, b in itertools.pairwise(joined_dts))


def noise_frames(directory: Path, count: int, size: tuple[int, int] = (72, 128)) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(count)]
    directory.mkdir()
    for i, frame in enumerate(frames, start=1):
        write_frame(directory / frame_filename(i), frame, FrameFormat.PNG, png_compression=1)
    return frames


@pytest.mark.parametrize(
    "settings",
    [EncodeSettings.lossless(), EncodeSettings(codec="libx264rgb", crf=0, preset="veryfast")],
    ids=["ffv1-gbrp", "libx264rgb-crf0"],
)
def test_lossless_join_is_frame_exact(clip_dir: Path, tmp_path: Path, settings: EncodeSettings) -> None:
    info = probe(clips.video(clip_dir / "eleven.mp4", frames=11))
    given = noise_frames(tmp_path / "frames", 11)
    segments = encode_segments(
        info, tmp_path / "frames", tmp_path / "segments", split(11, [4, 1]), settings, FrameFormat.PNG
    )
    output = join_segments(info, segments, tmp_path / "lossless.mkv", settings=settings)
    decoded = list(decode_frames(output))
    assert len(decoded) == 11
    for i, (want, got) in enumerate(zip(given, decoded, strict=True), start=1):
        np.testing.assert_array_equal(got, want, err_msg=f"frame {i}")


def test_hevc_segments_join_into_mp4(clip_dir: Path, tmp_path: Path) -> None:
    source = clips.video_with_audio(clip_dir / "hevc-src.mp4", rate="25", seconds=1.0)
    info = probe(source)
    frames = upscale_frames(info, tmp_path / "work", 2, FrameFormat.NPY)
    settings = EncodeSettings(codec="libx265", preset="ultrafast")
    segments = encode_segments(info, frames, tmp_path / "segments", split(25, [9, 1]), settings)
    output = join_segments(info, segments, tmp_path / "out.mp4", settings=settings)
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_tag) == ("hevc", "hvc1")
        assert sum(1 for _ in container.decode(stream)) == 25
    assert_faithful_upscale(source, output, 2)


def test_rotation_sar_and_colour_carried(clip_dir: Path, tmp_path: Path) -> None:
    source = clips.video(
        clip_dir / "rotated.mp4",
        frames=9,
        extra=("-vf", "setsar=4/3"),
        input_args=("-display_rotation", "-90"),
    )
    info = probe(source)
    frames = upscale_frames(info, tmp_path / "work", 2, FrameFormat.NPY)
    segments = encode_segments(info, frames, tmp_path / "segments", split(9, [4]), BFRAMES)
    result = probe(join_segments(info, segments, tmp_path / "out.mp4", settings=BFRAMES))
    assert (result.video.rotation, result.video.sample_aspect_ratio) == (-90, Fraction(4, 3))
    assert (result.video.width, result.video.height) == (128, 72)
    assert result.video.color.matrix == info.video.conversion.matrix == "smpte170m"
    assert result.video.color.range == "tv"


# --- failures: a clear error, nothing left behind ---------------------------------------------


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> tuple[MediaInfo, Path, list[Path]]:
    """A 12-frame clip, its upscaled frames and three good segments (5, 1, 6 frames)."""
    work = tmp_path_factory.mktemp("twelve")
    info = probe(clips.video(work / "twelve.mp4", frames=12))
    frames = upscale_frames(info, work / "work", 2, FrameFormat.NPY)
    segments = encode_segments(info, frames, work / "segments", split(12, [5, 1]), BFRAMES)
    return info, frames, segments


def test_segment_is_complete(twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path) -> None:
    _, _, (five, one, six) = twelve
    assert segment_is_complete(five, 5) and segment_is_complete(one, 1) and segment_is_complete(six, 6)
    assert not segment_is_complete(six, 5)
    assert not segment_is_complete(tmp_path / "missing.mp4", 6)
    truncated = clips.truncated_copy(six, tmp_path / "truncated.mp4", keep=0.6)
    assert not segment_is_complete(truncated, 6)
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    assert not segment_is_complete(tmp_path / "garbage.mp4", 6)


def join_fails(info: MediaInfo, segments: Sequence[Path], out_dir: Path, error: type[Exception]) -> str:
    out_dir.mkdir()
    with pytest.raises(error) as caught:
        join_segments(info, segments, out_dir / "out.mp4", settings=BFRAMES)
    no_leftovers(out_dir)
    return str(caught.value)


def test_join_refuses_a_missing_segment_file(
    twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path
) -> None:
    info, _, (five, _, six) = twelve
    message = join_fails(info, [five, tmp_path / "seg-0002.mp4", six], tmp_path / "out", SegmentError)
    assert message == f"segment 2 ({tmp_path / 'seg-0002.mp4'}) does not exist"


def test_join_refuses_a_truncated_segment(twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path) -> None:
    info, _, (five, one, six) = twelve
    truncated = clips.truncated_copy(six, tmp_path / "seg-0003.mp4", keep=0.6)
    message = join_fails(info, [five, one, truncated], tmp_path / "out", SegmentError)
    assert message.startswith(f"segment 3 ({truncated}) can't be read")


def test_join_refuses_a_left_out_segment(twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path) -> None:
    info, _, (five, _, six) = twelve
    message = join_fails(info, [five, six], tmp_path / "out", SegmentError)
    assert message.startswith(f"segment 2 ({six}) should start at frame 6, but its frame 1 is at 0.240000 s")


def test_join_refuses_segments_out_of_order(
    twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path
) -> None:
    info, _, (five, one, six) = twelve
    message = join_fails(info, [one, five, six], tmp_path / "out", SegmentError)
    assert message.startswith(f"segment 1 ({one}) should start at frame 1")


def test_join_refuses_too_few_frames(twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path) -> None:
    info, _, (five, one, _) = twelve
    message = join_fails(info, [five, one], tmp_path / "out", MediaError)
    assert message == f"the 2 segments for {tmp_path / 'out' / 'out.mp4'} hold 6 frames, but the video has 12"


def test_join_refuses_a_segment_encoded_otherwise(
    twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path
) -> None:
    info, frames, (five, one, _) = twelve
    other = encode_segment(
        info, frames, 7, 6, tmp_path / "other.mp4", settings=EncodeSettings(preset="ultrafast"),
        frame_format=FrameFormat.NPY,
    )  # fmt: skip
    message = join_fails(info, [five, one, other], tmp_path / "out", SegmentError)
    assert (
        message
        == f"segment 3 ({other}) was encoded with other settings than segment 1 (its parameter sets differ)"
    )


def test_a_failed_segment_encode_leaves_nothing(
    twelve: tuple[MediaInfo, Path, list[Path]], tmp_path: Path
) -> None:
    info, frames, _ = twelve
    work = tmp_path / "frames"
    work.mkdir()
    for i in (7, 8, 10):  # frame 9 missing
        (work / frame_filename(i, FrameFormat.NPY)).write_bytes(
            (frames / frame_filename(i, FrameFormat.NPY)).read_bytes()
        )
    out_dir = tmp_path / "segments"
    out_dir.mkdir()
    with pytest.raises(FramesError) as caught:
        encode_segment(info, work, 7, 4, out_dir / "seg.mp4", settings=BFRAMES, frame_format=FrameFormat.NPY)
    assert caught.value.frame == 9
    assert str(caught.value) == f"frame 9 in {work}: 00000009.npy is missing (1 of the 4 frames are missing)"
    no_leftovers(out_dir)

    # A frame that can't be read, found while feeding the encoder: named by its frame number.
    (work / frame_filename(9, FrameFormat.NPY)).write_bytes(b"not an array")
    with pytest.raises(FramesError, match=r"frame 9 in .*: 00000009\.npy can't be read"):
        encode_segment(info, work, 7, 4, out_dir / "seg.mp4", settings=BFRAMES, frame_format=FrameFormat.NPY)
    no_leftovers(out_dir)
