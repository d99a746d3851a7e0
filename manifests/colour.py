"""How a job's YUV frames map to RGB: the matrix, the range and the sample depth, as pure numbers.

A job whose frames are stored as planar YUV 4:2:0 (:attr:`FrameFormat.YUV
<manifests.layout.FrameFormat.YUV>`) leaves the colour conversion to the worker, which does it on
its device around the model. The manifest names the conversion (:class:`YuvSpec`); this module
turns it into coefficients, so the worker (torch), the stand-in model (numpy) and the tests all
compute the same thing.

Conventions are ffmpeg's (swscale's): ``matrix`` is a scale-filter matrix name (``bt709``,
``bt601``, ``fcc``, ``smpte240m``, ``bt2020``); ``range`` is ``tv`` (limited: luma 16-235, chroma
16-240 at 8 bits, scaled by ``2 ** (bits - 8)``) or ``pc`` (full: 0 to ``2 ** bits - 1``, chroma
centred on ``2 ** (bits - 1)``). Chroma of 4:2:0 is taken as sited at the centre of its 2x2 luma
block, as swscale takes it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Annotated

from msgspec import Meta

from manifests.records import Record

#: (Kr, Kb) of each matrix: Y = Kr R + (1 - Kr - Kb) G + Kb B.
YUV_MATRICES = MappingProxyType(
    {
        "bt709": (0.2126, 0.0722),
        "bt601": (0.299, 0.114),
        "fcc": (0.30, 0.11),
        "smpte240m": (0.212, 0.087),
        "bt2020": (0.2627, 0.0593),
    }
)
YUV_RANGES = ("tv", "pc")
#: The sample depths a YUV frame may have (significant bits; 9 to 16 are stored in 16-bit samples).
MIN_YUV_BITS, MAX_YUV_BITS = 8, 16


class YuvSpec(Record):
    """The conversion of a job's YUV frames: matrix, range and significant bits per sample (the
    manifest's ``yuv``; a bad one is a :class:`~manifests.errors.DocumentError`, a ValueError)."""

    KIND = "manifest"

    matrix: str  # one of YUV_MATRICES
    range: str  # one of YUV_RANGES
    bits: Annotated[int, Meta(ge=MIN_YUV_BITS, le=MAX_YUV_BITS)]

    def _check(self) -> None:
        if self.matrix not in YUV_MATRICES:
            raise self.fail("matrix", f"must be one of {', '.join(YUV_MATRICES)}, not {self.matrix!r}")
        if self.range not in YUV_RANGES:
            raise self.fail("range", f"must be tv or pc, not {self.range!r}")

    @property
    def sample_bits(self) -> int:
        """The frame file's container depth: 8 (uint8) or 16 (uint16, for 9 to 16 bits)."""
        return 8 if self.bits == 8 else 16

    @property
    def peak(self) -> int:
        return (1 << self.bits) - 1

    @property
    def luma_offset_scale(self) -> tuple[float, float]:
        """(offset, scale): luma code value = offset + scale * Y', for Y' in [0, 1]."""
        if self.range == "pc":
            return 0.0, float(self.peak)
        step = 1 << (self.bits - 8)
        return 16.0 * step, 219.0 * step

    @property
    def chroma_offset_scale(self) -> tuple[float, float]:
        """(offset, scale): chroma code value = offset + scale * C', for C' in [-0.5, 0.5]."""
        centre = float(1 << (self.bits - 1))
        if self.range == "pc":
            return centre, float(self.peak)
        return centre, 224.0 * (1 << (self.bits - 8))

    @property
    def kr_kb(self) -> tuple[float, float]:
        return YUV_MATRICES[self.matrix]

    def to_rgb_matrix(self) -> tuple[tuple[float, float, float], ...]:
        """Rows R, G, B of the matrix taking (Y', Cb', Cr') to (R', G', B')."""
        kr, kb = self.kr_kb
        kg = 1.0 - kr - kb
        return (
            (1.0, 0.0, 2.0 * (1.0 - kr)),
            (1.0, -2.0 * (1.0 - kb) * kb / kg, -2.0 * (1.0 - kr) * kr / kg),
            (1.0, 2.0 * (1.0 - kb), 0.0),
        )

    def from_rgb_matrix(self) -> tuple[tuple[float, float, float], ...]:
        """Rows Y', Cb', Cr' of the matrix taking (R', G', B') to (Y', Cb', Cr')."""
        kr, kb = self.kr_kb
        kg = 1.0 - kr - kb
        return (
            (kr, kg, kb),
            (-0.5 * kr / (1.0 - kb), -0.5 * kg / (1.0 - kb), 0.5),
            (0.5, -0.5 * kg / (1.0 - kr), -0.5 * kb / (1.0 - kr)),
        )


def i420_shape(height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of a planar 4:2:0 frame of ``width`` x ``height`` held as one 2-D array:
    the Y plane's ``height`` rows, then U and V (each ``height / 2`` x ``width / 2``) packed into
    ``height / 4`` rows each: ``(height * 3 // 2, width)``. Both sides must be even."""
    if height % 2 or width % 2 or height < 2 or width < 2:
        raise ValueError(f"a 4:2:0 frame needs an even width and height, not {width}x{height}")
    return height * 3 // 2, width


def i420_size(rows: int, width: int) -> tuple[int, int]:
    """The (width, height) of the picture a planar 4:2:0 array of ``rows`` x ``width`` holds."""
    return width, rows * 2 // 3
