"""The resume record of a job directory: ``job.json`` and ``segments/segments.json``.

``job.json`` says which job a directory holds (its identity: what decides the upscaled frames)
and how many runs it has seen; ``segments.json`` says how the segments on disk were cut and
encoded. A coordinator that finds them takes up the job; one that finds them different (or in an
unknown format) starts the directory, or the segments, afresh::

    {"format": "esrfarm.job/1", "identity": {"input_sha256": "...", "model": {"name": "..."},
     "scale": 2.0, "tile": null, "precision": null}, "input": "/abs/in.mp4",
     "output": "/abs/out.mp4", "frames": 240, "runs": 2, "updated_at": 1718000000.0}

    {"format": "esrfarm.segments/1", "chunk_frames": 256,
     "encode": {"codec": "libx264", "crf": null, "preset": null, "pix_fmt": null, "extra_args": []}}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests._fields import Fields, check_format, decode
from manifests.jsonio import dumps

JOB_FORMAT = "esrfarm.job/1"
SEGMENTS_FORMAT = "esrfarm.segments/1"


@dataclass(frozen=True)
class JobRecord:
    identity: dict[str, Any]
    input: str
    output: str
    frames: int
    runs: int
    updated_at: float

    def to_json(self) -> bytes:
        return dumps({"format": JOB_FORMAT, **self.__dict__})

    @classmethod
    def from_json(cls, data: bytes, *, source: str | Path | None = None) -> JobRecord:
        """Parse and validate; raises :class:`DocumentError` (or :class:`FormatVersionError`)."""
        document = decode("job record", data, source)
        check_format("job record", document, JOB_FORMAT, source)
        f = Fields("job record", document, source=source)
        f.reject_unknown({"format", "identity", "input", "output", "frames", "runs", "updated_at"})
        identity = f.data.get("identity")
        if not isinstance(identity, dict):
            f.fail("identity", "must be an object")
        updated_at = f.opt_number("updated_at")
        return cls(
            identity=identity,
            input=f.string("input"),
            output=f.string("output"),
            frames=f.integer("frames", minimum=1),
            runs=f.integer("runs", minimum=1),
            updated_at=0.0 if updated_at is None else updated_at,
        )


@dataclass(frozen=True)
class SegmentsRecord:
    chunk_frames: int
    encode: dict[str, Any]  # the encoder settings, as plain JSON values

    def to_json(self) -> bytes:
        return dumps({"format": SEGMENTS_FORMAT, "chunk_frames": self.chunk_frames, "encode": self.encode})

    @classmethod
    def from_json(cls, data: bytes, *, source: str | Path | None = None) -> SegmentsRecord:
        document = decode("segments record", data, source)
        check_format("segments record", document, SEGMENTS_FORMAT, source)
        f = Fields("segments record", document, source=source)
        f.reject_unknown({"format", "chunk_frames", "encode"})
        encode = f.data.get("encode")
        if not isinstance(encode, dict):
            f.fail("encode", "must be an object")
        return cls(chunk_frames=f.integer("chunk_frames", minimum=1), encode=encode)
