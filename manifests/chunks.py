"""Streaming plan: a job's frames cut into chunks that flow through extract -> upscale -> encode.

Frame data on disk stays under a budget (``--max-disk``): a chunk is admitted (its input frames
extracted) only while the input and output frames of every admitted chunk fit. A chunk releases its
input frames' share once upscaled and its output frames' share once encoded as a segment. Chunk
edges fall on batch edges, so a chunk's batches are a slice of the job's batches.

Pure: sizes are upper bounds computed from frame dimensions, never measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifests.errors import PlanningError
from manifests.layout import FrameFormat

NPY_HEADER_BYTES = 128
DEFAULT_MAX_CHUNK_FRAMES = 256


@dataclass(frozen=True)
class Chunk:
    """Frames ``first .. first + count - 1`` (1-based), encoded together as segment ``index``."""

    index: int
    first: int
    count: int

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    @property
    def frames(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class ChunkPlan:
    chunks: tuple[Chunk, ...]
    chunk_frames: int
    input_frame_bytes: int  # upper bound of one input frame file
    output_frame_bytes: int  # upper bound of one output frame file

    def chunk_of(self, frame: int) -> Chunk:
        return self.chunks[(frame - self.chunks[0].first) // self.chunk_frames]

    def input_cost(self, chunk: Chunk) -> int:
        return chunk.count * self.input_frame_bytes

    def output_cost(self, chunk: Chunk) -> int:
        return chunk.count * self.output_frame_bytes


def frame_file_bytes(width: int, height: int, frame_format: FrameFormat, bit_depth: int = 8) -> int:
    """An upper bound of the size of one (height, width, 3) frame file of ``bit_depth`` (8 or 16) bits.

    ``.npy``: the raw bytes (2 per sample at 16 bits) and its header; YUV: half the samples. PNG:
    the raw bytes, a filter byte per row and zlib's worst-case growth (stored blocks: 5 bytes per
    16 KiB) plus the PNG chunks around them.
    """
    raw = width * height * 3 * (2 if bit_depth > 8 else 1)
    if frame_format is FrameFormat.YUV:  # 4:2:0: half the samples of RGB (an odd side rounds up)
        return (width + 1) * (height + 1) * 3 // 2 * (2 if bit_depth > 8 else 1) + NPY_HEADER_BYTES
    if frame_format is FrameFormat.NPY:
        return raw + NPY_HEADER_BYTES
    filtered = raw + height
    return filtered + 5 * (filtered // 16384 + 1) + 1024


def plan_chunks(
    frame_count: int,
    *,
    batch_size: int,
    input_frame_bytes: int,
    output_frame_bytes: int,
    max_disk: int,
    max_chunk_frames: int = DEFAULT_MAX_CHUNK_FRAMES,
    in_flight: int = 3,
    first_frame: int = 1,
) -> ChunkPlan:
    """Cut ``frame_count`` frames into chunks of whole batches that fit the disk budget.

    A chunk is sized so that ``in_flight`` of them (one extracting, one upscaling, one encoding)
    fit in ``max_disk`` when possible, else as many batches as fit, never more than
    ``max_chunk_frames``. Raises :class:`PlanningError` if not even one batch fits.
    """
    if frame_count < 1:
        raise PlanningError(f"a job needs at least one frame, not {frame_count}")
    if batch_size < 1 or max_chunk_frames < 1 or in_flight < 1:
        raise PlanningError("batch size, chunk size and chunks in flight must be at least 1")
    per_frame = input_frame_bytes + output_frame_bytes
    smallest = min(batch_size, frame_count)
    if smallest * per_frame > max_disk:
        raise PlanningError(
            f"the disk budget of {format_size(max_disk)} does not hold even one batch of {smallest} frames "
            f"({format_size(smallest * per_frame)} of input and upscaled frames); "
            "raise --max-disk or lower --batch-size"
        )
    fitting_batches = max(1, max_disk // (in_flight * per_frame * batch_size))
    chunk_frames = fitting_batches * batch_size
    if chunk_frames > max_chunk_frames:
        chunk_frames = max(batch_size, max_chunk_frames // batch_size * batch_size)
    if chunk_frames * per_frame > max_disk:  # in_flight could not fit: one chunk must at least
        chunk_frames = max(1, max_disk // (per_frame * batch_size)) * batch_size
    chunk_frames = min(chunk_frames, -(-frame_count // batch_size) * batch_size)
    end = first_frame + frame_count
    chunks = tuple(
        Chunk(index, start, min(chunk_frames, end - start))
        for index, start in enumerate(range(first_frame, end, chunk_frames))
    )
    return ChunkPlan(chunks, chunk_frames, input_frame_bytes, output_frame_bytes)


def format_size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"2.5GiB"``, ``"1000000"`` -> bytes (binary units)."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    factor = 1
    if cleaned and cleaned[-1] in units:
        factor = units[cleaned[-1]]
        cleaned = cleaned[:-1]
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4G, 512M or a number of bytes)") from None
    if value <= 0:
        raise ValueError(f"a size must be above 0, not {text!r}")
    return int(value * factor)
