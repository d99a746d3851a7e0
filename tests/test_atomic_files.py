"""The protocol's one atomic-write mechanism and its one frame codec (manifests.atomic, manifests.frames)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from manifests.atomic import Directory, atomic_path, atomic_write, leftover_temp_files, temp_path
from manifests.errors import (
    FileTooLargeError,
    FrameFileError,
    FrameTooLargeError,
    NotRegularFileError,
    SymlinkRefusedError,
)
from manifests.frames import decode_frame, frame_file_is_sound, read_frame, read_npy_header, write_frame
from manifests.layout import FrameFormat


@pytest.mark.parametrize("frame_format", list(FrameFormat))
def test_a_frame_reads_back_as_written(tmp_path: Path, frame_format: FrameFormat) -> None:
    shape = (5, 7, 3) if frame_format.is_rgb else (9, 8)  # a YUV frame: 8x6 4:2:0, planes stacked
    frame = np.random.default_rng(3).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"f{frame_format.suffix}"
    write_frame(path, frame, frame_format, png_compression=1, fsync=True)
    np.testing.assert_array_equal(read_frame(path, frame_format), frame)
    assert os.listdir(tmp_path) == [path.name]


def test_a_yuv_frame_keeps_16_bit_samples_and_is_judged_by_its_header(tmp_path: Path) -> None:
    frame = np.random.default_rng(4).integers(0, 1024, size=(6, 4), dtype=np.uint16)  # 4x4, 10-bit
    path = tmp_path / "f.yuv"
    write_frame(path, frame, FrameFormat.YUV, png_compression=1)
    np.testing.assert_array_equal(read_frame(path, FrameFormat.YUV, bit_depth=16), frame)
    assert frame_file_is_sound(path, FrameFormat.YUV, 4, 4, bit_depth=16)
    assert not frame_file_is_sound(path, FrameFormat.YUV, 4, 4)  # 8-bit samples expected
    assert not frame_file_is_sound(path, FrameFormat.YUV, 4, 6, bit_depth=16)  # another size
    with pytest.raises(FrameFileError, match="holds 16-bit samples, not uint8"):
        read_frame(path, FrameFormat.YUV)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(FrameFileError, match="declares 48 bytes of 4x4 4:2:0, but 47 follow"):
        read_frame(path, FrameFormat.YUV, bit_depth=16)
    assert not frame_file_is_sound(path, FrameFormat.YUV, 4, 4, bit_depth=16)
    path.write_bytes(data[:8] + b"\x02\x00" + data[10:])  # a layout this release does not know
    with pytest.raises(FrameFileError, match="layout version 2; this esrfarm reads version 1"):
        read_frame(path, FrameFormat.YUV, bit_depth=16)
    assert not frame_file_is_sound(path, FrameFormat.YUV, 4, 4, bit_depth=16)
    path.write_bytes(b"\x89PNG" + data[4:])
    with pytest.raises(FrameFileError, match="not an esrfarm YUV frame"):
        read_frame(path, FrameFormat.YUV, bit_depth=16)
    with pytest.raises(ValueError, match="even width and height"):
        write_frame(path, np.zeros((3, 3), np.uint8), FrameFormat.YUV, png_compression=1)


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


# -- a bad frame is a sentence naming the frame and the reason ---------------------------------------


def _png(frame: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not a png", "it is not a PNG file (it does not start with the PNG signature)"),
        (b"", "the file is empty"),
        (_png(np.zeros((64, 64, 3), np.uint8))[:60], "image file is truncated"),
    ],
)
def test_a_bad_png_is_a_sentence_naming_the_frame(data: bytes, reason: str) -> None:
    with pytest.raises(FrameFileError) as caught:
        decode_frame(data, FrameFormat.PNG, name="input/00000005.png")
    text = str(caught.value)
    assert text.startswith("frame input/00000005.png is not a valid png image: ") and reason in text, text
    assert "object at 0x" not in text and "BytesIO" not in text


def test_a_frame_above_the_pixel_limit_is_refused_from_its_header() -> None:
    data = _png(np.zeros((300, 200, 3), np.uint8))
    assert decode_frame(data, FrameFormat.PNG, max_pixels=60_000).shape == (300, 200, 3)
    with pytest.raises(FrameTooLargeError) as caught:
        decode_frame(data, FrameFormat.PNG, name="f.png", max_pixels=59_999)
    assert (caught.value.width, caught.value.height) == (200, 300)
    assert str(caught.value) == "frame f.png is 200x300, more than the 59999 pixels allowed"


def test_an_npy_header_claiming_more_than_the_file_holds_is_refused_without_allocating() -> None:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000, 3)}
    )
    with pytest.raises(
        FrameFileError, match=r"declares 30000000000 bytes of uint8 \(100000, 100000, 3\), but 0"
    ):
        decode_frame(buffer.getvalue(), FrameFormat.NPY, name="f.npy")


# -- an open directory: never through a symlink, never blocking, never more than a cap -------------------


def test_a_directory_opened_below_refuses_symlinked_components(tmp_path: Path) -> None:
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with Directory.open(tmp_path) as root:
        with root.open_below("real/deep") as deep:
            assert deep.path == tmp_path / "real" / "deep"
        with pytest.raises(SymlinkRefusedError, match="link is a symbolic link"):
            root.open_below("link/deep")
        with root.open_below("made/here", create=True):
            assert (tmp_path / "made" / "here").is_dir()
        with pytest.raises(ValueError, match="is not a path below"):
            root.open_below("../x")


def test_read_bytes_takes_only_small_regular_files(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "small")
    os.mkfifo(tmp_path / "fifo")
    with Directory.open(tmp_path) as directory:
        assert directory.read_bytes("small", max_bytes=5) == b"12345"
        with pytest.raises(FileTooLargeError, match="small is 5 bytes, more than the 4 bytes allowed"):
            directory.read_bytes("small", max_bytes=4)
        with pytest.raises(SymlinkRefusedError):
            directory.read_bytes("link", max_bytes=5)
        with pytest.raises(NotRegularFileError, match=r"fifo is a named pipe \(FIFO\), not a regular file"):
            directory.read_bytes("fifo", max_bytes=5)  # at once: opening never waits for a writer
        with pytest.raises(NotRegularFileError, match="is a directory"):
            directory.read_bytes(".", max_bytes=5)
        with pytest.raises(InterruptedError):  # a pipe allowed, but its read given up when asked
            directory.read_bytes("fifo", max_bytes=5, pipes=True, cancelled=lambda: True)


def test_writes_go_to_the_directory_opened_even_after_its_path_is_swapped(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    with Directory.open(tmp_path / "out", follow_symlinks=False) as out:
        assert not out.replaced()
        (tmp_path / "out").rename(tmp_path / "out.moved")
        (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
        assert out.replaced()
        out.write_bytes_atomic("f.json", b"{}")
        write_frame(
            "00000001.npy", np.zeros((2, 2, 3), np.uint8), FrameFormat.NPY, png_compression=1, directory=out
        )
    assert sorted(os.listdir(tmp_path / "out.moved")) == ["00000001.npy", "f.json"]
    assert os.listdir(tmp_path / "elsewhere") == []
    (tmp_path / "planted").symlink_to(tmp_path / "elsewhere" / "target")
    with Directory.open(tmp_path) as root:  # a symlink at the final name is replaced, never followed
        root.write_bytes_atomic("planted", b"new")
    assert (tmp_path / "planted").read_bytes() == b"new" and os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.parametrize(
    ("shape", "dtype", "order"),
    [
        ((144, 256, 3), "u1", "C"),
        ((9, 7, 3), "<u2", "C"),
        ((5,), "u1", "C"),
        ((), "u1", "C"),
        ((3, 4), "<f8", "F"),
    ],
)
def test_the_npy_header_is_read_as_numpy_writes_it(shape: tuple[int, ...], dtype: str, order: str) -> None:
    """Frame headers are parsed by a pattern, not numpy's ast.literal_eval (which CPython 3.11.7 can
    fail spuriously when several reader threads parse at once): the same answer as numpy's."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype, order=order))  # type: ignore[call-overload]
    data = buffer.getvalue()
    got_shape, fortran, got_dtype, offset = read_npy_header(data)
    reference = io.BytesIO(data)
    np.lib.format.read_magic(reference)
    assert (got_shape, fortran, got_dtype) == np.lib.format.read_array_header_1_0(reference)
    assert offset == reference.tell()


@pytest.mark.parametrize(
    "header",
    [
        b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n",
        b"\x93NUMPY\x03\x00\x00\x00",
        b"GIF89a",
        b"\x93NUMPY\x01\x00\xff\x00{",
    ],
)
def test_an_npy_header_numpy_would_not_write_is_refused(header: bytes) -> None:
    with pytest.raises(ValueError):
        read_npy_header(header)
