"""The frame file codec: frame files are part of the protocol, read and written by both sides.

A frame is an RGB image, a ``(H, W, 3)`` uint8 array, stored as PNG (compact, slow) or as a raw
``.npy`` array (fast, large). A frame of a source with more than 8 bits per sample is a ``(H, W, 3)``
uint16 array (:data:`HIGH_BIT_DEPTH`), stored as ``.npy`` (or YUV): Pillow cannot write 16-bit RGB
PNG, and a raw array is what the 8-bit ``.npy`` path already reads and checks, with twice the bytes.

A YUV frame (:attr:`FrameFormat.YUV`) is planar 4:2:0 as a decoder gives it: one ``(H * 3 / 2, W)``
array (Y, then U, then V; :func:`manifests.colour.i420_shape`) of uint8, or uint16 holding 9 to 16
significant bits. Its file is a 32-byte header (:data:`YUV_MAGIC`, the version, bytes per sample,
width, height) and the planes, raw: one read, one write, no conversion on the host. A file of
another version or layout is refused, never read as a frame.

The coordinator writes input frames and reads output frames; workers read input frames and write
output frames; both use these functions, so the two sides can never disagree on what a frame file
holds.

Every frame is written under a temporary name and renamed (:mod:`manifests.atomic`), so a
half-written frame never has its final name.

Bytes that are not a frame raise :class:`~manifests.errors.FrameFileError`, a sentence that names the
frame and says what is wrong with it; a frame with more pixels than the reader allows raises
:class:`~manifests.errors.FrameTooLargeError` before anything is decoded (its header is enough).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from manifests.atomic import Directory, atomic_write
from manifests.colour import i420_shape, i420_size
from manifests.errors import FrameFileError, FrameTooLargeError
from manifests.layout import BIT_DEPTHS, HIGH_BIT_DEPTH, FrameFormat, frame_formats_for_depth

__all__ = [
    "BIT_DEPTHS",
    "HIGH_BIT_DEPTH",
    "decode_frame",
    "encode_frame_into",
    "frame_file_is_sound",
    "frame_formats_for_depth",
    "frame_size",
    "read_frame",
    "write_frame",
]

_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {8: np.dtype(np.uint8), 16: np.dtype("<u2")}


_YUV_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The first 8 bytes of a YUV frame file; the next 2 are its layout version (:data:`YUV_VERSION`).
YUV_MAGIC = b"ESRFYUV\x00"
YUV_VERSION = 1
#: magic, version, bytes per sample, width, height, then zeros up to :data:`YUV_HEADER_BYTES`.
_YUV_HEADER = struct.Struct("<8sHHII")
YUV_HEADER_BYTES = 32
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_frame(
    data: bytes,
    frame_format: FrameFormat,
    *,
    name: str = "(unnamed)",
    max_pixels: int | None = None,
    bit_depth: int = 8,
) -> np.ndarray:
    """Decode a frame file's bytes into an (H, W, 3) RGB array: uint8, or uint16 for ``bit_depth`` 16.

    ``name`` is how messages call the frame. Raises :class:`FrameFileError` (a ``ValueError``) for
    bytes that are not a frame of that depth, and :class:`FrameTooLargeError` for a frame of more
    than ``max_pixels`` pixels, found from its header before any pixel is decoded.
    """
    if frame_format not in frame_formats_for_depth(bit_depth):
        raise FrameFileError(name, frame_format.value, f"{bit_depth}-bit frames are stored as npy, not PNG")
    try:
        if frame_format is FrameFormat.NPY:
            return _decode_npy(data, name, max_pixels, _DTYPES[bit_depth])
        if frame_format is FrameFormat.YUV:
            return _decode_yuv(data, name, max_pixels, _DTYPES[bit_depth])
        return _decode_png(data, name, max_pixels)
    except (FrameFileError, MemoryError):
        raise
    except Exception as exc:  # Pillow and numpy raise many kinds (OSError, SyntaxError, zlib.error...)
        raise FrameFileError(name, frame_format.value, _reason(exc)) from None


def _decode_png(data: bytes, name: str, max_pixels: int | None) -> np.ndarray:
    if not data:
        raise FrameFileError(name, "png", "the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])  # reads the header only
    except UnidentifiedImageError:
        reason = (
            "its PNG header cannot be read"
            if data.startswith(PNG_SIGNATURE)
            else "it is not a PNG file (it does not start with the PNG signature)"
        )
        raise FrameFileError(name, "png", reason) from None
    with image:
        _check_pixels(name, FrameFormat.PNG, image.size[0], image.size[1], max_pixels)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    r"^\{'descr': '(?P<descr>[<>|=][a-zA-Z]\d*)', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>(?:\d+, ?)*\d*)\), \}\s*$"
)


def read_npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) from the start of an ``.npy`` file (version 1.0 or
    2.0, as numpy writes them). Parsed with a pattern, not numpy's ``ast.literal_eval``, which
    CPython 3.11.7 can fail spuriously in several threads at once ("AST constructor recursion depth
    mismatch"). Raises ValueError for anything else."""
    if not head.startswith(_NPY_MAGIC) or len(head) < 10:
        raise ValueError("it is not an npy file (no npy magic)")
    major, minor = head[6], head[7]
    if (major, minor) == (1, 0):
        length, start = int.from_bytes(head[8:10], "little"), 10
    elif (major, minor) == (2, 0) and len(head) >= 12:
        length, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise ValueError(f"npy format version {major}.{minor} is not supported")
    if len(head) < start + length:
        raise ValueError("its npy header is cut short")
    match = _NPY_HEADER.match(head[start : start + length].decode("latin1"))
    if match is None:
        raise ValueError("its npy header is not one numpy writes")
    shape = tuple(int(part) for part in match["shape"].replace(" ", "").split(",") if part)
    return shape, match["fortran"] == "True", np.dtype(match["descr"]), start + length


