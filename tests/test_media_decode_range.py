"""Decoding a range of frames (media.extract.decode_range, the segment transport's decoder) and
encoding frames from memory into a segment (media.segments.encode_segment_frames): real
ffmpeg on generated clips with B-frames, open GOPs, VFR, 10 bits and a late first keyframe. Every
range, whatever frame it starts on, gives exactly the frames decode_frames (what extraction writes)
gives for it, in both layouts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from manifests.frames import write_frame
from manifests.layout import FrameFormat, frame_filename
from media.encode import EncodeSettings, settings_for_depth
from media.errors import InputError, MediaError
from media.extract import decode_frames, decode_range
from media.probe import MediaInfo, probe
from media.segments import encode_segment, encode_segment_frames, segment_is_complete
from tests import clips

X264_GOPS = ("-c:v", "libx264", "-preset", "ultrafast", "-bf", "3", "-g", "7", "-pix_fmt", "yuv420p")
X265_OPEN_GOPS = (
    "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
    "-x265-params", "log-level=error:keyint=8:min-keyint=8:bframes=3:open-gop=1:scenecut=0",
)  # fmt: skip

CLIPS: dict[str, Callable[[Path], Path]] = {
    "cfr-h264.mp4": lambda p: clips.video(p, frames=30, codec=X264_GOPS),
    "hevc-open-gop.mkv": lambda p: clips.video(p, frames=30, codec=X265_OPEN_GOPS),
    "vfr.mp4": lambda p: clips.vfr_video(p, frames=30),
    "hdr10.mp4": lambda p: clips.hdr10_video(p, frames=20),
    # the stream starts 1.5 s in: its first keyframe is not at time zero
    "late-start.ts": lambda p: clips.video(p, frames=30, codec=X264_GOPS, extra=("-output_ts_offset", "1.5")),
}
RANGES = [(1, 4), (2, 5), (9, 7), (13, 1), (6, 25)]


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MediaInfo]:
    directory = tmp_path_factory.mktemp("decode-range")
    return {name: probe(make(directory / name)) for name, make in CLIPS.items()}


@pytest.mark.parametrize("yuv", [False, True], ids=["rgb", "yuv"])
@pytest.mark.parametrize("name", list(CLIPS))
def test_every_range_gives_the_frames_extraction_gives(
    probed: dict[str, MediaInfo], name: str, yuv: bool
) -> None:
    info = probed[name]
    total = info.video.frame_count
    whole = list(decode_frames(info, yuv=yuv))
    assert len(whole) == total
    for first, wanted in [*RANGES, (total, 1), (total - 3, 4)]:
        count = min(wanted, total - first + 1)
        got = list(decode_range(info, first, count, yuv=yuv))
        assert len(got) == count, (first, count)
        for offset, frame in enumerate(got):
            expected = whole[first - 1 + offset]
            assert frame.dtype == expected.dtype and frame.shape == expected.shape
            assert np.array_equal(frame, expected), f"{name}: frame {first + offset} of range {first}+{count}"


def test_the_clips_start_ranges_inside_gops(probed: dict[str, MediaInfo]) -> None:
    """The ranges above start on frames that are not keyframes, and the late clip starts late."""
    import av

    with av.open(str(probed["cfr-h264.mp4"].path)) as container:
        keyframes = [p.pts for p in container.demux(video=0) if p.size and p.is_keyframe]
    video = probed["cfr-h264.mp4"].video
    assert video.frame_pts[1] not in keyframes and video.frame_pts[8] not in keyframes
    assert len(keyframes) > 2
    late = probed["late-start.ts"]
    assert late.video.frame_pts[0] * late.video.time_base >= 1.5


def test_a_frame_out_of_place_is_refused_naming_it(probed: dict[str, MediaInfo]) -> None:
    info = probed["cfr-h264.mp4"]
    video = info.video
    shifted = (*video.frame_pts[:10], *(p + 1 for p in video.frame_pts[10:]))
    wrong = dataclasses.replace(info, video=dataclasses.replace(video, frame_pts=shifted))
    with pytest.raises(InputError, match=r"frame 11 should be at [0-9.]+ s, but the decoder gave one at"):
        list(decode_range(wrong, 9, 5))
    with pytest.raises(ValueError, match=r"frames 28\.\.31 are not within 1\.\.30"):
        list(decode_range(info, 28, 4))


# -- encoding a range from memory (media.segments.encode_segment_frames) -----------------------------


def test_a_segment_from_memory_is_the_segment_from_files(
    probed: dict[str, MediaInfo], tmp_path: Path
) -> None:
    """The same upscaled frames, handed over in memory or as frame files, make the same segment,
    bit for bit (one encoder thread, so x264 is deterministic)."""
    info = probed["cfr-h264.mp4"]
    upscaled = [clips.upscale_nearest(frame, 2) for frame in decode_range(info, 9, 7)]
    frames_dir = tmp_path / "output"
    frames_dir.mkdir()
    for offset, frame in enumerate(upscaled):
        write_frame(
            frames_dir / frame_filename(9 + offset, FrameFormat.NPY),
            frame,
            FrameFormat.NPY,
            png_compression=1,
        )
    settings = EncodeSettings(preset="veryfast")
    from_files = encode_segment(
        info, frames_dir, 9, 7, tmp_path / "files.mp4", settings=settings, frame_format=FrameFormat.NPY,
        encoder_threads=1,
    )  # fmt: skip
    from_memory = encode_segment_frames(
        info, iter(upscaled), 9, 7, tmp_path / "memory.mp4", settings=settings,
        frame_format=FrameFormat.NPY, encoder_threads=1,
    )  # fmt: skip
    assert from_memory.read_bytes() == from_files.read_bytes()
    assert segment_is_complete(from_memory, 7)


def test_a_lossless_segment_holds_exactly_the_frames_given(
    probed: dict[str, MediaInfo], tmp_path: Path
) -> None:
    info = probed["hdr10.mp4"]
    frames = list(decode_range(info, 5, 6))
    segment = encode_segment_frames(
        info,
        frames,
        5,
        6,
        tmp_path / "seg.mp4",
        settings=settings_for_depth(EncodeSettings(codec="ffv1"), info.video.bit_depth),
        frame_format=FrameFormat.NPY,
    )
    back = list(decode_frames(probe(segment)))
    assert len(back) == 6 and all(np.array_equal(a, b) for a, b in zip(back, frames, strict=True))


def test_a_failing_feed_leaves_no_segment(probed: dict[str, MediaInfo], tmp_path: Path) -> None:
    info = probed["cfr-h264.mp4"]
    closed: list[bool] = []

    def frames() -> Iterator[np.ndarray]:
        try:
            for index, frame in enumerate(decode_range(info, 1, 6)):
                if index == 4:
                    raise RuntimeError("the device fell over")
                yield frame
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="the device fell over"):
        encode_segment_frames(
            info, frames(), 1, 6, tmp_path / "seg.mp4", settings=EncodeSettings(preset="ultrafast"),
            frame_format=FrameFormat.NPY,
        )  # fmt: skip
    assert closed == [True]
    with pytest.raises(MediaError, match="only 3 frames came of frames 1-6"):
        encode_segment_frames(
            info, list(decode_range(info, 1, 3)), 1, 6, tmp_path / "seg.mp4",
            settings=EncodeSettings(preset="ultrafast"), frame_format=FrameFormat.NPY,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []
