"""The manifest: one worker's share of a job, as a versioned JSON file.

Example (``format`` is checked first; unknown fields are refused)::

    {
      "format": "esrfarm.manifest/1",
      "job_id": "clip-2024",
      "manifest_id": "w0",
      "worker_id": "gpu-host-1:8090",
      "model": "realesr-animevideov3",
      "scale": 2.0,                     # null: the model's native scale
      "tile": null, "tile_pad": null,   # null: whatever the worker was started with
      "frame_format": "png", "png_compression": 1,
      "bit_depth": 16,                  # only for 16-bit frames (sources above 8 bits); absent: 8
      "yuv": {"matrix": "bt709", "range": "tv", "bits": 10},  # only for frame_format "yuv"
      "input_dir": "input", "output_dir": "output", "status_file": "status/w0.json",
      "batches": [{"id": 0, "start": 1, "end": 9}, {"id": 3, "frames": [25, 26, 30]}]
    }

``bit_depth`` is written only when it is 16 (frames are then uint16 ``.npy``, see
:mod:`manifests.frames`), so an 8-bit job's manifest is byte for byte what it was before it existed.
``yuv`` is present exactly when ``frame_format`` is ``yuv``: the conversion the worker applies on
its device between the YUV frames and the model's RGB (:class:`manifests.colour.YuvSpec`); a worker
of a release without it refuses such a manifest (an unknown frame format and field), never
misreads its frames.

A segment job's manifest (``--transport segments``) also holds a ``segment`` record
(:class:`manifests.segment.SegmentWork`): the worker decodes the range from the source video
instead of reading frame files, and encodes it into one segment file. Its batches must cover the
range's frames exactly, in order, and its ``frame_format`` (``yuv`` or ``npy``) says in which
layout the decoded frames reach the model; ``input_dir`` and ``output_dir`` are not used.

A batch is a contiguous range ``[start, end)`` of frame indices, or an explicit list. Frame ``i``
is read from ``<input_dir>/<frame_filename(i)>`` and written to ``<output_dir>/`` under the same name.

What a manifest may ask for is bounded, so that a few hundred bytes cannot make a worker hold
millions of frames: at most :data:`MAX_BATCH_FRAMES` frames per batch, :data:`MAX_MANIFEST_BATCHES`
batches and :data:`MAX_MANIFEST_FRAMES` frames per manifest, frame indices below
:data:`MAX_FRAME_INDEX` (checked while parsing, before any range is expanded); a scale between
:data:`MIN_SCALE` and :data:`MAX_SCALE`; tiles of at most :data:`MAX_TILE` pixels with at most
:data:`MAX_TILE_PAD` of context; strings of at most :data:`MAX_STRING` characters. A worker that
knows the job's frame count (``job.json``) also refuses frames beyond it
(:func:`check_frames_within_job`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import msgspec
import orjson
from msgspec import Meta

from manifests.colour import YuvSpec
from manifests.errors import DocumentError
from manifests.layout import (
    BIT_DEPTHS,
    DEFAULT_FIRST_FRAME,
    FRAME_DIGITS,
    FrameFormat,
    frame_formats_for_depth,
    is_safe_name,
)
from manifests.records import Document, Record
from manifests.segment import SegmentWork

MANIFEST_FORMAT = "esrfarm.manifest/1"
DEFAULT_PNG_COMPRESSION = 1
MAX_BATCH_FRAMES = 4096
MAX_MANIFEST_BATCHES = 65_536
MAX_MANIFEST_FRAMES = 1 << 20
MAX_FRAME_INDEX = 10**FRAME_DIGITS - 1  # frame file names keep their 8 digits
MIN_SCALE = 1 / 16
MAX_SCALE = 16.0
MAX_TILE = 65_536
MAX_TILE_PAD = 1024
#: The worker backends, as a worker's ``/health`` names its own (``"backend"``; absent: torch). A job
#: runs on workers of one backend only: their outputs differ slightly (README, "Backends").
BACKENDS = ("torch", "ncnn")
MAX_STRING = 4096
_KIND = "manifest"

FrameIndex = Annotated[int, Meta(ge=0, le=MAX_FRAME_INDEX)]
#: A non-empty string of at most :data:`MAX_STRING` characters.
Text = Annotated[str, Meta(min_length=1, max_length=MAX_STRING)]
Scale = Annotated[float, Meta(ge=MIN_SCALE, le=MAX_SCALE)]
Tile = Annotated[int, Meta(ge=0, le=MAX_TILE)]
TilePad = Annotated[int, Meta(ge=0, le=MAX_TILE_PAD)]


class Batch(Record, omit_defaults=True):
    """A batch of frames, upscaled together: the contiguous range ``[start, end)``, or the frames
    ``listed`` (``"frames"`` in JSON) in processing order. ``Batch(id, frames)`` keeps a contiguous
    list as a range, so it is written ``{"id": 0, "start": 1, "end": 9}``."""

    KIND = _KIND

    id: Annotated[int, Meta(ge=0)]
    listed: Annotated[tuple[FrameIndex, ...], Meta(min_length=1, max_length=MAX_BATCH_FRAMES)] | None = (
        msgspec.field(default=None, name="frames")
    )
    start: FrameIndex | None = None
    end: Annotated[int, Meta(ge=0, le=MAX_FRAME_INDEX + 1)] | None = None

    def _check(self) -> None:
        if self.listed is not None:
            if self.start is not None or self.end is not None:
                raise self.fail("frames", "cannot be given with start and end")
            self.listed = tuple(self.listed)
            if not self.listed:
                raise self.fail("frames", "must not be empty")
            if len(set(self.listed)) != len(self.listed):
                raise self.fail("frames", "lists a frame twice")
            first, count = self.listed[0], len(self.listed)
            if self.listed == tuple(range(first, first + count)):
                self.listed, self.start, self.end = None, first, first + count
            return
        if self.start is None or self.end is None:
            raise self.fail("start" if self.start is None else "end", "is missing (or give frames)")
        if self.end <= self.start:
            raise self.fail("end", f"must be greater than start ({self.start}), not {self.end}")
        if self.end - self.start > MAX_BATCH_FRAMES:
            raise self.fail(
                "end",
                f"makes a batch of {self.end - self.start} frames; a batch holds at most {MAX_BATCH_FRAMES}",
            )

    @classmethod
    def range(cls, batch_id: int, start: int, end: int) -> Batch:
        """The contiguous batch of frames ``start, start + 1, ..., end - 1``."""
        return cls(batch_id, start=start, end=end)

    @property
    def frames(self) -> tuple[int, ...]:
        """The batch's frame indices, in processing order."""
        if self.listed is not None:
            return self.listed
        assert self.start is not None and self.end is not None  # _check made it a range
        return tuple(range(self.start, self.end))

    @property
    def is_contiguous(self) -> bool:
        return self.listed is None

    def __len__(self) -> int:
        if self.listed is not None:
            return len(self.listed)
        assert self.start is not None and self.end is not None
        return self.end - self.start