def _decode_npy(data: bytes, name: str, max_pixels: int | None, want: np.dtype) -> np.ndarray:
    try:
        shape, fortran, dtype, offset = read_npy_header(data)
    except ValueError as exc:
        raise FrameFileError(name, "npy", str(exc)) from None
    declared, present = math.prod(shape) * dtype.itemsize, len(data) - offset
    if declared != present:
        raise FrameFileError(
            name, "npy", f"its header declares {declared} bytes of {dtype} {shape}, but {present} follow"
        )
    if len(shape) >= 2:
        _check_pixels(name, FrameFormat.NPY, shape[1], shape[0], max_pixels)
    if dtype != want or len(shape) != 3 or shape[2] != 3:
        shown = "uint16" if want.itemsize == 2 else "uint8"
        raise ValueError(f"it holds a {dtype} array of shape {shape}, not (H, W, 3) {shown}")
    if fortran:
        raise ValueError("it holds a Fortran-ordered array; frames are C-ordered")
    # The samples in place (read-only, no copy): np.load would copy them once more.
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _yuv_header(data: bytes, name: str) -> tuple[int, int, int]:
    """(bytes per sample, width, height) from a YUV frame file's header; FrameFileError if it has none."""
    if len(data) < YUV_HEADER_BYTES:
        raise FrameFileError(name, "yuv", f"it holds {len(data)} bytes, less than a YUV frame header")
    magic, version, sample_bytes, width, height = _YUV_HEADER.unpack_from(data)
    if magic != YUV_MAGIC:
        raise FrameFileError(name, "yuv", "it is not an esrfarm YUV frame (it does not start with ESRFYUV)")
    if version != YUV_VERSION:
        raise FrameFileError(
            name,
            "yuv",
            f"it is a YUV frame of layout version {version}; this esrfarm reads version {YUV_VERSION} "
            "(the coordinator and the workers must be of the same release)",
        )
    if sample_bytes not in (1, 2):
        raise FrameFileError(name, "yuv", f"its header declares {sample_bytes} bytes per sample, not 1 or 2")
    return sample_bytes, width, height


def _decode_yuv(data: bytes, name: str, max_pixels: int | None, want: np.dtype) -> np.ndarray:
    sample_bytes, width, height = _yuv_header(data, name)
    if sample_bytes != want.itemsize:
        shown = "uint16" if want.itemsize == 2 else "uint8"
        raise FrameFileError(name, "yuv", f"it holds {8 * sample_bytes}-bit samples, not {shown}")
    _check_pixels(name, FrameFormat.YUV, width, height, max_pixels)
    try:
        rows, columns = i420_shape(height, width)
    except ValueError as exc:
        raise FrameFileError(name, "yuv", str(exc)) from None
    declared, present = rows * columns * sample_bytes, len(data) - YUV_HEADER_BYTES
    if declared != present:
        raise FrameFileError(
            name,
            "yuv",
            f"its header declares {declared} bytes of {width}x{height} 4:2:0, but {present} follow",
        )
    return np.frombuffer(data, dtype=want, offset=YUV_HEADER_BYTES).reshape(rows, columns)


