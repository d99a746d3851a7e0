"""``--dedup``: the duplicate map (pure), the detector on real clips decoded as a job decodes them,
and ``esrfarm upscale --dedup`` end to end with real worker processes (and a resume after SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from coordinator.dedup import DuplicateFinder, find_duplicates, frame_difference, job_duplicate_map
from coordinator.errors import JobError
from manifests.chunkbook import ChunkBook, ChunkStage
from manifests.chunks import plan_chunks
from manifests.dedup import (
    DEDUP_FILE,
    DEDUP_LEVELS,
    DedupLevel,
    DuplicateMap,
    chunk_sources,
    dedup_level,
    plan_unique_batches,
)
from manifests.errors import DocumentError
from media.extract import decode_frames
from media.probe import probe
from tests import clips
from tests.fakeworkers import fake_farm
from tests.test_images import picture
from tests.test_job_engine import farm as fake_farm_settings
from tests.test_job_engine import run, spec
from tests.test_upscale_e2e import esrfarm
from tests.videocheck import assert_faithful_upscale
from tests.workerutil import REPO, WorkerProcess

STRICT, LOOSE = DEDUP_LEVELS["strict"], DEDUP_LEVELS["loose"]

# -- the map and the batches it leaves (pure) --------------------------------------------------------


def _plan(frames: int, chunk_frames: int, batch_size: int = 2):  # type: ignore[no-untyped-def]
    return plan_chunks(
        frames,
        batch_size=batch_size,
        input_frame_bytes=1,
        output_frame_bytes=1,
        max_disk=1 << 30,
        max_chunk_frames=chunk_frames,
    )


def test_map_round_trips_and_names_each_frames_source() -> None:
    dedup = DuplicateMap.of(frames=8, chunk_frames=4, level=STRICT, duplicates={3: 1, 2: 1, 8: 5})
    assert DuplicateMap.from_json(dedup.to_json()) == dedup
    assert [dedup.source(f) for f in range(1, 9)] == [1, 1, 1, 4, 5, 6, 7, 5]
    assert dedup.upscaled_count == 5


def test_a_map_names_its_level_and_is_kept_only_for_that_level() -> None:
    loose = DuplicateMap.of(frames=8, chunk_frames=4, level=LOOSE, duplicates={2: 1})
    assert (loose.level, loose.threshold, loose.block) == ("loose", LOOSE.threshold, 16)
    assert DuplicateMap.from_json(loose.to_json()).level == "loose"
    assert loose.matches(8, 4, LOOSE) and not loose.matches(8, 4, STRICT)
    assert not loose.matches(8, 8, LOOSE) and not loose.matches(9, 4, LOOSE)
    # A map kept before levels existed reads as strict, and is kept while strict's threshold is its own.
    old = DuplicateMap.from_json(
        b'{"format": "esrfarm.dedup/1", "frames": 8, "chunk_frames": 4, "threshold": 3.0, "block": 16,'
        b' "duplicates": [[2, 1]]}'
    )
    assert old.level == "strict" and old.matches(8, 4, STRICT)
    assert not old.matches(8, 4, DedupLevel("strict", blur=1, threshold=2.5, shift_threshold=0.2))


def test_levels_are_named_and_an_unknown_one_is_refused_by_name() -> None:
    assert list(DEDUP_LEVELS) == ["strict", "loose"] and dedup_level("loose") is LOOSE
    with pytest.raises(ValueError, match="no --dedup-level 'lax': choose one of strict, loose"):
        dedup_level("lax")
    # The job identity of a strict job is what it was before levels (its job directory is kept).
    assert STRICT.identity() == {"block": 16, "threshold": 3.0}
    assert LOOSE.identity() == {
        "block": 16,
        "threshold": 4.0,
        "level": "loose",
        "blur": 2,
        "shift_threshold": 0.2,
    }


@pytest.mark.parametrize(
    ("duplicates", "problem"),
    [
        ({2: 2}, "cannot repeat frame 2"),
        ({2: 3}, "cannot repeat frame 3"),
        ({9: 1}, "cannot repeat frame 1"),
        ({3: 2, 2: 1}, "is itself a duplicate"),
        ({5: 4}, "of another chunk"),
    ],
)
def test_map_refuses_a_reference_that_is_not_an_earlier_upscaled_frame_of_the_chunk(
    duplicates: dict[int, int], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        DuplicateMap.of(frames=8, chunk_frames=4, level=STRICT, duplicates=duplicates)
    document = (
        b'{"format": "esrfarm.dedup/1", "frames": 8, "chunk_frames": 4, "threshold": 3.0, "block": 16,'
        b' "duplicates": [' + b", ".join(b"[%d, %d]" % pair for pair in duplicates.items()) + b"]}"
    )
    with pytest.raises(DocumentError, match=problem):
        DuplicateMap.from_json(document)


def test_batches_cover_the_upscaled_frames_chunk_by_chunk() -> None:
    plan = _plan(10, chunk_frames=4)
    dedup = DuplicateMap.of(frames=10, chunk_frames=4, level=STRICT, duplicates={2: 1, 3: 1, 7: 6, 10: 9})
    batches = plan_unique_batches(plan, dedup, batch_size=2)
    assert [b.frames for b in batches] == [(1, 4), (5, 6), (8,), (9,)]
    assert [b.id for b in batches] == [0, 1, 2, 3]
    assert chunk_sources(plan.chunks[0], dedup) == [1, 1, 1, 4]
    assert chunk_sources(plan.chunks[1], dedup) == [5, 6, 6, 8]
    assert [b.frames for b in plan_unique_batches(plan, None, 2)] == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]


def test_chunk_book_takes_held_frames_before_and_after_its_batches_are_handed_on() -> None:
    plan = _plan(8, chunk_frames=4)
    dedup = DuplicateMap.of(frames=8, chunk_frames=4, level=STRICT, duplicates={3: 2, 4: 2, 6: 5})
    batches = plan_unique_batches(plan, dedup, batch_size=2)
    book = ChunkBook(plan, batches, budget=None, held=dedup.duplicates.keys())
    book.admit(0)
    assert book.frame_extracted(1) == 0
    assert book.ready_batches(0) == []
    assert book.frame_extracted(2) == 0
    assert [b.frames for b, _ in book.ready_batches(0)] == [(1, 2)]
    assert book.stage(0) is ChunkStage.UPSCALING
    assert book.frame_extracted(3) is None  # held frames of a chunk that moved on
    assert book.frame_extracted(4) is None
    with pytest.raises(ValueError, match="do not cover"):
        ChunkBook(plan, batches, budget=None)  # without the held frames, the batches leave frames out


# -- the detector on real clips, decoded as a job decodes them (YUV 4:2:0) ---------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dedup-clips")


@pytest.fixture(scope="module")
def moving(clip_dir: Path) -> Path:
    return clips.video(clip_dir / "moving.mp4", size="256x144", frames=24)


@pytest.fixture(scope="module")
def still(clip_dir: Path) -> Path:
    return clips.still_image(clip_dir / "still.png")


def _references(path: Path, *, yuv: bool = True, level: DedupLevel = STRICT) -> list[int | None]:
    """Each frame's reference, on the frames as a job with YUV (or RGB: npy, png) frames decodes them."""
    finder = DuplicateFinder(yuv=yuv, level=level)
    return [finder.reference_of(i, frame) for i, frame in enumerate(decode_frames(probe(path), yuv=yuv), 1)]


