"""The segment transport's manifest: a frames manifest with a ``segment`` record (manifests.segment)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from manifests import DocumentError, FrameFormat, Manifest
from manifests.colour import YuvSpec
from manifests.manifest import Batch
from manifests.segment import SegmentEncode, SegmentWork

SEGMENT = SegmentWork(
    source="input/source.mkv",
    first_frame=5,
    count=7,
    file="segments/r00001.mp4",
    encode=SegmentEncode(codec="libx265", crf=20, preset="medium", params=(("-x265-params", "aq-mode=3"),)),
)


def segment_manifest(**changes: Any) -> Manifest:
    values: dict[str, Any] = {
        "job_id": "job-1",
        "manifest_id": "r00001",
        "worker_id": "host-a:8090",
        "model": "realesr-animevideov3",
        "batches": (Batch.range(0, 5, 9), Batch.range(1, 9, 12)),
        "frame_format": FrameFormat.YUV,
        "yuv": YuvSpec("bt709", "tv", 8),
        "segment": SEGMENT,
    }
    return Manifest(**{**values, **changes})


def segment_doc(**changes: Any) -> dict[str, Any]:
    document = json.loads(segment_manifest().to_json())
    for name, value in changes.items():
        if name.startswith("segment."):
            document["segment"][name.removeprefix("segment.")] = value
        else:
            document[name] = value
    return document


def test_a_segment_manifest_round_trips_through_json() -> None:
    original = segment_manifest()
    document = json.loads(original.to_json())
    assert document["segment"] == {
        "source": "input/source.mkv",
        "first_frame": 5,
        "count": 7,
        "file": "segments/r00001.mp4",
        "encode": {
            "codec": "libx265", "crf": 20, "preset": "medium", "pix_fmt": None,
            "params": [["-x265-params", "aq-mode=3"]], "threads": None,
        },
    }  # fmt: skip
    parsed = Manifest.from_json(original.to_json())
    assert parsed == original
    assert parsed.segment is not None and parsed.segment.encode.extra_args == ("-x265-params", "aq-mode=3")


def test_a_frames_manifest_has_no_segment_field() -> None:
    frames = segment_manifest(segment=None, frame_format=FrameFormat.PNG, yuv=None)
    assert "segment" not in json.loads(frames.to_json())
    assert Manifest.from_json(frames.to_json()).segment is None
    assert Manifest.from_json(json.dumps(segment_doc(segment=None))).segment is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"segment.count": 0}, "field 'segment.count' must be at least 1, not 0"),
        ({"segment.first_frame": True}, "field 'segment.first_frame' must be an integer, not True"),
        ({"segment.source": "input/a\x00b.mkv"}, "field 'segment.source' must match"),
        ({"segment.file": ""}, "field 'segment.file' must not be empty"),
        ({"segment.extra": 1}, "has unknown field(s) in 'segment': extra"),
        ({"segment": [1]}, "field 'segment' must be an object or null, not [1]"),
        (
            {"segment.encode": {"codec": "libx264", "params": [["-vf", "scale=2"]]}},
            "field 'segment.encode' params: '-vf' is not one of -x264-params",
        ),
        (
            {"segment.encode": {"codec": "libx264", "params": [["-x264-params", "-i /etc/passwd"]]}},
            "field 'segment.encode.params[0][1]' must match",
        ),
        ({"segment.encode": {"codec": "lib x264"}}, "field 'segment.encode.codec' must match"),
        # the batches are the range, in order, each frame once
        ({"segment.count": 8}, "field 'batches' must cover the segment's frames 5-12 exactly"),
        ({"segment.first_frame": 4}, "field 'batches' must cover the segment's frames 4-10 exactly"),
        (
            {"batches": [{"id": 0, "start": 9, "end": 12}, {"id": 1, "start": 5, "end": 9}]},
            "field 'batches' must cover the segment's frames 5-11 exactly, in order",
        ),
        (
            {"batches": [{"id": 0, "start": 5, "end": 8}, {"id": 1, "start": 9, "end": 12}]},
            "field 'batches' must cover the segment's frames 5-11 exactly",
        ),
        ({"frame_format": "png", "yuv": None}, "field 'frame_format' must be yuv or npy for a segment job"),
    ],
)
def test_bad_segment_manifests_are_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    data = json.dumps(segment_doc(**changes)).encode()
    with pytest.raises(DocumentError) as info:
        Manifest.from_json(data, source="jobs/job-1/manifests/r00001.json")
    assert message in str(info.value)
    assert str(info.value).startswith("manifest jobs/job-1/manifests/r00001.json")


def test_an_npy_segment_manifest_is_valid_and_code_built_ones_are_checked_too() -> None:
    npy = segment_manifest(frame_format=FrameFormat.NPY, yuv=None)
    assert Manifest.from_json(npy.to_json()) == npy
    with pytest.raises(DocumentError, match="must cover the segment's frames 5-11"):
        segment_manifest(batches=(Batch.range(0, 5, 11),))
    with pytest.raises(DocumentError, match="must be a SegmentWork"):
        segment_manifest(segment={"source": "a"})


def test_the_segment_record_limits_are_the_structs() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**msgspec.to_builtins(SEGMENT), "count": 1 << 21}, SegmentWork)
    assert SEGMENT.frames == range(5, 12) and SEGMENT.last_frame == 11
