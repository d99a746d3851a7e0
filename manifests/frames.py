"""The frame file codec: frame files are part of the protocol, read and written by both sides.

A frame is an RGB image, a ``(H, W, 3)`` uint8 array, stored as PNG (compact, slow) or as a raw
``.npy`` array (fast, large). The coordinator writes input frames and reads output frames; workers
read input frames and write output frames; both use these functions, so the two sides can never
disagree on what a frame file holds.

Every frame is written under a temporary name and renamed (:mod:`manifests.atomic`), so a
half-written frame never has its final name.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from manifests.atomic import atomic_write
from manifests.layout import FrameFormat

__all__ = ["decode_frame", "encode_frame_into", "frame_file_is_sound", "read_frame", "write_frame"]


def decode_frame(data: bytes, frame_format: FrameFormat) -> np.ndarray:
    """Decode a frame file's bytes into an (H, W, 3) uint8 RGB array.

    Raises ``ValueError`` (or Pillow's ``OSError`` / ``SyntaxError``) for bytes that are not a frame.
    """
    if frame_format is FrameFormat.NPY:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"holds a {array.dtype} array of shape {array.shape}, not (H, W, 3) uint8")
        return np.ascontiguousarray(array)
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)


def read_frame(path: str | Path, frame_format: FrameFormat) -> np.ndarray:
    """Read one frame file (one sequential read, which also suits slow network storage)."""
    return decode_frame(Path(path).read_bytes(), frame_format)


def encode_frame_into(
    handle: BinaryIO, frame: np.ndarray, frame_format: FrameFormat, png_compression: int
) -> None:
    """Write ``frame`` in ``frame_format`` to an open binary file."""
    if frame_format is FrameFormat.NPY:
        np.save(handle, frame, allow_pickle=False)
    else:
        Image.fromarray(frame, mode="RGB").save(handle, format="PNG", compress_level=png_compression)


def write_frame(
    path: str | Path,
    frame: np.ndarray,
    frame_format: FrameFormat,
    *,
    png_compression: int,
    fsync: bool = False,
) -> None:
    """Write one frame to ``path`` atomically; ``fsync`` flushes it to disk before the rename."""
    with atomic_write(path, fsync=fsync) as handle:
        encode_frame_into(handle, frame, frame_format, png_compression)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def frame_file_is_sound(path: str | Path, frame_format: FrameFormat, width: int, height: int) -> bool:
    """Whether the frame file at ``path`` is whole and of the given size, judged by its header and
    its end (two small reads, no decode): a truncated file, garbage, or a frame of another size is
    not. What a resumed job checks before it trusts a frame an earlier run left."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if frame_format is FrameFormat.NPY:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(handle)
                expected = handle.tell() + height * width * 3
                return bool(shape == (height, width, 3) and dtype == np.uint8 and size == expected)
            head = handle.read(24)
            handle.seek(max(0, size - len(_PNG_END)))
            tail = handle.read()
    except (OSError, ValueError):
        return False
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return False
    return struct.unpack(">II", head[16:24]) == (width, height) and tail == _PNG_END
