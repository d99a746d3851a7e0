"""The protocol's one atomic-write mechanism and its one frame codec (manifests.atomic, manifests.frames)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from manifests.atomic import atomic_path, atomic_write, leftover_temp_files, temp_path
from manifests.frames import decode_frame, read_frame, write_frame
from manifests.layout import FrameFormat


@pytest.mark.parametrize("frame_format", list(FrameFormat))
def test_a_frame_reads_back_as_written(tmp_path: Path, frame_format: FrameFormat) -> None:
    frame = np.random.default_rng(3).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / f"f{frame_format.suffix}"
    write_frame(path, frame, frame_format, png_compression=1, fsync=True)
    np.testing.assert_array_equal(read_frame(path, frame_format), frame)
    assert os.listdir(tmp_path) == [path.name]


def test_a_frame_of_another_shape_is_refused() -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"not \(H, W, 3\) uint8"):
        decode_frame(buffer.getvalue(), FrameFormat.NPY)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "frame.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["frame.png"]


def test_atomic_path_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with atomic_path(target, suffix=".part") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.mp4.") and tmp.name.endswith(".part")
        assert not target.exists()
        tmp.write_bytes(b"video")
    assert target.read_bytes() == b"video"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_leftovers_of_a_killed_writer_are_found_and_only_they(tmp_path: Path) -> None:
    target = tmp_path / "a[1].mp4"
    left = [temp_path(target, ".part"), temp_path(target, ".video.part")]
    for path in left:
        path.write_bytes(b"x")
    (tmp_path / "a[1].mp4.part").write_bytes(b"not hidden: someone else's")
    (tmp_path / ".other.mp4.1.ab.part").write_bytes(b"another target's")
    assert leftover_temp_files(target, ".part") == sorted(left)
    assert leftover_temp_files(tmp_path / "missing" / "x.mp4") == []