class Manifest(Document, kw_only=True):
    """One worker's share of a job; ``status_file`` defaults to ``status/<manifest_id>.json``."""

    KIND = _KIND
    FORMAT = MANIFEST_FORMAT
    OMIT_DEFAULT = frozenset({"bit_depth", "yuv", "segment"})

    job_id: Text  # a safe name (manifests.layout.is_safe_name)
    manifest_id: Text  # a safe name
    worker_id: Text
    model: Text
    scale: Scale | None = None
    tile: Tile | None = None
    tile_pad: TilePad | None = None
    frame_format: FrameFormat = FrameFormat.PNG
    png_compression: Annotated[int, Meta(ge=0, le=9)] = DEFAULT_PNG_COMPRESSION
    bit_depth: int = 8  # one of BIT_DEPTHS
    yuv: YuvSpec | None = None
    input_dir: Text = "input"
    output_dir: Text = "output"
    status_file: Text = ""
    batches: Annotated[tuple[Batch, ...], Meta(min_length=1, max_length=MAX_MANIFEST_BATCHES)]
    #: The segment transport's range (:mod:`manifests.segment`); None: the frames transport.
    segment: SegmentWork | None = None

    def _check(self) -> None:
        self.frame_format = FrameFormat(self.frame_format)
        self.batches = tuple(self.batches)
        if not self.status_file:
            self.status_file = f"status/{self.manifest_id}.json"
        for name in ("job_id", "manifest_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not is_safe_name(value):
                raise self.fail(
                    name, f"must be a safe name (letters, digits, '.', '_', '-'; at most 128), not {value!r}"
                )
        for name in ("input_dir", "output_dir", "status_file"):
            if "\x00" in getattr(self, name):
                raise self.fail(name, "must not contain a NUL character")
        if self.bit_depth not in BIT_DEPTHS:
            raise self.fail("bit_depth", f"must be 8 or 16, not {self.bit_depth!r}")
        if self.frame_format not in frame_formats_for_depth(self.bit_depth):
            raise self.fail(
                "frame_format", f"must be npy or yuv for 16-bit frames, not {self.frame_format.value}"
            )
        if (self.frame_format is FrameFormat.YUV) != (self.yuv is not None):
            raise self.fail(
                "yuv", "must be given exactly when frame_format is yuv (the conversion the worker applies)"
            )
        if self.yuv is not None and self.yuv.sample_bits != self.bit_depth:
            raise self.fail(
                "yuv", f"holds {self.yuv.bits}-bit samples, which a {self.bit_depth}-bit frame cannot"
            )
        self._check_batches()
        if self.segment is not None:
            self._check_segment(self.segment)

    def _check_segment(self, segment: SegmentWork) -> None:
        """A segment manifest hands decoded frames to the model as ``yuv`` or ``npy`` frames (no PNG
        files are involved), and its batches are the range's frames, in order, each once."""
        if not isinstance(segment, SegmentWork):  # built in code: the declaration is checked after
            raise self.fail("segment", f"must be a SegmentWork, not {type(segment).__name__}")
        if self.frame_format not in (FrameFormat.YUV, FrameFormat.NPY):
            raise self.fail(
                "frame_format", f"must be yuv or npy for a segment job, not {self.frame_format.value}"
            )
        covered = [frame for batch in self.batches for frame in batch.frames]
        if covered != list(segment.frames):
            raise self.fail(
                "batches",
                f"must cover the segment's frames {segment.first_frame}-{segment.last_frame} exactly, "
                "in order, each once",
            )

    def _check_batches(self) -> None:
        """Frame counts first (without expanding a range), then ids and frames given once."""
        if sum(len(batch) for batch in self.batches) > MAX_MANIFEST_FRAMES:
            raise self.fail(
                "batches", f"hold more than {MAX_MANIFEST_FRAMES} frames, the most a manifest may hold"
            )
        ids: set[int] = set()
        spans: list[tuple[int, int, int]] = []  # [first, end) of frames, batch index
        for i, batch in enumerate(self.batches):
            if batch.id in ids:
                raise self.fail(f"batches[{i}].id", f"repeats batch id {batch.id}")
            ids.add(batch.id)
            if batch.listed is None:
                assert batch.start is not None and batch.end is not None
                spans.append((batch.start, batch.end, i))
            else:
                spans.extend((frame, frame + 1, i) for frame in batch.listed)
        spans.sort()
        reach, holder = -1, -1  # the end of the frames seen so far, and the batch reaching it
        for first, end, i in spans:
            if first < reach:  # the lowest frame given twice
                raise self.fail(
                    f"batches[{max(i, holder)}]", f"repeats frame {first}, already in an earlier batch"
                )
            if end > reach:
                reach, holder = end, i

    @property
    def frame_count(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def with_batches(self, manifest_id: str, worker_id: str, batches: Sequence[Batch]) -> Manifest:
        """The same job settings for other batches (for re-dealing); gets its own status file."""
        return msgspec.structs.replace(
            self, manifest_id=manifest_id, worker_id=worker_id, batches=tuple(batches), status_file=""
        )


def job_frame_count(job_file: bytes) -> int | None:
    """The frame count a job file (``job.json``) records, or None when it records none it can give."""
    try:
        document = orjson.loads(job_file)
    except orjson.JSONDecodeError:
        return None
    frames = document.get("frames") if isinstance(document, dict) else None
    return frames if isinstance(frames, int) and not isinstance(frames, bool) and frames >= 0 else None


def check_frames_within_job(
    manifest: Manifest, frame_count: int, *, source: str | Path | None = None
) -> None:
    """Refuse (:class:`DocumentError`) a manifest naming a frame that a job of ``frame_count`` frames,
    numbered from :data:`~manifests.layout.DEFAULT_FIRST_FRAME`, does not have."""
    first, last = DEFAULT_FIRST_FRAME, DEFAULT_FIRST_FRAME + frame_count - 1
    for i, batch in enumerate(manifest.batches):
        low, high = min(batch.frames), max(batch.frames)
        if low < first or high > last:
            wrong = high if high > last else low
            raise DocumentError(
                _KIND,
                f"names frame {wrong}, but job {manifest.job_id} has {frame_count} frame(s), "
                f"{first} to {last} (its job.json)",
                source=source,
                field=f"batches[{i}]",
            )


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file.

    Raises ``OSError`` if it cannot be read, :class:`DocumentError` if it is not valid.
    """
    source = Path(path)
    return Manifest.from_json(source.read_bytes(), source=source)