@pytest.mark.parametrize(
    ("hold", "crf", "level", "most_upscaled"),
    [
        (2, 18, STRICT, 0.6),
        (3, 18, STRICT, 0.45),
        (2, 28, STRICT, 0.75),
        (3, 18, LOOSE, 0.34),
        (3, 28, LOOSE, 0.4),  # strict: 0.58 (test_loose_catches_the_repeats_that_heavy_compression_...)
    ],
    ids=lambda value: value.name if isinstance(value, DedupLevel) else None,
)
def test_held_frames_repeat_the_frame_their_hold_began_with(
    clip_dir: Path, moving: Path, hold: int, crf: int, level: DedupLevel, most_upscaled: float
) -> None:
    clip = clips.held_video(clip_dir / f"held{hold}-{crf}.mp4", moving, hold=hold, frames=24, crf=crf)
    references = _references(clip, level=level)
    for frame, reference in enumerate(references, start=1):
        if reference is not None:  # never a neighbour of another drawing (an off-by-one)
            assert (reference - 1) // hold == (frame - 1) // hold, (frame, reference)
        if (frame - 1) % hold == 0:
            assert reference is None, f"frame {frame} starts a new drawing but was called a repeat"
    upscaled = sum(r is None for r in references) / len(references)
    assert upscaled <= most_upscaled, references


