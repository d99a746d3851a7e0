"""Long videos: a bounded window of frames on disk, segments, and resuming after SIGKILL.

Real coordinator processes (killed for real), real local workers, real ffmpeg. Outputs are lossless
(FFV1, RGB) so "the same output" means the same frames, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from manifests.manifest import read_manifest
from media.extract import decode_frames
from media.probe import probe
from tests import clips
from tests.workerutil import REPO

LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "gbrp"]


def command(source: Path, output: Path, root: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output),
        "--model", str(model), "--shared-root", str(root), "--local-workers", "2",
        "--worker-arg=--cpu-threads=1", "--batch-size", "4", "-v", *extra,
    ]  # fmt: skip


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def frames_of(path: Path) -> list[np.ndarray]:
    return list(decode_frames(path))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clips.video_with_audio(tmp_path_factory.mktemp("stream") / "long.mp4", size="96x54", seconds=8.0)


@pytest.fixture(scope="module")
def reference(clip: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """The frames of one uninterrupted run: what every interrupted run must also give."""
    work = tmp_path_factory.mktemp("reference")
    output = work / "out.mkv"
    result = run(
        command(clip, output, work / "root", tiny_model, "--scale", "2", "--max-disk", "3M", *LOSSLESS)
    )
    assert result.returncode == 0, result.stderr
    frames = frames_of(output)
    assert len(frames) == probe(clip).frame_count == 240
    return frames


def _dir_bytes(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory) if directory.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total


def test_frame_data_stays_under_max_disk(clip: Path, tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    budget = 4_000_000  # 96x54 in + 192x108 out PNG bounds: about 80 KB a frame, so 16-frame chunks
    args = command(
        clip, tmp_path / "out.mkv", root, tiny_model, "--scale", "2", "--max-disk", str(budget), *LOSSLESS
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    samples: list[int] = []

    def sample() -> None:
        while process.poll() is None:
            for job in root.glob("jobs/*"):
                samples.append(_dir_bytes(job / "input") + _dir_bytes(job / "output"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate(timeout=600)
    sampler.join()
    assert process.returncode == 0, stderr
    assert "chunk(s) of up to 16 frames" in stderr
    assert len(samples) > 100 and max(samples) > budget / 4, "the sampler saw the frames come and go"
    assert max(samples) <= budget, f"frame data reached {max(samples)} bytes, over the {budget} budget"
    assert probe(tmp_path / "out.mkv").frame_count == 240


def test_a_budget_below_one_batch_is_refused(clip: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.mkv"
    result = run(command(clip, output, tmp_path / "root", tiny_model, "--scale", "2", "--max-disk", "100K"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "does not hold even one batch of 4 frames" in last
    assert "resumes" not in last and "kept" not in last, "nothing is kept, so nothing can resume"
    assert not output.exists()
    assert not list((tmp_path / "root" / "jobs").glob("*")), "no empty job directory is left"


def _job_dir(root: Path) -> Path | None:
    jobs = list(root.glob("jobs/*"))
    return jobs[0] if jobs else None


def _any(directory: Path, pattern: str) -> bool:
    return directory.is_dir() and any(directory.glob(pattern))


def kill_when(args: list[str], root: Path, reached: Callable[[Path], bool], point: str) -> None:
    """Run the coordinator and SIGKILL it as soon as its job directory shows ``reached``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            job = _job_dir(root)
            if job is not None and reached(job):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, f"the run ended before reaching '{point}'"


