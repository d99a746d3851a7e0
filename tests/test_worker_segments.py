"""The segment transport on a real worker process (127.0.0.1, the tiny seeded model on the CPU, real
ffmpeg on a generated clip with B-frames): a hand-written segment manifest for a range that starts
on a frame that is not a keyframe gives a segment whose frames are exactly what the frames design
(extract, upscale frame files, encode_segment) gives for that range; a stop leaves no segment; a
missing source fails the manifest, naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from manifests import Batch, FrameFormat, JobLayout, Manifest, Status, write_json_atomic
from manifests.colour import YuvSpec
from manifests.segment import SegmentEncode, SegmentWork
from media.encode import EncodeSettings
from media.extract import YUV_SOURCE_FORMATS, decode_frames, extract_frames
from media.probe import MediaInfo, probe
from media.segments import encode_segment, segment_is_complete
from tests import clips
from tests.workerutil import WorkerProcess

GOPS = ("-c:v", "libx264", "-preset", "ultrafast", "-bf", "3", "-g", "7", "-pix_fmt", "yuv420p")
HEVC_OPEN_GOPS = (
    "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
    "-x265-params", "log-level=error:keyint=8:min-keyint=8:bframes=3:open-gop=1:scenecut=0",
)  # fmt: skip
#: Frame 7 is not a keyframe: the last of the first GOP (H.264, keyframes at 1, 8, 15...), or, in the
#: open-GOP HEVC clip, a leading frame shown before the keyframe it is decoded after (frame 9).
FIRST, COUNT = 7, 11
#: The clips a range is checked on (each 30 frames; frame 7 is not a keyframe in any).
CLIPS = {
    "h264": lambda p: clips.video(p / "h264.mp4", frames=30, codec=GOPS),
    "hevc-open-gop": lambda p: clips.video(p / "hevc.mkv", frames=30, codec=HEVC_OPEN_GOPS),
    "vfr": lambda p: clips.vfr_video(p / "vfr.mp4", frames=30),
    "hdr10": lambda p: clips.hdr10_video(p / "hdr10.mp4", frames=30),
    "late-start": lambda p: clips.video(
        p / "late.ts", frames=30, codec=GOPS, extra=("-output_ts_offset", "1.5")
    ),
}

_jobs = iter(range(1_000_000))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MediaInfo]:
    directory = tmp_path_factory.mktemp("segment-clips")
    return {name: probe(make(directory)) for name, make in CLIPS.items()}


@pytest.fixture(scope="module")
def clip(sources: dict[str, MediaInfo]) -> MediaInfo:
    return sources["h264"]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> MediaInfo:
    """Long enough that ffmpeg's pipes cannot hold a range: its processes must live as long as it."""
    return probe(clips.video(tmp_path_factory.mktemp("segment-clips") / "long.mp4", frames=1500, codec=GOPS))


def new_job(shared_root: Path, source: Path) -> JobLayout:
    """A job directory holding a copy of ``source`` as input/source.mp4."""
    layout = JobLayout(shared_root, f"segjob-{next(_jobs)}")
    layout.create()
    shutil.copyfile(source, layout.input_dir / "source.mp4")
    (layout.job_dir / "segments").mkdir(exist_ok=True)
    return layout


def contiguous(first: int, count: int, size: int = 4) -> tuple[Batch, ...]:
    starts = range(first, first + count, size)
    return tuple(Batch.range(i, start, min(start + size, first + count)) for i, start in enumerate(starts))


def layout_options(info: MediaInfo, frame_format: FrameFormat) -> dict[str, object]:
    """The frame layout the coordinator would choose: 16-bit frames above 8 bits, YUV as decoded."""
    video = info.video
    options: dict[str, object] = {"frame_format": frame_format, "bit_depth": video.frame_bit_depth}
    if frame_format is FrameFormat.YUV:
        conversion = video.conversion
        options["yuv"] = YuvSpec(
            conversion.scale_matrix, conversion.range, YUV_SOURCE_FORMATS[video.pix_fmt or ""]
        )
    return options


def submit(worker: WorkerProcess, layout: JobLayout, manifest: Manifest) -> str:
    path = layout.manifest_path(manifest.manifest_id)
    write_json_atomic(path, manifest.to_json())
    response = worker.post("/process_manifest", {"manifest_path": str(path.relative_to(layout.shared_root))})
    assert response.status == 202, response.body
    return manifest.manifest_id


def segment_manifest(
    layout: JobLayout,
    info: MediaInfo,
    frame_format: FrameFormat,
    encode: SegmentEncode,
    *,
    first: int = FIRST,
    count: int = COUNT,
    source: str = "input/source.mp4",
    batch_size: int = 4,
    manifest_id: str = "r1",
) -> Manifest:
    """A segment manifest for frames ``first..`` of the job's ``source``, into segments/<id>.mp4."""
    file = f"segments/{manifest_id}.mp4"
    segment = SegmentWork(source=source, first_frame=first, count=count, file=file, encode=encode)
    return Manifest(
        job_id=layout.job_id, manifest_id=manifest_id, worker_id="test-worker", model="tiny-x4",
        batches=contiguous(first, count, batch_size), segment=segment, **layout_options(info, frame_format),  # type: ignore[arg-type]
    )  # fmt: skip