LEVELS = pytest.mark.parametrize("level", [STRICT, LOOSE], ids=["strict", "loose"])


@LEVELS
@pytest.mark.parametrize("yuv", [True, False], ids=["yuv", "rgb"])
@pytest.mark.parametrize("kind", ["pan", "fade"])
def test_a_slow_pan_or_fade_never_reuses_a_frame(
    clip_dir: Path, still: Path, kind: str, yuv: bool, level: DedupLevel
) -> None:
    # A fade over 96 frames moves the picture by about 1 level a frame: only the mean shift sees it.
    make, frames = (clips.pan_video, 24) if kind == "pan" else (clips.fade_video, 96)
    clip = clip_dir / f"{kind}.mp4"
    if not clip.exists():
        make(clip, still, frames=frames)
    assert _references(clip, yuv=yuv, level=level) == [None] * frames


@LEVELS
@pytest.mark.parametrize("yuv", [True, False], ids=["yuv", "rgb"])
def test_a_slow_fade_of_a_dark_blue_picture_never_reuses_a_frame(
    clip_dir: Path, still: Path, yuv: bool, level: DedupLevel
) -> None:
    """Luma hardly moves (a tenth of a level a frame): the chroma's shift must be seen."""
    blue, clip = clip_dir / "blue.png", clip_dir / "blue-fade.mp4"
    if not clip.exists():
        clips.ffmpeg(["-i", str(still), "-vf", "colorchannelmixer=rr=0.05:gg=0.3", str(blue)])
        clips.fade_video(clip, blue, frames=96)
    assert _references(clip, yuv=yuv, level=level) == [None] * 96


