"""The shared-storage protocol: formats, validation, atomic writes, planning, progress."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests import (
    Batch,
    BatchError,
    DocumentError,
    FormatVersionError,
    FrameFormat,
    JobLayout,
    Manifest,
    PathOutsideRootError,
    PlanningError,
    Status,
    WorkerIdentity,
    WorkerState,
    frame_filename,
    leftover_batches,
    plan_batches,
    progress,
    read_manifest,
    read_status,
    redeal,
    resolve_within,
    write_json_atomic,
    write_status_atomic,
)
from manifests.colour import YUV_MATRICES, YuvSpec
from manifests.dedup import DEDUP_LEVELS, DuplicateMap
from manifests.health import Health
from manifests.jobrecord import JobRecord, SegmentsRecord
from manifests.manifest import check_frames_within_job, job_frame_count

IDENTITY = WorkerIdentity("host-a:8090", "host-a", 4242, "0", "NVIDIA H100")


def manifest(**changes: Any) -> Manifest:
    values: dict[str, Any] = {
        "job_id": "job-1",
        "manifest_id": "w0",
        "worker_id": "host-a:8090",
        "model": "realesr-animevideov3",
        "batches": (Batch.range(0, 1, 9), Batch(2, (17, 19, 18))),
    }
    return Manifest(**{**values, **changes})


def manifest_doc(**changes: Any) -> dict[str, Any]:
    document = manifest().to_dict()
    document.update(changes)
    return {key: value for key, value in document.items() if value is not ...}


# -- manifests ------------------------------------------------------------------------------------


def test_manifest_json_uses_ranges_for_contiguous_batches() -> None:
    document = json.loads(manifest(scale=2.0).to_json())
    assert document["format"] == "esrfarm.manifest/1"
    assert document["batches"] == [{"id": 0, "start": 1, "end": 9}, {"id": 2, "frames": [17, 19, 18]}]
    assert document["status_file"] == "status/w0.json"
    assert document["frame_format"] == "png" and document["png_compression"] == 1
    assert manifest().frame_count == 11


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "esrfarm.manifest/2"}, "has format 'esrfarm.manifest/2', but this esrfarm reads only"),
        ({"format": ...}, "has no 'format' field"),
        ({"job_id": "../etc"}, "field 'job_id' must be a safe name"),
        ({"job_id": ...}, "field 'job_id' is missing"),
        ({"model": ""}, "field 'model' must not be empty"),
        ({"input_dir": "in\x00put"}, "field 'input_dir' must not contain a NUL character"),
        ({"scale": 0}, "field 'scale' must be at least 0.0625, not 0"),
        ({"scale": "2"}, "field 'scale' must be a number or null, not '2'"),
        ({"tile": -1}, "field 'tile' must be at least 0"),
        ({"png_compression": 10}, "field 'png_compression' must be at most 9"),
        ({"frame_format": "jpg"}, "field 'frame_format' must be one of png, npy, yuv"),
        ({"frame_format": "yuv"}, "field 'yuv' must be given exactly when frame_format is yuv"),
        ({"yuv": {"matrix": "bt709", "range": "tv", "bits": 8}}, "field 'yuv' must be given exactly when"),
        (
            {"frame_format": "yuv", "yuv": {"matrix": "bt999", "range": "tv", "bits": 8}},
            "field 'yuv.matrix' must be one of bt709",
        ),
        (
            {"frame_format": "yuv", "yuv": {"matrix": "bt709", "range": "full", "bits": 8}},
            "field 'yuv.range' must be tv or pc, not 'full'",
        ),
        (
            {"frame_format": "yuv", "yuv": {"matrix": "bt709", "range": "tv", "bits": 10}},
            "field 'yuv' holds 10-bit samples, which a 8-bit frame cannot",
        ),
        (
            {"frame_format": "yuv", "yuv": {"matrix": "bt709", "range": "tv", "bits": 8, "x": 1}},
            "unknown field(s) in 'yuv': x",
        ),
        ({"batches": []}, "field 'batches' must not be empty"),
        (
            {"batches": [{"id": 0, "start": 5, "end": 5}]},
            "field 'batches[0].end' must be greater than start (5)",
        ),
        (
            {"batches": [{"id": 0, "start": 1, "end": 3}, {"id": 0, "frames": [7]}]},
            "'batches[1].id' repeats batch id 0",
        ),
        (
            {"batches": [{"id": 0, "start": 1, "end": 3}, {"id": 1, "frames": [2]}]},
            "'batches[1]' repeats frame 2",
        ),
        ({"batches": [{"id": 0, "frames": [1, 1]}]}, "'batches[0].frames' lists a frame twice"),
        (
            {"batches": [{"id": 0, "frames": [True]}]},
            "field 'batches[0].frames[0]' must be an integer, not True",
        ),
        ({"batches": [{"id": 0, "start": 1, "end": 3, "step": 2}]}, "unknown field(s) in 'batches[0]': step"),
        ({"extra": 1}, "unknown field(s): extra"),
        # what a manifest may ask is bounded, checked before any range is expanded
        ({"batches": [{"id": 0, "start": 0, "end": 10**9}]}, "must be at most 100000000, not 1000000000"),
        (
            {"batches": [{"id": 0, "start": 1, "end": 4098}]},
            "makes a batch of 4097 frames; a batch holds at most",
        ),
        (
            {"batches": [{"id": 0, "frames": list(range(4097))}]},
            "field 'batches[0].frames' holds 4097 items; at most 4096 are allowed",
        ),
        (
            {"batches": [{"id": 0, "frames": [10**8]}]},
            "field 'batches[0].frames[0]' must be at most 99999999, not 100000000",
        ),
        (
            {"batches": [{"id": i, "frames": [i]} for i in range(65_537)]},
            "field 'batches' holds 65537 items; at most 65536 are allowed",
        ),
        (
            {"batches": [{"id": i, "start": 4096 * i, "end": 4096 * (i + 1)} for i in range(257)]},
            "hold more than 1048576 frames",
        ),
        ({"scale": 16.5}, "field 'scale' must be at most 16.0, not 16.5"),
        ({"scale": 0.05}, "field 'scale' must be at least 0.0625, not 0.05"),
        ({"scale": 1e308}, "field 'scale' must be at most 16.0, not 1e+308"),
        ({"tile": 65_537}, "field 'tile' must be at most 65536"),
        ({"tile_pad": 1025}, "field 'tile_pad' must be at most 1024"),
        ({"model": "m" * 4097}, "field 'model' is 4097 characters long; at most 4096"),
    ],
)
def test_invalid_manifests_are_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    data = json.dumps(manifest_doc(**changes)).encode()
    with pytest.raises(DocumentError) as info:
        Manifest.from_json(data, source="jobs/job-1/manifests/w0.json")
    assert message in str(info.value)
    assert str(info.value).startswith("manifest jobs/job-1/manifests/w0.json")


def test_wrong_version_is_a_format_version_error() -> None:
    with pytest.raises(FormatVersionError) as info:
        Manifest.from_json(json.dumps(manifest_doc(format="esrfarm.manifest/0")))
    assert info.value.found == "esrfarm.manifest/0"


@pytest.mark.parametrize("text", [b"", b"{", b"[1, 2]", b'"manifest"', b"\xff"])
def test_non_json_or_non_object_is_refused(text: bytes) -> None:
    with pytest.raises(DocumentError, match=r"not valid JSON|must be a JSON object"):
        Manifest.from_json(text)


def test_manifests_built_in_code_are_validated_too() -> None:
    with pytest.raises(DocumentError, match="job_id"):
        manifest(job_id="a/b")
    with pytest.raises(DocumentError, match=r"field 'end' must be greater than start \(4\), not 4"):
        Batch.range(0, 4, 4)
    with pytest.raises(DocumentError, match="makes a batch of 5000 frames; a batch holds at most 4096"):
        manifest(batches=(Batch.range(0, 1, 5001),))
    # limits declared on the fields hold for records built in code, naming the field
    with pytest.raises(DocumentError, match=r"field 'scale' must be at most 16.0, not 32.0"):
        manifest(scale=32.0)
    with pytest.raises(DocumentError, match=r"field 'frames\[0\]' must be at most 99999999"):
        manifest(batches=(Batch(0, (10**8, 1)),))
    with pytest.raises(DocumentError, match=r"field 'png_compression' must be at most 9, not 10"):
        manifest(png_compression=10)


def test_a_manifest_is_checked_against_the_jobs_frame_count() -> None:
    m = manifest(batches=(Batch.range(0, 1, 9), Batch.range(1, 9, 13)))
    check_frames_within_job(m, 12)
    with pytest.raises(DocumentError) as info:
        check_frames_within_job(m, 11, source="m.json")
    assert str(info.value) == (
        "manifest m.json: field 'batches[1]' names frame 12, "
        "but job job-1 has 11 frame(s), 1 to 11 (its job.json)"
    )
    with pytest.raises(DocumentError, match="names frame 0"):
        check_frames_within_job(manifest(batches=(Batch(0, (0, 1)),)), 100)


@pytest.mark.parametrize(
    ("document", "frames"),
    [
        (b'{"format": "esrfarm.job/1", "frames": 120}', 120),
        (b'{"frames": 0}', 0),
        (b'{"frames": -1}', None),
        (b'{"frames": true}', None),
        (b'{"frames": "12"}', None),
        (b"[12]", None),
        (b"not json", None),
    ],
)
def test_the_frame_count_of_a_job_file(document: bytes, frames: int | None) -> None:
    assert job_frame_count(document) == frames


def test_read_manifest_round_trips_through_an_atomic_write(tmp_path: Path) -> None:
    original = manifest(frame_format=FrameFormat.NPY, tile=256, tile_pad=16, scale=2.0)
    path = tmp_path / "w0.json"
    write_json_atomic(path, original.to_json())
    assert read_manifest(path) == original
    assert os.listdir(tmp_path) == ["w0.json"]  # no temporary file left behind


def test_with_batches_keeps_the_job_settings() -> None:
    original = manifest(scale=3.0, png_compression=0)
    moved = original.with_batches("w1-r1", "host-b:8090", (Batch.range(5, 41, 49),))
    assert (moved.scale, moved.png_compression, moved.model) == (3.0, 0, original.model)
    assert moved.status_file == "status/w1-r1.json"


frame_lists = st.lists(st.integers(0, 10_000), min_size=1, max_size=12, unique=True)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
        lambda s: s not in {".", ".."}
    )
    pool = draw(st.lists(frame_lists, min_size=1, max_size=6))
    seen: set[int] = set()
    batches = []
    for batch_id, frames in enumerate(pool):
        fresh = tuple(frame for frame in frames if frame not in seen)
        if fresh:
            seen.update(fresh)
            batches.append(Batch(batch_id * 3, fresh))
    if not batches:
        batches = [Batch(0, (0,))]
    frame_format = draw(st.sampled_from(FrameFormat))
    yuv = None
    if frame_format is FrameFormat.YUV:
        yuv = YuvSpec(draw(st.sampled_from(sorted(YUV_MATRICES))), draw(st.sampled_from(["tv", "pc"])), 8)
    return Manifest(
        job_id=draw(names),
        manifest_id=draw(names),
        worker_id=draw(st.text(min_size=1, max_size=20)),
        model=draw(st.text(min_size=1, max_size=30)),
        batches=tuple(batches),
        scale=draw(st.none() | st.floats(0.1, 16, allow_nan=False)),
        tile=draw(st.none() | st.integers(0, 4096)),
        tile_pad=draw(st.none() | st.integers(0, 64)),
        frame_format=frame_format,
        yuv=yuv,
        png_compression=draw(st.integers(0, 9)),
        input_dir=draw(st.sampled_from(["input", "frames/in", "in put"])),
        output_dir=draw(st.sampled_from(["output", "out"])),
    )


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_manifest_round_trip(original: Manifest) -> None:
    assert Manifest.from_json(original.to_json()) == original


# -- status files ---------------------------------------------------------------------------------


def status(**changes: Any) -> Status:
    values: dict[str, Any] = {
        "state": WorkerState.PROCESSING,
        "worker": IDENTITY,
        "updated_at": 110.0,
        "job_id": "job-1",
        "manifest_id": "w0",
        "batches_total": 4,
        "done_batches": (0, 2),
        "current_batch": 3,
        "frames_total": 32,
        "frames_done": 16,
        "errors": (BatchError(1, 12, "input frame input/00000012.png is missing"),),
        "started_at": 100.0,
    }
    return Status(**{**values, **changes})


def test_status_round_trip_through_file(tmp_path: Path) -> None:
    original = status()
    write_status_atomic(tmp_path / "w0.json", original)
    loaded = read_status(tmp_path / "w0.json")
    assert loaded == original
    assert loaded.batches_done == 2 and loaded.failed_batches == (1,)
    assert json.loads((tmp_path / "w0.json").read_bytes())["batches_done"] == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"state": WorkerState.COMPLETED}, "is completed, but not every batch is done"),
        ({"done_batches": (0, 0)}, "lists a batch twice"),
        ({"done_batches": (0, 1)}, "names batch 1, which done_batches also lists"),
        ({"frames_done": 33}, "more than frames_total"),
        ({"job_id": None}, "must be set when the state is processing"),
        ({"batches_total": 1}, "more than batches_total"),
    ],
)
def test_inconsistent_status_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        status(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "esrfarm.status/9"}, "reads only 'esrfarm.status/1'"),
        ({"state": "running"}, "field 'state' must be one of idle, processing"),
        ({"batches_done": 5}, "field 'batches_done' is 5 but done_batches lists 2"),
        ({"worker": {"host": "h", "pid": 1}}, "field 'worker.worker_id' is missing"),
        (
            {"errors": [{"batch_id": 1, "frame": "x", "reason": "r"}]},
            "field 'errors[0].frame' must be an integer",
        ),
        # limits declared on the fields
        ({"worker": {**IDENTITY.to_dict(), "pid": -1}}, "field 'worker.pid' must be at least 0, not -1"),
        ({"frames_total": -8}, "field 'frames_total' must be at least 0, not -8"),
        (
            {"errors": [{"batch_id": 1, "frame": None, "reason": ""}]},
            "field 'errors[0].reason' must not be empty",
        ),
        ({"worker": {**IDENTITY.to_dict(), "uid": 0}}, "has unknown field(s) in 'worker': uid"),
        ({"updated_at": None}, "field 'updated_at' must be a number, not None"),
    ],
)
def test_invalid_status_documents_are_refused(changes: dict[str, Any], message: str) -> None:
    document = status().to_dict()
    document.update(changes)
    with pytest.raises(DocumentError) as info:
        Status.from_json(json.dumps(document), source="status/w0.json")
    assert message in str(info.value)
    assert str(info.value).startswith("status status/w0.json")


def test_status_limits_hold_for_statuses_built_in_code() -> None:
    with pytest.raises(DocumentError, match=r"field 'frames_total' must be at least 0, not -1"):
        status(frames_done=-2, frames_total=-1)
    with pytest.raises(DocumentError, match=r"field 'current_batch' must be at least 0, not -3"):
        status().evolve(current_batch=-3)
    assert status().evolve(done_batches=(0, 2, 3)).batches_done == 3


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    target.write_text("old")
    write_json_atomic(target, b'{"new": true}\n')
    assert target.read_bytes() == b'{"new": true}\n'
    assert os.listdir(tmp_path) == ["status.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_json_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["status.json"]


# -- layout and paths -----------------------------------------------------------------------------


def test_layout_names_every_place_of_a_job(tmp_path: Path) -> None:
    layout = JobLayout(tmp_path, "clip-1")
    layout.create()
    assert layout.job_dir == tmp_path / "jobs" / "clip-1"
    assert layout.status_path("w0") == tmp_path / "jobs/clip-1/status/w0.json"
    assert sorted(os.listdir(layout.job_dir)) == ["input", "manifests", "output", "segments", "status"]
    assert frame_filename(1) == "00000001.png"
    assert frame_filename(123, FrameFormat.NPY) == "00000123.npy"
    with pytest.raises(ValueError, match="safe directory name"):
        JobLayout(tmp_path, "..")


def test_resolve_within_follows_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "jobs").mkdir(parents=True)
    outside.mkdir()
    (root / "jobs" / "escape").symlink_to(outside)
    (root / "jobs" / "inner").symlink_to(root / "jobs")
    assert resolve_within(root, root / "jobs" / "inner" / "x.json") == root.resolve() / "jobs" / "x.json"
    assert resolve_within(root, root / "not-yet" / "file") == root.resolve() / "not-yet" / "file"
    for bad in (
        root / "jobs" / "escape" / "m.json",
        root / ".." / "outside",
        Path("/etc/passwd"),
        tmp_path / "rootx",
    ):
        with pytest.raises(PathOutsideRootError, match="outside the shared root"):
            resolve_within(root, bad)


# -- planning -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "size", "workers", "expected"),
    [
        (20, 8, ["a", "b"], {"a": [(1, 9), (17, 21)], "b": [(9, 17)]}),
        (16, 8, ["a", "b", "c"], {"a": [(1, 9)], "b": [(9, 17)], "c": []}),
        (3, 1, ["a"], {"a": [(1, 2), (2, 3), (3, 4)]}),
        (0, 8, ["a"], {"a": []}),
    ],
)
def test_plan_batches_table(
    frames: int, size: int, workers: list[str], expected: dict[str, list[tuple[int, int]]]
) -> None:
    plan = plan_batches(frames, size, workers)
    got = {w: [(b.frames[0], b.frames[-1] + 1) for b in plan.for_worker(w)] for w in workers}
    assert got == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 0, ["a"]), "batch size"),
        ((10, 8, []), "no workers"),
        ((10, 8, ["a", "a"]), "distinct"),
        ((-1, 8, ["a"]), "frame count"),
    ],
)
def test_plan_batches_refuses_impossible_plans(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(PlanningError, match=message):
        plan_batches(*args)


@settings(max_examples=300, deadline=None)
@given(
    frame_count=st.integers(0, 2000),
    batch_size=st.integers(1, 64),
    workers=st.integers(1, 12),
    first_frame=st.integers(0, 3),
)
def test_planner_covers_every_frame_once_in_contiguous_balanced_batches(
    frame_count: int, batch_size: int, workers: int, first_frame: int
) -> None:
    worker_ids = [f"w{i}" for i in range(workers)]
    plan = plan_batches(frame_count, batch_size, worker_ids, first_frame=first_frame)
    # every frame in exactly one batch, batches contiguous and in order
    flat = [frame for batch in plan.batches for frame in batch.frames]
    assert flat == list(range(first_frame, first_frame + frame_count))
    assert all(batch.is_contiguous and 1 <= len(batch) <= batch_size for batch in plan.batches)
    assert [batch.id for batch in plan.batches] == list(range(len(plan.batches)))
    # the assignments partition the batches, each worker's in order
    dealt = sorted((b for bs in plan.assignments.values() for b in bs), key=lambda b: b.id)
    assert dealt == list(plan.batches)
    for batches in plan.assignments.values():
        assert [b.id for b in batches] == sorted(b.id for b in batches)
    # loads balanced to within one batch (in batches, and so in frames to within batch_size)
    counts = [len(plan.for_worker(w)) for w in worker_ids]
    assert max(counts) - min(counts) <= 1
    loads = [sum(len(b) for b in plan.for_worker(w)) for w in worker_ids]
    assert max(loads) - min(loads) <= batch_size


@settings(max_examples=200, deadline=None)
@given(
    batch_ids=st.lists(st.integers(0, 500), unique=True, max_size=60),
    alive=st.integers(1, 6),
    loads=st.lists(st.integers(0, 5), min_size=6, max_size=6),
)
def test_redeal_gives_every_leftover_batch_to_one_live_worker(
    batch_ids: list[int], alive: int, loads: list[int]
) -> None:
    workers = [f"w{i}" for i in range(alive)]
    leftover = [Batch.range(i, i * 8, i * 8 + 8) for i in batch_ids]
    dealt = redeal(leftover, workers, loads=dict(zip(workers, loads, strict=False)))
    assert set(dealt) == set(workers)
    assert sorted(b.id for bs in dealt.values() for b in bs) == sorted(batch_ids)
    totals = [loads[i] + len(dealt[w]) for i, w in enumerate(workers)]
    receiving = [t for t, w in zip(totals, workers, strict=True) if dealt[w]]
    if receiving:  # whoever got work ends at most one batch above the least loaded worker
        assert max(receiving) - min(totals) <= 1


def test_redeal_without_loads_is_round_robin_and_needs_a_live_worker() -> None:
    leftover = [Batch.range(i, i, i + 1) for i in (7, 3, 5, 9, 11)]
    dealt = redeal(leftover, ["b", "c"])
    assert {w: [b.id for b in bs] for w, bs in dealt.items()} == {"b": [3, 7, 11], "c": [5, 9]}
    with pytest.raises(PlanningError, match="no workers"):
        redeal(leftover, [])


def test_leftover_batches_are_the_ones_not_claimed() -> None:
    m = manifest(batches=tuple(Batch.range(i, i * 8, i * 8 + 8) for i in range(4)))
    s = status(batches_total=4, done_batches=(0, 2), errors=(BatchError(1, 9, "missing"),))
    assert [b.id for b in leftover_batches(m, s)] == [1, 3]
    assert leftover_batches(m, None) == m.batches
    with pytest.raises(PlanningError, match="does not belong"):
        leftover_batches(m, status(manifest_id="w9"))


# -- progress -------------------------------------------------------------------------------------


def test_progress_table() -> None:
    a = status(frames_total=40, frames_done=20, started_at=100.0)
    b = status(manifest_id="w1", frames_total=40, frames_done=10, started_at=105.0)
    p = progress([a, b], now=110.0)
    assert (p.done, p.total) == (30, 80)
    assert p.fps == pytest.approx(3.0)  # 30 frames in the 10 s since the earliest start
    assert p.eta_s == pytest.approx(50 / 3.0)
    assert p.fraction == pytest.approx(30 / 80)
    assert progress([a, b], now=110.0, total=60).eta_s == pytest.approx(10.0)


def test_progress_before_any_frame_and_after_the_last() -> None:
    fresh = status(frames_done=0, done_batches=(), errors=(), started_at=100.0)
    assert progress([fresh], now=120.0) == progress([fresh], now=500.0)
    assert progress([fresh], now=120.0).eta_s is None and progress([fresh], now=120.0).fps == 0.0
    done = status(
        state=WorkerState.COMPLETED, batches_total=2, done_batches=(0, 1), errors=(),
        frames_total=20, frames_done=20, started_at=100.0, finished_at=110.0,
    )  # fmt: skip
    later = progress([done], now=1000.0)  # the rate stops at the last finish, not at now
    assert (later.fps, later.eta_s) == (pytest.approx(2.0), 0.0)
    assert progress([], now=5.0).eta_s == 0.0


# -- resume records (job.json, segments.json, dedup.json) -----------------------------------------

RECORDS: list[Any] = [
    JobRecord(
        identity={"input_sha256": "ab", "model": {"name": "m"}},
        input="/v/in.mp4",
        output="/v/out.mp4",
        frames=240,
        runs=2,
        updated_at=1718000000.5,
    ),
    SegmentsRecord(chunk_frames=256, encode={"codec": "libx264", "crf": None, "extra_args": []}),
    DuplicateMap.of(8, 4, DEDUP_LEVELS["loose"], {3: 1, 2: 1, 8: 5}),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_resume_records_round_trip(record: Any) -> None:
    assert type(record).from_json(record.to_json()) == record


@pytest.mark.parametrize(
    ("record", "changes", "message"),
    [
        (RECORDS[0], {"frames": 0}, "job record j.json: field 'frames' must be at least 1, not 0"),
        (RECORDS[0], {"identity": []}, "job record j.json: field 'identity' must be an object, not []"),
        (RECORDS[0], {"input": ""}, "job record j.json: field 'input' must not be empty"),
        (RECORDS[0], {"format": "esrfarm.job/2"}, "has format 'esrfarm.job/2', but this esrfarm reads only"),
        (RECORDS[1], {"chunk_frames": -1}, "segments record j.json: field 'chunk_frames' must be at least 1"),
        (RECORDS[1], {"crf": 18}, "segments record j.json: has unknown field(s): crf"),
        (RECORDS[2], {"block": 0}, "duplicate map j.json: field 'block' must be at least 1, not 0"),
        (
            RECORDS[2],
            {"duplicates": [[2, 1, 0]]},
            "duplicate map j.json: field 'duplicates[0]' must hold 2 items, not [2, 1, 0]",
        ),
        (RECORDS[2], {"duplicates": [[2, 3]]}, "field 'duplicates' frame 2 cannot repeat frame 3"),
    ],
)
def test_invalid_resume_records_are_refused_naming_the_field(
    record: Any, changes: dict, message: str
) -> None:
    document = {**record.to_dict(), **changes}
    with pytest.raises(DocumentError) as info:
        type(record).from_json(json.dumps(document), source="j.json")
    assert message in str(info.value)


# -- a worker's /health answer ----------------------------------------------------------------------


def test_health_answers_of_other_releases_are_read_and_limits_hold() -> None:
    older = Health.from_dict({"state": "idle", "model": "m", "scale": 2})  # no backend: torch
    assert (older.backend, older.scale, older.storage_writable) == ("torch", 2.0, True)
    newer = Health.from_dict({"state": "idle", "model": "m", "queue_depth": 3})  # a field added later
    assert newer.model == "m"
    with pytest.raises(DocumentError) as info:
        Health.from_dict({"state": "idle", "tile": -1}, source="http://127.0.0.1:8090")
    assert str(info.value) == "health answer http://127.0.0.1:8090: field 'tile' must be at least 0, not -1"
    with pytest.raises(DocumentError, match=r"field 'gpu_memory\.total' must be an integer or null, not 'x'"):
        Health.from_dict({"state": "idle", "gpu_memory": {"used": 1, "total": "x"}})
    with pytest.raises(DocumentError, match="field 'state' is missing"):
        Health.from_dict({"model": "m"})