KILL_POINTS: dict[str, Callable[[Path], bool]] = {
    # the first input frames are being extracted
    "extracting": lambda job: _any(job / "input", "0*"),
    # frames are being upscaled, no segment is finished yet
    "upscaling": lambda job: _any(job / "output", "0*") and not _any(job / "segments", "0*.mp4"),
    # some segments are finished, others not
    "encoding": lambda job: len(list((job / "segments").glob("0*.mp4"))) >= 3,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_the_same_command_gives_the_same_output(
    point: str, clip: Path, tiny_model: Path, tmp_path: Path, reference: list[np.ndarray]
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    args = command(clip, output, root, tiny_model, "--scale", "2", "--max-disk", "3M", *LOSSLESS)
    kill_when(args, root, KILL_POINTS[point], point)
    assert not output.exists()

    again = run(args)
    assert again.returncode == 0, again.stderr
    assert "resuming job" in again.stderr
    got = frames_of(output)
    assert len(got) == len(reference)
    for i, (a, b) in enumerate(zip(got, reference, strict=True)):
        assert np.array_equal(a, b), f"frame {i + 1} differs from the uninterrupted run's"
    assert not list(root.glob("jobs/*")), "the job directory is removed after success"


def test_finished_segments_are_not_upscaled_again(clip: Path, tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mkv"
    args = command(clip, output, root, tiny_model, "--scale", "2", "--max-disk", "3M", *LOSSLESS)
    kill_when(args, root, lambda job: len(list((job / "segments").glob("0*.mp4"))) >= 5, "five segments")
    job = _job_dir(root)
    assert job is not None
    kept = sorted(p.name for p in (job / "segments").glob("0*.mp4"))
    assert len(kept) >= 5
    again = run([*args, "--keep-frames"])
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(kept)} of " in again.stderr or f"resuming: {len(kept) + 1} of " in again.stderr
    second_run = [read_manifest(p) for p in job.glob("manifests/r02-*.json")]
    assert second_run, "the second run upscaled the rest"
    chunk_frames = int(re.search(r"chunk\(s\) of up to (\d+) frames", again.stderr).group(1))  # type: ignore[union-attr]
    kept_frames = set(range(1, chunk_frames * len(kept) + 1))  # what the kept segments hold
    again = [f for m in second_run for b in m.batches for f in b.frames if f in kept_frames]
    assert not again, f"frames of finished segments were upscaled again: {again[:8]}"


def test_changing_only_the_encoder_reuses_kept_frames(
    clip: Path, tiny_model: Path, tmp_path: Path, reference: list[np.ndarray]
) -> None:
    root = tmp_path / "root"
    first = run(
        command(
            clip,
            tmp_path / "fast.mp4",
            root,
            tiny_model,
            "--scale",
            "2",
            "--keep-frames",
            "--preset",
            "ultrafast",
            # RGB frames, which the lossless RGB encode below can reuse (auto would keep this
            # output's YUV, and the lossless run would then upscale its own RGB frames again).
            "--frame-format",
            "npy",
        )
    )
    assert first.returncode == 0, first.stderr
    again = run(
        command(clip, tmp_path / "exact.mkv", root, tiny_model, "--scale", "2", "--keep-frames", *LOSSLESS)
    )
    assert again.returncode == 0, again.stderr
    assert "encoder settings or chunking changed" in again.stderr
    jobs = list(root.glob("jobs/*"))
    assert len(jobs) == 1, "the same job"
    assert not list(jobs[0].glob("manifests/r02-*.json")), "no frame was upscaled again"
    got = frames_of(tmp_path / "exact.mkv")
    assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))

    other_scale = run(command(clip, tmp_path / "x3.mkv", root, tiny_model, "--scale", "3", "--keep-frames"))
    assert other_scale.returncode == 0, other_scale.stderr
    assert len(list(root.glob("jobs/*"))) == 2, "another scale is another job"


def test_a_second_coordinator_for_the_same_job_is_refused(
    clip: Path, tiny_model: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    args = command(
        clip, tmp_path / "out.mkv", root, tiny_model, "--scale", "2", "--max-disk", "3M", *LOSSLESS
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while _job_dir(root) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second = run([*args[:5], str(tmp_path / "other.mkv"), *args[6:]])
        assert second.returncode == 1
        last = second.stderr.strip().splitlines()[-1]
        assert f"is being run by esrfarm pid {first.pid}" in last, last
        assert not (tmp_path / "other.mkv").exists()
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