@LEVELS
@pytest.mark.parametrize(("square", "opacity"), [(16, 0.3), (8, 0.3), (16, 0.1)])
def test_a_small_change_is_never_called_a_repeat(
    clip_dir: Path, still: Path, square: int, opacity: float, level: DedupLevel
) -> None:
    clip = clip_dir / f"square{square}-{opacity}.mp4"
    if not clip.exists():
        clips.small_change_video(clip, still, frames=24, square=square, opacity=opacity)
    references = _references(clip, level=level)
    # The box shows in frames 5-8, 13-16, 21-24: each group of four is one picture, repeated.
    assert references == [None if (f - 1) % 4 == 0 else (f - 1) // 4 * 4 + 1 for f in range(1, 25)]


def test_loose_catches_the_repeats_that_heavy_compression_leaves_and_strict_upscales_again(
    clip_dir: Path, moving: Path
) -> None:
    clip = clips.held_video(clip_dir / "held3-28.mp4", moving, hold=3, frames=24, crf=28)
    strict, loose = _references(clip, level=STRICT), _references(clip, level=LOOSE)
    assert {f for f, r in enumerate(loose, 1) if r is not None} > {
        f for f, r in enumerate(strict, 1) if r is not None
    }
    assert sum(r is None for r in strict) / 24 > 0.5, strict


def test_loose_cannot_see_a_change_as_faint_as_three_levels_over_a_16x16_area() -> None:
    """What README says loose cannot see, and strict can: a 16x16 area 3.5 levels brighter."""
    plane = np.random.default_rng(0).integers(60, 200, size=(128, 128), dtype=np.uint8)
    before = np.vstack([plane, np.full((64, 128), 128, np.uint8)])  # 4:2:0: Y, then U and V
    after = before.copy()
    after[24:40, 24:40] += np.array([3, 4], np.uint8).repeat(128).reshape(16, 16)  # 3.5 on average
    assert frame_difference(before, after, yuv=True, level=STRICT).window == 3.5
    assert frame_difference(before, after, yuv=True, level=LOOSE).window == 3.5
    assert not frame_difference(before, after, yuv=True, level=STRICT).is_repeat(STRICT)
    assert frame_difference(before, after, yuv=True, level=LOOSE).is_repeat(LOOSE)


def test_loose_averages_the_difference_over_2x2_cells_before_its_windows() -> None:
    """Noise that alternates in sign from sample to sample cancels in the cells; a change of one sign
    does not."""
    flat = np.full((48, 64), 100, np.uint8)  # 4:2:0, 32 rows of luma
    checker = flat.copy()
    checker[:32] += (np.indices((32, 64)).sum(axis=0) % 2 * 6).astype(np.uint8)
    checker[:32] -= 3  # -3 and +3 on alternate samples
    assert frame_difference(flat, checker, yuv=True, level=STRICT).window == 3.0
    assert frame_difference(flat, checker, yuv=True, level=LOOSE).window == 0.0
    step = flat.copy()
    step[:16, :16] += 3
    assert frame_difference(flat, step, yuv=True, level=LOOSE).window == 3.0
    # RGB frames of odd sides: the last row and column are cells of their own (every sample counts)
    odd = np.full((33, 65, 3), 100, np.uint8)
    edge = odd.copy()
    edge[-1, :, 0] += 8
    assert frame_difference(odd, edge, yuv=False, level=LOOSE).window > 0


def test_the_comparison_is_with_the_last_upscaled_frame_not_the_previous_one() -> None:
    """Frames that each differ from the previous by less than the threshold, but drift: every step is
    small, yet no frame is allowed further than the threshold from the frame it reuses."""
    base = np.full((48, 64), 100, dtype=np.uint8)
    frames = [np.vstack([base + np.uint8(step), np.full((24, 64), 128, np.uint8)]) for step in range(8)]
    plan = _plan(8, chunk_frames=8)
    dedup = find_duplicates(frames, plan, yuv=True, level=DedupLevel("test", 1, 2.5, 100.0))
    assert dedup.duplicates == {2: 1, 3: 1, 5: 4, 6: 4, 8: 7}
    # Against the previous frame, each step (1 level) would have been a repeat of frame 1.
    assert frame_difference(frames[0], frames[1], yuv=True).window == 1.0


# -- esrfarm upscale --dedup, real workers ---------------------------------------------------------------


LOSSLESS = ["--codec", "libx264", "--crf", "0", "--preset", "ultrafast"]  # YUV frames, exact output


def _upscale_args(
    source: Path, output: Path, farm: list[WorkerProcess], root: Path, model: Path
) -> list[str]:
    return [
        "upscale", str(source), str(output), "--scale", "2", "--model", str(model),
        "--workers", ",".join(w.url for w in farm), "--shared-root", str(root),
        "--batch-size", "2", "--chunk-frames", "8", *LOSSLESS,
    ]  # fmt: skip


def _job_dir(root: Path, output: Path) -> Path:
    jobs = [p for p in (root / "jobs").iterdir() if p.is_dir() and (p / DEDUP_FILE).is_file()]
    assert len(jobs) == 1, jobs
    return jobs[0]


def _check_dedup_output(source: Path, output: Path, plain: Path, dedup: DuplicateMap) -> None:
    assert_faithful_upscale(source, output, 2)  # every frame, every timestamp
    frames = list(decode_frames(probe(output), yuv=True))
    reference = list(decode_frames(probe(plain), yuv=True))
    assert len(frames) == len(reference) == dedup.frames
    for frame in range(1, dedup.frames + 1):
        got = frames[frame - 1]
        if frame in dedup.duplicates:
            assert np.array_equal(got, frames[dedup.duplicates[frame] - 1]), (
                f"frame {frame} is not its reference's"
            )
        else:
            assert np.array_equal(got, reference[frame - 1]), (
                f"upscaled frame {frame} differs from --dedup off"
            )


@pytest.fixture(scope="module")
def held_clip(clip_dir: Path, moving: Path) -> Path:
    return clips.held_video(clip_dir / "e2e-held.mp4", moving, hold=3, frames=24, size="64x36")


@pytest.fixture(scope="module")
def plain_output(
    held_clip: Path,
    tmp_path_factory: pytest.TempPathFactory,
    farm: list[WorkerProcess],
    farm_root: Path,
    tiny_model: Path,
) -> Path:
    output = tmp_path_factory.mktemp("plain") / "plain.mkv"
    result = esrfarm(*_upscale_args(held_clip, output, farm, farm_root, tiny_model))
    assert result.returncode == 0, result.stderr
    return output


def test_upscale_dedup_end_to_end(
    held_clip: Path,
    plain_output: Path,
    tmp_path: Path,
    farm: list[WorkerProcess],
    farm_root: Path,
    tiny_model: Path,
) -> None:
    output = tmp_path / "dedup.mkv"
    stats = tmp_path / "stats.json"
    args = _upscale_args(held_clip, output, farm, farm_root, tiny_model)
    result = esrfarm(*args, "--dedup", "--keep-frames", "--stats", stats)
    assert result.returncode == 0, result.stderr
    job_dir = _job_dir(farm_root, output)
    dedup = DuplicateMap.from_json((job_dir / DEDUP_FILE).read_bytes())
    assert dedup.chunk_frames == 8 and dedup.frames == 24
    assert 8 <= dedup.upscaled_count <= 12, dedup  # 8 drawings, each held 3 frames (3 chunks of 8)
    assert orjson.loads(stats.read_bytes())["frames_upscaled"] == dedup.upscaled_count
    assert orjson.loads((job_dir / "job.json").read_bytes())["identity"]["dedup"]
    # Only upscaled frames were extracted and given to the workers.
    outputs = sorted(int(p.stem) for p in (job_dir / "output").iterdir() if p.suffix == ".yuv")
    assert outputs == [f for f in range(1, 25) if f not in dedup.duplicates]
    _check_dedup_output(held_clip, output, plain_output, dedup)
    shutil.rmtree(job_dir)  # kept for the checks above; the resume test starts this job afresh


def test_upscale_dedup_resumes_after_sigkill(
    held_clip: Path,
    plain_output: Path,
    tmp_path: Path,
    farm: list[WorkerProcess],
    farm_root: Path,
    tiny_model: Path,
) -> None:
    output = tmp_path / "resumed.mkv"
    args = [*_upscale_args(held_clip, output, farm, farm_root, tiny_model), "--dedup"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    jobs = farm_root / "jobs"
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and coordinator.poll() is None:
        dirs = [p for p in jobs.glob("*") if (p / DEDUP_FILE).is_file()]
        if any(any(d.glob("output/0*.yuv")) for d in dirs):
            os.kill(coordinator.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    coordinator.communicate(timeout=60)
    assert killed, "the job finished before it could be killed"
    result = esrfarm(*args, "-v")
    assert result.returncode == 0, result.stderr
    assert "resuming job" in result.stderr
    assert "duplicate map of an earlier run is used" in result.stderr
    dedup = find_duplicates(
        decode_frames(probe(held_clip), yuv=True), _plan(24, chunk_frames=8), yuv=True
    )  # the map the job used, found again
    _check_dedup_output(held_clip, output, plain_output, dedup)


def test_a_kept_map_is_used_only_for_its_own_level(clip_dir: Path, moving: Path, tmp_path: Path) -> None:
    clip = clips.held_video(clip_dir / "held3-28.mp4", moving, hold=3, frames=24, crf=28)
    info, plan = probe(clip), _plan(24, chunk_frames=8)
    strict = job_duplicate_map(tmp_path, info, plan, yuv=True, bits=8, level=STRICT)
    kept = (tmp_path / DEDUP_FILE).read_bytes()
    assert job_duplicate_map(tmp_path, info, plan, yuv=True, bits=8, level=STRICT) == strict
    loose = job_duplicate_map(tmp_path, info, plan, yuv=True, bits=8, level=LOOSE)
    assert loose.level == "loose" and loose.upscaled_count < strict.upscaled_count
    assert (tmp_path / DEDUP_FILE).read_bytes() != kept, "the loose map replaced the strict one"
    assert DuplicateMap.from_json((tmp_path / DEDUP_FILE).read_bytes()) == loose


@pytest.fixture(scope="module")
def compressed_clip(clip_dir: Path, moving: Path) -> Path:
    """Held for 3 frames and re-encoded at CRF 28: strict upscales some repeats again, loose does not."""
    return clips.held_video(clip_dir / "e2e-held3-28.mp4", moving, hold=3, frames=24, size="192x108", crf=28)


def test_upscale_dedup_level_loose_end_to_end(
    compressed_clip: Path,
    tmp_path: Path,
    farm: list[WorkerProcess],
    farm_root: Path,
    tiny_model: Path,
) -> None:
    plain = tmp_path / "plain.mkv"
    result = esrfarm(*_upscale_args(compressed_clip, plain, farm, farm_root, tiny_model))
    assert result.returncode == 0, result.stderr
    output = tmp_path / "loose.mkv"
    args = _upscale_args(compressed_clip, output, farm, farm_root, tiny_model)
    result = esrfarm(*args, "--dedup", "--dedup-level", "loose", "--keep-frames")
    assert result.returncode == 0, result.stderr
    job_dir = _job_dir(farm_root, output)
    dedup = DuplicateMap.from_json((job_dir / DEDUP_FILE).read_bytes())
    assert dedup.level == "loose"
    assert orjson.loads((job_dir / "job.json").read_bytes())["identity"]["dedup"] == LOOSE.identity()
    frames = list(decode_frames(probe(compressed_clip), yuv=True))
    strict = find_duplicates(frames, _plan(24, chunk_frames=8), yuv=True, level=STRICT)
    assert dedup == find_duplicates(frames, _plan(24, chunk_frames=8), yuv=True, level=LOOSE)
    assert dedup.upscaled_count < strict.upscaled_count, (dedup, strict)
    _check_dedup_output(compressed_clip, output, plain, dedup)
    shutil.rmtree(job_dir)


def test_a_dedup_level_without_dedup_is_refused_naming_the_flag(tmp_path: Path) -> None:
    result = esrfarm("upscale", str(tmp_path / "in.mp4"), str(tmp_path / "out.mkv"), "--dedup-level", "loose")
    assert result.returncode != 0 and "--dedup-level" in result.stderr and "--dedup as well" in result.stderr


def test_dedup_is_refused_for_images_before_a_job_directory_exists(tmp_path: Path) -> None:
    source = picture(tmp_path / "photo.png", (8, 8))
    root = tmp_path / "root"
    _, _, error = asyncio.run(
        run(spec(source, tmp_path / "out.png", dedup=True), fake_farm(root, 1), fake_farm_settings(root))
    )
    assert isinstance(error, JobError) and "--dedup is for videos" in str(error), error
    assert not any((root / "jobs").glob("*/job.json"))
