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

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import orjson

from manifests._fields import Fields, check_format, decode
from manifests.colour import YUV_MATRICES, YUV_RANGES, YuvSpec
from manifests.errors import DocumentError
from manifests.jsonio import dumps
from manifests.layout import (
    BIT_DEPTHS,
    DEFAULT_FIRST_FRAME,
    FRAME_DIGITS,
    FrameFormat,
    frame_formats_for_depth,
    is_safe_name,
)
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


@dataclass(frozen=True)
class Batch:
    """A batch of frames, upscaled together. ``frames`` are frame indices in processing order."""

    id: int
    frames: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.id < 0:
            raise ValueError(f"batch id must be >= 0, not {self.id}")
        if not self.frames:
            raise ValueError(f"batch {self.id} has no frames")
        if min(self.frames) < 0:
            raise ValueError(f"batch {self.id} has a negative frame index")
        if len(set(self.frames)) != len(self.frames):
            raise ValueError(f"batch {self.id} lists a frame twice")

    @classmethod
    def range(cls, batch_id: int, start: int, end: int) -> Batch:
        """The contiguous batch of frames ``start, start + 1, ..., end - 1``."""
        if end <= start:
            raise ValueError(f"batch {batch_id}: end ({end}) must be greater than start ({start})")
        return cls(batch_id, tuple(range(start, end)))

    @property
    def is_contiguous(self) -> bool:
        return self.frames == tuple(range(self.frames[0], self.frames[0] + len(self.frames)))

    def __len__(self) -> int:
        return len(self.frames)

    def to_dict(self) -> dict[str, Any]:
        if self.is_contiguous:
            return {"id": self.id, "start": self.frames[0], "end": self.frames[-1] + 1}
        return {"id": self.id, "frames": list(self.frames)}

    @classmethod
    def _from_fields(cls, f: Fields) -> Batch:
        batch_id = f.integer("id", minimum=0)
        if "frames" in f.data:
            f.reject_unknown({"id", "frames"})
            listed = f.data["frames"]
            if isinstance(listed, list) and len(listed) > MAX_BATCH_FRAMES:
                f.fail("frames", f"lists {len(listed)} frames; a batch holds at most {MAX_BATCH_FRAMES}")
            frames = f.int_list("frames")
            if not frames:
                f.fail("frames", "must not be empty")
            if max(frames) > MAX_FRAME_INDEX:
                f.fail("frames", f"names frame {max(frames)}; frame indices end at {MAX_FRAME_INDEX}")
            if len(set(frames)) != len(frames):
                f.fail("frames", "lists a frame twice")
            return cls(batch_id, frames)
        f.reject_unknown({"id", "start", "end"})
        start = f.integer("start", minimum=0, maximum=MAX_FRAME_INDEX)
        end = f.integer("end", maximum=MAX_FRAME_INDEX + 1)
        if end <= start:
            f.fail("end", f"must be greater than start ({start}), not {end}")
        if end - start > MAX_BATCH_FRAMES:
            f.fail("end", f"makes a batch of {end - start} frames; a batch holds at most {MAX_BATCH_FRAMES}")
        return cls.range(batch_id, start, end)


