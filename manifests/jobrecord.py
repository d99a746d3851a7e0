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

from typing import Any

from manifests.records import Document, NonEmpty, Positive

JOB_FORMAT = "esrfarm.job/1"
SEGMENTS_FORMAT = "esrfarm.segments/1"


class JobRecord(Document, kw_only=True):
    KIND = "job record"
    FORMAT = JOB_FORMAT

    identity: dict[str, Any]  # what decides the upscaled frames (input hash, model, scale, ...)
    input: NonEmpty
    output: NonEmpty
    frames: Positive
    runs: Positive
    updated_at: float = 0.0


class SegmentsRecord(Document, kw_only=True):
    KIND = "segments record"
    FORMAT = SEGMENTS_FORMAT

    chunk_frames: Positive
    encode: dict[str, Any]  # the encoder settings, as plain JSON values