def frame_size(frame: np.ndarray, frame_format: FrameFormat) -> tuple[int, int]:
    """The (width, height) of the picture ``frame`` (an array of ``frame_format``'s layout) holds."""
    if frame_format is FrameFormat.YUV:
        return i420_size(frame.shape[0], frame.shape[1])
    return frame.shape[1], frame.shape[0]


def _check_pixels(name: str, frame_format: FrameFormat, width: int, height: int, limit: int | None) -> None:
    if limit is not None and width * height > limit:
        raise FrameTooLargeError(name, frame_format.value, width, height, limit)


def _reason(exc: Exception) -> str:
    """What went wrong, as a phrase: the library's message without object reprs (``<_io.BytesIO ...>``)."""
    text = _OBJECT_REPR.sub("the data", str(exc)).strip()
    return text or type(exc).__name__


def read_frame(path: str | Path, frame_format: FrameFormat, *, bit_depth: int = 8) -> np.ndarray:
    """Read one frame file (one sequential read, which also suits slow network storage)."""
    path = Path(path)
    return decode_frame(path.read_bytes(), frame_format, name=path.name, bit_depth=bit_depth)


def encode_frame_into(
    handle: BinaryIO, frame: np.ndarray, frame_format: FrameFormat, png_compression: int
) -> None:
    """Write ``frame`` (uint8, or uint16: not PNG) in ``frame_format`` to an open binary file."""
    if frame_format is FrameFormat.YUV:
        width, height = i420_size(*frame.shape[:2])
        if frame.ndim != 2 or frame.shape != i420_shape(height, width) or frame.dtype not in _YUV_DTYPES:
            raise ValueError(f"a YUV frame is a (H * 3 / 2, W) uint8 or uint16 array, not {frame.shape}")
        header = _YUV_HEADER.pack(YUV_MAGIC, YUV_VERSION, frame.dtype.itemsize, width, height)
        handle.write(header.ljust(YUV_HEADER_BYTES, b"\x00"))
        handle.write(np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).data.cast("B"))
    elif frame.dtype == np.uint16:
        if frame_format is not FrameFormat.NPY:
            raise ValueError("16-bit frames are stored as npy; Pillow cannot write 16-bit RGB PNG")
        np.save(handle, frame.astype(_DTYPES[HIGH_BIT_DEPTH], copy=False), allow_pickle=False)
    elif frame_format is FrameFormat.NPY:
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
    directory: Directory | None = None,
) -> None:
    """Write one frame to ``path`` atomically; ``fsync`` flushes it to disk before the rename.

    With ``directory``, ``path`` is a name in that open directory (:class:`manifests.atomic.Directory`).
    """
    writer = (
        atomic_write(path, fsync=fsync)
        if directory is None
        else directory.atomic_write(str(path), fsync=fsync)
    )
    with writer as handle:
        encode_frame_into(handle, frame, frame_format, png_compression)


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def frame_file_is_sound(
    path: str | Path, frame_format: FrameFormat, width: int, height: int, *, bit_depth: int = 8
) -> bool:
    """Whether the frame file at ``path`` is whole, of the given size and depth, judged by its header
    and its end (two small reads, no decode): a truncated file, garbage, or a frame of another size
    or depth is not. What a resumed job checks before it trusts a frame an earlier run left."""
    if frame_format not in frame_formats_for_depth(bit_depth):
        return False
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if frame_format is FrameFormat.NPY:
                shape, _, dtype, offset = read_npy_header(handle.read(4096))
                want = _DTYPES[bit_depth]
                expected = offset + height * width * 3 * want.itemsize
                return bool(shape == (height, width, 3) and dtype == want and size == expected)
            if frame_format is FrameFormat.YUV:
                try:
                    sample_bytes, got_w, got_h = _yuv_header(handle.read(YUV_HEADER_BYTES), "")
                    rows, columns = i420_shape(height, width)
                except (FrameFileError, ValueError):
                    return False
                want_bytes = _DTYPES[bit_depth].itemsize
                expected = YUV_HEADER_BYTES + rows * columns * want_bytes
                return (got_w, got_h) == (width, height) and sample_bytes == want_bytes and size == expected
            head = handle.read(24)
            handle.seek(max(0, size - len(_PNG_END)))
            tail = handle.read()
    except (OSError, ValueError):
        return False
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return False
    return struct.unpack(">II", head[16:24]) == (width, height) and tail == _PNG_END