@dataclass(frozen=True)
class Manifest:
    """One worker's share of a job; ``status_file`` defaults to ``status/<manifest_id>.json``."""

    job_id: str
    manifest_id: str
    worker_id: str
    model: str
    batches: tuple[Batch, ...]
    scale: float | None = None
    tile: int | None = None
    tile_pad: int | None = None
    frame_format: FrameFormat = FrameFormat.PNG
    png_compression: int = DEFAULT_PNG_COMPRESSION
    bit_depth: int = 8
    yuv: YuvSpec | None = None
    input_dir: str = "input"
    output_dir: str = "output"
    status_file: str = field(default="")
    #: The segment transport's range (:mod:`manifests.segment`); None: the frames transport.
    segment: SegmentWork | None = None

    def __post_init__(self) -> None:
        # Manifests built in code get the same checks as manifests read from disk.
        object.__setattr__(self, "batches", tuple(self.batches))
        object.__setattr__(self, "frame_format", FrameFormat(self.frame_format))
        if not self.status_file:
            object.__setattr__(self, "status_file", f"status/{self.manifest_id}.json")
        _validate(self, source=None)

    @property
    def frame_count(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def to_dict(self) -> dict[str, Any]:
        depth: dict[str, Any] = {} if self.bit_depth == 8 else {"bit_depth": self.bit_depth}
        if self.yuv is not None:
            depth["yuv"] = {"matrix": self.yuv.matrix, "range": self.yuv.range, "bits": self.yuv.bits}
        return {
            "format": MANIFEST_FORMAT,
            "job_id": self.job_id,
            "manifest_id": self.manifest_id,
            "worker_id": self.worker_id,
            "model": self.model,
            "scale": self.scale,
            "tile": self.tile,
            "tile_pad": self.tile_pad,
            "frame_format": self.frame_format.value,
            "png_compression": self.png_compression,
            **depth,
            "input_dir": self.input_dir,
            "output_dir": self.output_dir,
            "status_file": self.status_file,
            "batches": [batch.to_dict() for batch in self.batches],
            **({} if self.segment is None else {"segment": msgspec.to_builtins(self.segment)}),
        }

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str | Path | None = None) -> Manifest:
        """Parse and validate; raises :class:`DocumentError` (or its :class:`FormatVersionError`)."""
        return cls.from_dict(decode(_KIND, data, source), source=source)

    @classmethod
    def from_dict(cls, document: dict[str, Any], *, source: str | Path | None = None) -> Manifest:
        check_format(_KIND, document, MANIFEST_FORMAT, source)
        f = Fields(_KIND, document, source=source)
        f.reject_unknown(
            {
                "format", "job_id", "manifest_id", "worker_id", "model", "scale", "tile", "tile_pad",
                "frame_format", "png_compression", "bit_depth", "yuv", "input_dir", "output_dir",
                "status_file", "batches", "segment",
            }
        )  # fmt: skip
        frame_format = f.data.get("frame_format", FrameFormat.PNG.value)
        if frame_format not in {member.value for member in FrameFormat}:
            f.fail(
                "frame_format",
                f"must be one of {', '.join(m.value for m in FrameFormat)}, not {frame_format!r}",
            )
        png_compression = f.opt_integer("png_compression", minimum=0, maximum=9)
        bit_depth = f.opt_integer("bit_depth", minimum=8, maximum=16)
        scale = f.opt_number("scale", positive=True)
        if scale is not None and not MIN_SCALE <= scale <= MAX_SCALE:
            f.fail("scale", f"must be between {MIN_SCALE:g} and {MAX_SCALE:g}, not {scale:g}")
        manifest = object.__new__(cls)
        values = {
            "job_id": f.string("job_id"),
            "manifest_id": f.string("manifest_id"),
            "worker_id": f.string("worker_id"),
            "model": f.string("model"),
            "scale": scale,
            "tile": f.opt_integer("tile", minimum=0, maximum=MAX_TILE),
            "tile_pad": f.opt_integer("tile_pad", minimum=0, maximum=MAX_TILE_PAD),
            "frame_format": FrameFormat(frame_format),
            "png_compression": DEFAULT_PNG_COMPRESSION if png_compression is None else png_compression,
            "bit_depth": 8 if bit_depth is None else bit_depth,
            "yuv": _yuv(f) if f.data.get("yuv") is not None else None,
            "input_dir": f.string("input_dir"),
            "output_dir": f.string("output_dir"),
            "status_file": f.opt_string("status_file") or "",
            "batches": _batches(f),
            "segment": _segment(f),
        }
        if not values["status_file"]:
            values["status_file"] = f"status/{values['manifest_id']}.json"
        for name, value in values.items():
            object.__setattr__(manifest, name, value)
        _validate(manifest, source=source)
        return manifest

    def with_batches(self, manifest_id: str, worker_id: str, batches: Sequence[Batch]) -> Manifest:
        """The same job settings for other batches (for re-dealing); gets its own status file."""
        return replace(
            self, manifest_id=manifest_id, worker_id=worker_id, batches=tuple(batches), status_file=""
        )


def _yuv(f: Fields) -> YuvSpec:
    """The manifest's YUV conversion, each part checked against what a worker can apply."""
    spec = f.child("yuv")
    spec.reject_unknown({"matrix", "range", "bits"})
    matrix, range_ = spec.string("matrix"), spec.string("range")
    if matrix not in YUV_MATRICES:
        spec.fail("matrix", f"must be one of {', '.join(YUV_MATRICES)}, not {matrix!r}")
    if range_ not in YUV_RANGES:
        spec.fail("range", f"must be tv or pc, not {range_!r}")
    return YuvSpec(matrix, range_, spec.integer("bits", minimum=8, maximum=16))


def _batches(f: Fields) -> tuple[Batch, ...]:
    """The manifest's batches, refused as soon as they hold more than a manifest may."""
    listed = f.data.get("batches")
    if isinstance(listed, list) and len(listed) > MAX_MANIFEST_BATCHES:
        f.fail("batches", f"holds {len(listed)} batches; a manifest holds at most {MAX_MANIFEST_BATCHES}")
    batches, frames = [], 0
    for item in f.objects("batches"):
        batch = Batch._from_fields(item)
        frames += len(batch)
        if frames > MAX_MANIFEST_FRAMES:
            f.fail("batches", f"hold more than {MAX_MANIFEST_FRAMES} frames, the most a manifest may hold")
        batches.append(batch)
    return tuple(batches)


def _segment(f: Fields) -> SegmentWork | None:
    """The manifest's segment record (absent or null: a frames manifest), checked by its Struct."""
    document = f.data.get("segment")
    if document is None:
        return None
    try:
        return msgspec.convert(document, SegmentWork)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `$")
        problem = re.sub(r"^Expected ", "must be ", problem)
        problem = re.sub(r"^Object ", "", problem)
        f.fail("segment" + where.rstrip("`"), problem)


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


