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

from coordinator.dedup import DuplicateFinder, find_duplicates, frame_difference
from coordinator.errors import JobError
from manifests.chunkbook import ChunkBook, ChunkStage
from manifests.chunks import plan_chunks
from manifests.dedup import DEDUP_FILE, DuplicateMap, chunk_sources, plan_unique_batches
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
    dedup = DuplicateMap.of(frames=8, chunk_frames=4, threshold=3.0, block=16, duplicates={3: 1, 2: 1, 8: 5})
    assert DuplicateMap.from_json(dedup.to_json()) == dedup
    assert [dedup.source(f) for f in range(1, 9)] == [1, 1, 1, 4, 5, 6, 7, 5]
    assert dedup.upscaled_count == 5


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
        DuplicateMap.of(frames=8, chunk_frames=4, threshold=3.0, block=16, duplicates=duplicates)
    document = (
        b'{"format": "esrfarm.dedup/1", "frames": 8, "chunk_frames": 4, "threshold": 3.0, "block": 16,'
        b' "duplicates": [' + b", ".join(b"[%d, %d]" % pair for pair in duplicates.items()) + b"]}"
    )
    with pytest.raises(DocumentError, match=problem):
        DuplicateMap.from_json(document)


def test_batches_cover_the_upscaled_frames_chunk_by_chunk() -> None:
    plan = _plan(10, chunk_frames=4)
    dedup = DuplicateMap.of(
        frames=10, chunk_frames=4, threshold=3.0, block=16, duplicates={2: 1, 3: 1, 7: 6, 10: 9}
    )
    batches = plan_unique_batches(plan, dedup, batch_size=2)
    assert [b.frames for b in batches] == [(1, 4), (5, 6), (8,), (9,)]
    assert [b.id for b in batches] == [0, 1, 2, 3]
    assert chunk_sources(plan.chunks[0], dedup) == [1, 1, 1, 4]
    assert chunk_sources(plan.chunks[1], dedup) == [5, 6, 6, 8]
    assert [b.frames for b in plan_unique_batches(plan, None, 2)] == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]


def test_chunk_book_takes_held_frames_before_and_after_its_batches_are_handed_on() -> None:
    plan = _plan(8, chunk_frames=4)
    dedup = DuplicateMap.of(frames=8, chunk_frames=4, threshold=3.0, block=16, duplicates={3: 2, 4: 2, 6: 5})
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


def _references(path: Path, *, yuv: bool = True) -> list[int | None]:
    """Each frame's reference, on the frames as a job with YUV (or RGB: npy, png) frames decodes them."""
    finder = DuplicateFinder(yuv=yuv)
    return [finder.reference_of(i, frame) for i, frame in enumerate(decode_frames(probe(path), yuv=yuv), 1)]


@pytest.mark.parametrize(("hold", "crf", "most_upscaled"), [(2, 18, 0.6), (3, 18, 0.45), (2, 28, 0.75)])
def test_held_frames_repeat_the_frame_their_hold_began_with(
    clip_dir: Path, moving: Path, hold: int, crf: int, most_upscaled: float
) -> None:
    clip = clips.held_video(clip_dir / f"held{hold}-{crf}.mp4", moving, hold=hold, frames=24, crf=crf)
    references = _references(clip)
    for frame, reference in enumerate(references, start=1):
        if reference is not None:  # never a neighbour of another drawing (an off-by-one)
            assert (reference - 1) // hold == (frame - 1) // hold, (frame, reference)
        if (frame - 1) % hold == 0:
            assert reference is None, f"frame {frame} starts a new drawing but was called a repeat"
    upscaled = sum(r is None for r in references) / len(references)
    assert upscaled <= most_upscaled, references


@pytest.mark.parametrize("yuv", [True, False], ids=["yuv", "rgb"])
@pytest.mark.parametrize("kind", ["pan", "fade"])
def test_a_slow_pan_or_fade_never_reuses_a_frame(clip_dir: Path, still: Path, kind: str, yuv: bool) -> None:
    # A fade over 96 frames moves the picture by about 1 level a frame: only the mean shift sees it.
    make, frames = (clips.pan_video, 24) if kind == "pan" else (clips.fade_video, 96)
    clip = make(clip_dir / f"{kind}.mp4", still, frames=frames)
    assert _references(clip, yuv=yuv) == [None] * frames


@pytest.mark.parametrize("yuv", [True, False], ids=["yuv", "rgb"])
def test_a_slow_fade_of_a_dark_blue_picture_never_reuses_a_frame(
    clip_dir: Path, still: Path, yuv: bool
) -> None:
    """Luma hardly moves (a tenth of a level a frame): the chroma's shift must be seen."""
    blue = clip_dir / "blue.png"
    clips.ffmpeg(["-i", str(still), "-vf", "colorchannelmixer=rr=0.05:gg=0.3", str(blue)])
    clip = clips.fade_video(clip_dir / "blue-fade.mp4", blue, frames=96)
    assert _references(clip, yuv=yuv) == [None] * 96


@pytest.mark.parametrize(("square", "opacity"), [(16, 0.3), (8, 0.3), (16, 0.1)])
def test_a_small_change_is_never_called_a_repeat(
    clip_dir: Path, still: Path, square: int, opacity: float
) -> None:
    clip = clips.small_change_video(
        clip_dir / f"square{square}-{opacity}.mp4", still, frames=24, square=square, opacity=opacity
    )
    references = _references(clip)
    # The box shows in frames 5-8, 13-16, 21-24: each group of four is one picture, repeated.
    assert references == [None if (f - 1) % 4 == 0 else (f - 1) // 4 * 4 + 1 for f in range(1, 25)]


def test_the_comparison_is_with_the_last_upscaled_frame_not_the_previous_one() -> None:
    """Frames that each differ from the previous by less than the threshold, but drift: every step is
    small, yet no frame is allowed further than the threshold from the frame it reuses."""
    base = np.full((48, 64), 100, dtype=np.uint8)
    frames = [np.vstack([base + np.uint8(step), np.full((24, 64), 128, np.uint8)]) for step in range(8)]
    plan = _plan(8, chunk_frames=8)
    dedup = find_duplicates(frames, plan, yuv=True, threshold=2.5, shift_threshold=100.0)
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


def test_dedup_is_refused_for_images_before_a_job_directory_exists(tmp_path: Path) -> None:
    source = picture(tmp_path / "photo.png", (8, 8))
    root = tmp_path / "root"
    _, _, error = asyncio.run(
        run(spec(source, tmp_path / "out.png", dedup=True), fake_farm(root, 1), fake_farm_settings(root))
    )
    assert isinstance(error, JobError) and "--dedup is for videos" in str(error), error
    assert not any((root / "jobs").glob("*/job.json"))