def frames_design_segment(
    worker: WorkerProcess,
    shared_root: Path,
    info: MediaInfo,
    frame_format: FrameFormat,
    settings: EncodeSettings,
) -> Path:
    """The same range the frames way: extract every frame, the worker upscales the range's frame
    files, encode_segment encodes them (one encoder thread, as the segment manifest asks)."""
    layout = new_job(shared_root, info.path)
    extract_frames(info, layout.input_dir, frame_format=frame_format)
    manifest = Manifest(
        job_id=layout.job_id, manifest_id="f1", worker_id="test-worker", model="tiny-x4",
        batches=contiguous(FIRST, COUNT), **layout_options(info, frame_format),  # type: ignore[arg-type]
    )  # fmt: skip
    final = worker.wait_final(submit(worker, layout, manifest), layout.job_id)
    assert final["state"] == "completed", final
    return encode_segment(
        info, layout.output_dir, FIRST, COUNT, layout.job_dir / "reference.mp4", settings=settings,
        frame_format=frame_format, encoder_threads=1,
    )  # fmt: skip


def timestamps(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sorted(float(p.pts * stream.time_base) for p in container.demux(stream) if p.size)


def source_timestamps(info: MediaInfo, first: int, count: int) -> list[float]:
    """The range's frame times in the source, from its first frame (where segments count from)."""
    video = info.video
    origin = video.frame_pts[0]
    times = [float((p - origin) * video.time_base) for p in video.frame_pts[first - 1 : first - 1 + count]]
    return pytest.approx(times, abs=1e-6)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", list(CLIPS))
def test_the_range_starts_inside_a_gop(sources: dict[str, MediaInfo], name: str) -> None:
    clip = sources[name]
    with av.open(str(clip.path)) as container:
        keyframes = {p.pts for p in container.demux(video=0) if p.size and p.is_keyframe}
    assert clip.video.frame_pts[FIRST - 1] not in keyframes


RGB = SegmentEncode(codec="ffv1", threads=1)  # npy frames (RGB), a lossless RGB segment
RGB16 = SegmentEncode(codec="ffv1", pix_fmt="gbrp16le", threads=1)  # uint16 npy frames
YUV8 = SegmentEncode(codec="ffv1", pix_fmt="yuv420p", threads=1)  # the source's own YUV, lossless
YUV10 = SegmentEncode(codec="ffv1", pix_fmt="yuv420p10le", threads=1)


@pytest.mark.parametrize(
    ("name", "frame_format", "encode"),
    [
        ("h264", FrameFormat.NPY, RGB),
        ("h264", FrameFormat.YUV, YUV8),
        ("hevc-open-gop", FrameFormat.YUV, YUV8),
        ("vfr", FrameFormat.NPY, RGB),
        ("hdr10", FrameFormat.NPY, RGB16),
        ("hdr10", FrameFormat.YUV, YUV10),
        ("late-start", FrameFormat.YUV, YUV8),
    ],
    ids=["h264-npy", "h264-yuv", "hevc-open-gop-yuv", "vfr-npy", "hdr10-npy", "hdr10-yuv", "late-start-yuv"],
)
def test_a_segment_holds_exactly_what_the_frames_design_gives(
    idle_worker: WorkerProcess,
    shared_root: Path,
    sources: dict[str, MediaInfo],
    name: str,
    frame_format: FrameFormat,
    encode: SegmentEncode,
) -> None:
    clip = sources[name]
    layout = new_job(shared_root, clip.path)
    manifest = segment_manifest(layout, clip, frame_format, encode)
    final = idle_worker.wait_final(submit(idle_worker, layout, manifest), layout.job_id)
    Status.from_dict(final)
    assert final["state"] == "completed", final
    assert final["done_batches"] == [batch.id for batch in manifest.batches]
    assert final["frames_done"] == COUNT
    segment = layout.job_dir / "segments" / "r1.mp4"
    assert sorted(p.name for p in segment.parent.iterdir()) == ["r1.mp4"]  # no temporary file left
    assert segment_is_complete(segment, COUNT)

    settings = EncodeSettings(codec=encode.codec, pix_fmt=encode.pix_fmt)
    reference = frames_design_segment(idle_worker, shared_root, clip, frame_format, settings)
    yuv = frame_format is FrameFormat.YUV
    got, expected = list(decode_frames(segment, yuv=yuv)), list(decode_frames(reference, yuv=yuv))
    assert len(got) == len(expected) == COUNT
    for offset, (a, b) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {FIRST + offset}")
    assert timestamps(segment) == timestamps(reference)
    assert timestamps(segment) == source_timestamps(clip, FIRST, COUNT)


def test_a_long_range_is_encoded_whole(
    idle_worker: WorkerProcess, shared_root: Path, long_clip: MediaInfo
) -> None:
    layout = new_job(shared_root, long_clip.path)
    encode = SegmentEncode(codec="libx264", preset="ultrafast")
    manifest = segment_manifest(
        layout, long_clip, FrameFormat.YUV, encode, first=103, count=400, batch_size=8
    )
    final = idle_worker.wait_final(submit(idle_worker, layout, manifest), layout.job_id, timeout=300)
    assert final["state"] == "completed", final
    segment = layout.job_dir / "segments" / "r1.mp4"
    assert segment_is_complete(segment, 400)
    assert timestamps(segment) == source_timestamps(long_clip, 103, 400)


def test_a_stop_mid_range_leaves_no_segment(
    idle_worker: WorkerProcess, shared_root: Path, long_clip: MediaInfo
) -> None:
    layout = new_job(shared_root, long_clip.path)
    encode = SegmentEncode(codec="libx264", preset="ultrafast")
    manifest = segment_manifest(layout, long_clip, FrameFormat.NPY, encode, first=5, count=1490, batch_size=2)
    submit(idle_worker, layout, manifest)
    segments = layout.job_dir / "segments"
    # Stop once the encoder writes its temporary file (ffmpeg opens it after probing ~5 MB of frames).
    idle_worker.wait_status(
        lambda s: (
            s["job_id"] == layout.job_id and s["batches_done"] >= 2 and any(segments.glob(".r1.mp4.*.part"))
        )
    )
    assert idle_worker.post("/reset").json()["cancelled"] is True
    final = idle_worker.wait_final("r1", layout.job_id)
    Status.from_dict(final)
    assert final["state"] == "cancelled", final
    assert 2 <= final["batches_done"] < len(manifest.batches)
    assert list(segments.iterdir()) == []  # neither the segment nor its temporary file


def test_a_missing_source_fails_the_manifest_naming_it(
    idle_worker: WorkerProcess, shared_root: Path, clip: MediaInfo
) -> None:
    layout = new_job(shared_root, clip.path)
    encode = SegmentEncode(codec="libx264", preset="ultrafast")
    manifest = segment_manifest(layout, clip, FrameFormat.NPY, encode, source="input/missing.mp4")
    final = idle_worker.wait_final(submit(idle_worker, layout, manifest), layout.job_id)
    Status.from_dict(final)
    assert final["state"] == "failed", final
    assert final["errors"][0]["reason"] == "the source input/missing.mp4 does not exist"
    assert final["errors"][0]["batch_id"] == 0 and final["done_batches"] == []
    assert len(final["errors"]) == 1  # the first failure ends a segment's run
    assert list((layout.job_dir / "segments").iterdir()) == []


def test_health_names_the_transports_and_bad_encoder_settings_are_refused(
    idle_worker: WorkerProcess, shared_root: Path, clip: MediaInfo
) -> None:
    assert idle_worker.get("/health").json()["transports"] == ["frames", "segments"]
    layout = new_job(shared_root, clip.path)
    manifest = segment_manifest(layout, clip, FrameFormat.NPY, SegmentEncode(codec="libx264", crf=60))
    path = layout.manifest_path(manifest.manifest_id)
    write_json_atomic(path, manifest.to_json())
    response = idle_worker.post("/process_manifest", {"manifest_path": str(path.relative_to(shared_root))})
    assert response.status == 400
    assert "field 'segment.encode': crf 60 is out of range for libx264 (0 to 51)" in response.json()["error"]
    # a segment is an MP4 file: a manifest cannot make the worker replace anything else
    other = Manifest.from_dict(
        {**manifest.to_dict(), "segment": {**manifest.to_dict()["segment"], "file": "job.json"}}
    )
    write_json_atomic(path, other.to_json())
    response = idle_worker.post("/process_manifest", {"manifest_path": str(path.relative_to(shared_root))})
    assert response.status == 400
    assert "field 'segment.file' must name a .mp4 file, not 'job.json'" in response.json()["error"]


def test_a_source_is_probed_once_per_job(
    idle_worker: WorkerProcess, shared_root: Path, clip: MediaInfo
) -> None:
    layout = new_job(shared_root, clip.path)
    encode = SegmentEncode(codec="libx264", preset="ultrafast")
    for manifest_id, first, count in (("r1", 1, 10), ("r2", 11, 20)):
        manifest = segment_manifest(
            layout, clip, FrameFormat.YUV, encode, first=first, count=count, manifest_id=manifest_id
        )
        final = idle_worker.wait_final(submit(idle_worker, layout, manifest), layout.job_id)
        assert final["state"] == "completed", final
    probes = idle_worker.log_path.read_text().count(f"probed input/source.mp4 of job {layout.job_id}:")
    assert probes == 1
    assert sorted(p.name for p in (layout.job_dir / "segments").iterdir()) == ["r1.mp4", "r2.mp4"]