def _validate(manifest: Manifest, *, source: str | Path | None) -> None:
    def fail(name: str, problem: str) -> None:
        raise DocumentError(_KIND, problem, source=source, field=name)

    for name in ("job_id", "manifest_id"):
        value = getattr(manifest, name)
        if not isinstance(value, str) or not is_safe_name(value):
            fail(name, f"must be a safe name (letters, digits, '.', '_', '-'; at most 128), not {value!r}")
    for name in ("worker_id", "model", "input_dir", "output_dir", "status_file"):
        value = getattr(manifest, name)
        if not isinstance(value, str) or not value:
            fail(name, f"must be a non-empty string, not {value!r}")
        if len(value) > MAX_STRING:
            fail(name, f"is {len(value)} characters long; at most {MAX_STRING} are allowed")
        if name.endswith(("_dir", "_file")) and "\x00" in value:
            fail(name, "must not contain a NUL character")
    if manifest.scale is not None and not MIN_SCALE <= manifest.scale <= MAX_SCALE:
        fail("scale", f"must be between {MIN_SCALE:g} and {MAX_SCALE:g}, not {manifest.scale!r}")
    for name, most in (("tile", MAX_TILE), ("tile_pad", MAX_TILE_PAD)):
        value = getattr(manifest, name)
        if value is not None and (not isinstance(value, int) or not 0 <= value <= most):
            fail(name, f"must be an integer from 0 to {most} or null, not {value!r}")
    if not 0 <= manifest.png_compression <= 9:
        fail("png_compression", f"must be between 0 and 9, not {manifest.png_compression}")
    if manifest.bit_depth not in BIT_DEPTHS:
        fail("bit_depth", f"must be 8 or 16, not {manifest.bit_depth!r}")
    if manifest.frame_format not in frame_formats_for_depth(manifest.bit_depth):
        fail("frame_format", f"must be npy or yuv for 16-bit frames, not {manifest.frame_format.value}")
    if (manifest.frame_format is FrameFormat.YUV) != (manifest.yuv is not None):
        fail("yuv", "must be given exactly when frame_format is yuv (the conversion the worker applies)")
    if manifest.yuv is not None and manifest.yuv.sample_bits != manifest.bit_depth:
        fail("yuv", f"holds {manifest.yuv.bits}-bit samples, which a {manifest.bit_depth}-bit frame cannot")
    if not manifest.batches:
        fail("batches", "must hold at least one batch")
    if len(manifest.batches) > MAX_MANIFEST_BATCHES:
        fail(
            "batches",
            f"holds {len(manifest.batches)} batches; a manifest holds at most {MAX_MANIFEST_BATCHES}",
        )
    if manifest.frame_count > MAX_MANIFEST_FRAMES:
        fail("batches", f"hold {manifest.frame_count} frames; a manifest holds at most {MAX_MANIFEST_FRAMES}")
    ids: set[int] = set()
    frames: set[int] = set()
    for i, batch in enumerate(manifest.batches):
        if not isinstance(batch, Batch):
            fail(f"batches[{i}]", f"must be a Batch, not {type(batch).__name__}")
        if len(batch) > MAX_BATCH_FRAMES:
            fail(f"batches[{i}]", f"holds {len(batch)} frames; a batch holds at most {MAX_BATCH_FRAMES}")
        if max(batch.frames) > MAX_FRAME_INDEX:
            fail(f"batches[{i}]", f"names frame {max(batch.frames)}; frame indices end at {MAX_FRAME_INDEX}")
        if batch.id in ids:
            fail(f"batches[{i}].id", f"repeats batch id {batch.id}")
        ids.add(batch.id)
        overlap = frames.intersection(batch.frames)
        if overlap:
            fail(f"batches[{i}]", f"repeats frame {min(overlap)}, already in an earlier batch")
        frames.update(batch.frames)
    if manifest.segment is not None:
        _validate_segment(manifest, fail)


def _validate_segment(manifest: Manifest, fail: Callable[[str, str], None]) -> None:
    """A segment manifest hands decoded frames to the model as ``yuv`` or ``npy`` frames (no PNG files
    are involved), and its batches are the range's frames, in order, each once."""
    segment = manifest.segment
    if not isinstance(segment, SegmentWork):
        fail("segment", f"must be a SegmentWork, not {type(segment).__name__}")
        return
    if manifest.frame_format not in (FrameFormat.YUV, FrameFormat.NPY):
        fail("frame_format", f"must be yuv or npy for a segment job, not {manifest.frame_format.value}")
    covered = [frame for batch in manifest.batches for frame in batch.frames]
    if covered != list(segment.frames):
        fail(
            "batches",
            f"must cover the segment's frames {segment.first_frame}-{segment.last_frame} exactly, "
            "in order, each once",
        )
