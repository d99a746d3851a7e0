"""The frames a comparison reads: a seeked run equals the same frames of a full decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compare.frames import PillowUpscaler, degrade, read_run
from compare.run import frame_window
from compare.spec import CompareError
from media.extract import decode_frames
from media.probe import probe
from tests import clips

GOP_X264 = ("-c:v", "libx264", "-preset", "medium", "-g", "12", "-bf", "3", "-pix_fmt", "yuv420p")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compare-frames")
    return {
        "b-frames": clips.video(folder / "gop.mp4", size="96x64", frames=40, codec=GOP_X264),
        "audio-first": clips.video_with_audio(folder / "av.mp4", size="96x64", seconds=2.0, audio_delay=-0.3),
        "vfr": clips.vfr_video(folder / "vfr.mp4"),
    }


@pytest.mark.parametrize("kind", ["b-frames", "audio-first", "vfr"])
def test_a_seeked_run_is_the_same_frames_as_a_full_decode(media: dict[str, Path], kind: str) -> None:
    info = probe(media[kind])
    every = np.stack(list(decode_frames(info)))
    count = len(every)
    for first in (0, 1, 7, count // 2, count - 3):
        run = read_run(info, range(first, first + 3))
        assert np.array_equal(run, every[first : first + 3]), f"frames {first}-{first + 2} of {kind}"


def test_read_run_refuses_frames_past_the_end(media: dict[str, Path]) -> None:
    info = probe(media["vfr"])
    with pytest.raises(ValueError, match="not a contiguous run"):
        read_run(info, range(28, 31))


def test_window_by_time(media: dict[str, Path]) -> None:
    info = probe(media["b-frames"])  # 25 fps
    assert frame_window(info, None, None) == range(0, 40)
    assert frame_window(info, 0.4, 0.4) == range(10, 20)
    with pytest.raises(CompareError, match="no frame between 5 s and"):
        frame_window(info, 5.0, None)


def test_degrade_then_bicubic_restores_the_size() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 36, 64, 3), dtype=np.uint8)
    small = degrade(frames, 2)
    assert small.shape == (2, 18, 32, 3)
    assert PillowUpscaler("bicubic", 2).upscale(small).shape == frames.shape
    with pytest.raises(ValueError, match="not a multiple of the scale 3"):
        degrade(frames, 3)
