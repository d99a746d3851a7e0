"""``esrfarm upscale`` end to end: real ffmpeg, real worker processes on 127.0.0.1, a tiny seeded model.

Each job runs the CLI as a user would (a subprocess), against workers that are separate processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from media.extract import decode_frames
from media.probe import probe
from tests import clips
from tests.videocheck import assert_faithful_upscale
from tests.workerutil import REPO, WorkerProcess, part_way, running, start_worker
from worker.runtime import RuntimeSettings, load_upscaler

FAST = ["--preset", "ultrafast"]


def esrfarm(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-clips")


CLIPS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "one-frame.mp4": (lambda p: clips.video(p, frames=1), ".mp4"),
    "seven-frames.mp4": (lambda p: clips.video(p, frames=7), ".mp4"),
    "ntsc-stereo.mp4": (lambda p: clips.video_with_audio(p, rate="30000/1001", seconds=3.0), ".mp4"),
    "odd-161x91.mkv": (lambda p: clips.odd_size_video(p, size=(161, 91)), ".mkv"),
    "vfr.mp4": (lambda p: clips.vfr_video(p, frames=30), ".mp4"),
    "two-audio-subs.mkv": (lambda p: clips.rich_mkv(p, seconds=2.0), ".mkv"),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_end_to_end(
    name: str, clip_dir: Path, tmp_path: Path, farm: list[WorkerProcess], farm_root: Path, tiny_model: Path
) -> None:
    make, suffix = CLIPS[name]
    source = make(clip_dir / name)
    output = tmp_path / f"out{suffix}"
    workers = ",".join(w.url for w in farm)
    result = esrfarm(
        "upscale", source, output, "--scale", "2", "--model", tiny_model,
        "--workers", workers, "--shared-root", farm_root, "--batch-size", "4", *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stderr
    assert_faithful_upscale(source, output, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # no temp files beside it
    assert not any((farm_root / "jobs").iterdir()), "the job directory is removed after success"


def test_lossless_output_is_the_model_output_bit_for_bit(
    clip_dir: Path, tmp_path: Path, farm: list[WorkerProcess], farm_root: Path, tiny_model: Path
) -> None:
    source = clips.video(clip_dir / "lossless-src.mp4", size="48x32", frames=11)
    output = tmp_path / "out.mkv"
    result = esrfarm(
        "upscale", source, output, "--model", tiny_model, "--workers", ",".join(w.url for w in farm),
        "--shared-root", farm_root, "--codec", "ffv1", "--pix-fmt", "gbrp", "--batch-size", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    upscaler = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1))
    inputs = list(decode_frames(source))
    outputs = list(decode_frames(output))
    assert len(outputs) == len(inputs) == 11
    for i, (frame_in, frame_out) in enumerate(zip(inputs, outputs, strict=True)):
        expected = upscaler.upscale(frame_in[None])[0]
        assert frame_out.shape == (128, 192, 3)
        assert np.array_equal(frame_out, expected), f"frame {i + 1} differs from the model's output"


def test_local_workers_through_the_shell_wrapper(clip_dir: Path, tmp_path: Path, tiny_model: Path) -> None:
    source = clips.video_with_audio(clip_dir / "wrapper.mp4", rate="25", seconds=1.0)
    output = tmp_path / "out.mp4"
    root = tmp_path / "root"
    env = {**os.environ, "ESRFARM_PYTHON": sys.executable, "ESRFARM_SHARED_ROOT": str(root)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "upscale.sh"), str(source), str(output), "2",
         "--model", str(tiny_model), "--worker-arg=--cpu-threads=1", "-v", *FAST],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "started local worker 0" in result.stderr
    assert_faithful_upscale(source, output, 2)
    assert list((root / "jobs").iterdir()) == []


def test_shell_wrapper_checks_its_arguments(tmp_path: Path) -> None:
    script = str(REPO / "scripts" / "upscale.sh")
    missing = subprocess.run(["bash", script, "in.mp4"], capture_output=True, text=True)
    assert missing.returncode == 2 and "expected INPUT OUTPUT SCALE" in missing.stderr
    bad_scale = subprocess.run(
        ["bash", script, script, str(tmp_path / "o.mp4"), "two"], capture_output=True, text=True
    )
    assert (
        bad_scale.returncode == 2 and "SCALE must be a number (e.g. 2, 3 or 4), not 'two'" in bad_scale.stderr
    )
    # The range is the CLI's: the wrapper lets through what it takes and refuses what it refuses.
    env = {**os.environ, "ESRFARM_PYTHON": sys.executable}
    too_large = subprocess.run(
        ["bash", script, script, str(tmp_path / "o.mp4"), "20"], capture_output=True, text=True, env=env
    )
    assert too_large.returncode == 2
    assert too_large.stderr.strip() == "esrfarm upscale: error: --scale must be at most 16.0, not 20.0"


def test_a_scale_above_the_models_own_is_a_resize_and_says_so(
    farm: list[WorkerProcess], farm_root: Path, clip_dir: Path, tmp_path: Path, tiny_model: Path
) -> None:
    source = clips.video(clip_dir / "seven.mp4", size="32x18", frames=2)
    output = tmp_path / "out.mkv"
    result = esrfarm(
        "upscale", source, output, "--model", tiny_model, "--workers", ",".join(w.url for w in farm),
        "--shared-root", farm_root, "--scale", "7", "--codec", "ffv1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{tiny_model.stem} is a x4 model: scale 7 resizes its x4 output by 1.75" in result.stderr
    assert probe(output).video.width == 224
    quiet = esrfarm(
        "upscale", source, tmp_path / "out2.mkv", "--model", tiny_model, "--workers",
        ",".join(w.url for w in farm), "--shared-root", farm_root, "--scale", "3", "--codec", "ffv1",
    )  # fmt: skip
    assert quiet.returncode == 0 and "resizes its" not in quiet.stderr, quiet.stderr


def test_a_worker_killed_mid_job_loses_its_batches_to_the_other(
    clip_dir: Path, tmp_path: Path, tiny_model: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    workers = [start_worker(root, tiny_model, tmp_path / "logs") for _ in range(2)]
    victim = workers[1]
    try:
        source = clips.video(clip_dir / "long.mp4", size="160x90", frames=160)
        output = tmp_path / "out.mp4"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output),
             "--model", str(tiny_model), "--workers", ",".join(w.url for w in workers),
             "--shared-root", str(root), "--unreachable-timeout", "2", "--keep-frames", *FAST],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        killed_after = None
        while killed_after is None and time.monotonic() < deadline and coordinator.poll() is None:
            if part_way(root, victim.pid):
                os.kill(victim.pid, signal.SIGKILL)
                killed_after = True
            time.sleep(0.005)
        if killed_after is None:
            coordinator.kill()
            _, stderr = coordinator.communicate(timeout=60)
            raise AssertionError(f"the second worker never got part way through its manifest:\n{stderr}")
        _, stderr = coordinator.communicate(timeout=300)
        assert coordinator.returncode == 0, stderr
        assert "lost worker" in stderr
        info = probe(output, full_decode=True)
        assert info.video.frame_count == 160
        assert (info.video.width, info.video.height) == (640, 360)
        # Every frame was upscaled: the kept output frames are exactly the job's frames.
        outputs = sorted(p.stem for p in root.glob("jobs/*/output/0*"))
        assert outputs == [f"{i:08d}" for i in range(1, 161)]
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.stop()


def test_failed_job_keeps_its_files_and_writes_no_output(
    clip_dir: Path, tmp_path: Path, tiny_model: Path
) -> None:
    source = clips.video(clip_dir / "short.mp4", frames=3)
    output = tmp_path / "out.mp4"
    root = tmp_path / "root"
    result = esrfarm(
        "upscale", source, output, "--model", tiny_model, "--workers", "http://127.0.0.1:9",
        "--shared-root", root, "--unreachable-timeout", "1",
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("esrfarm upscale: error: no healthy worker to upscale with")
    job_dirs = list((root / "jobs").iterdir())
    assert len(job_dirs) == 1 and f"its files are kept in {job_dirs[0]}" in last
    assert not output.exists()


@pytest.fixture(scope="module")
def good_clip(clip_dir: Path) -> Path:
    return clips.video(clip_dir / "good.mp4", frames=3)


def bad_input_cases(clip_dir: Path, tmp_path: Path, good: Path) -> dict[str, tuple[Path, Path, str]]:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    audio = tmp_path / "audio.m4a"
    clips.ffmpeg(["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(audio)])
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"precious")
    png = tmp_path / "photo.mp4"
    Image.new("RGB", (20, 10), (200, 10, 10)).save(png, format="PNG")
    return {
        "missing input": (tmp_path / "nope.mp4", tmp_path / "o1.mp4", "does not exist"),
        "not a video": (text, tmp_path / "o2.mp4", "is not a media file FFmpeg can read"),
        "no video stream": (audio, tmp_path / "o3.mp4", "has no video stream (it has only audio streams)"),
        "zero frames": (clips.zero_frame_video(tmp_path / "zero.mkv"), tmp_path / "o4.mp4", "no frames"),
        "corrupt": (
            clips.corrupt_copy(good, tmp_path / "corrupt.mp4"),
            tmp_path / "o5.mp4",
            "Invalid data found",
        ),
        "unwritable output": (good, readonly / "o6.mp4", "cannot be written"),
        "output is the input": (good, good, "is the input file"),
        "existing output": (good, existing, "already exists (pass --overwrite to replace it)"),
        "a still image named .mp4": (png, tmp_path / "o7.mp4", "is a still image (png), not a video"),
    }


def test_bad_inputs_fail_with_one_line_and_no_output(clip_dir: Path, tmp_path: Path, good_clip: Path) -> None:
    cases = bad_input_cases(clip_dir, tmp_path, good_clip)
    if os.geteuid() == 0:  # root writes through a read-only directory: put the output under a file
        source, _, hint = cases["unwritable output"]
        cases["unwritable output"] = (source, tmp_path / "notes.mp4" / "o6.mp4", hint)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for name, (source, output, hint) in cases.items():
        result = esrfarm("upscale", source, output, "--model", "realesr-animevideov3", "--local-workers", "1")
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0, name
        assert len(lines) == 1 and lines[0].startswith("esrfarm upscale: error: "), (name, result.stderr)
        assert hint in lines[0], (name, lines[0])
        assert output == source or not output.exists() or before.get(output) == output.read_bytes(), name
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "nothing written, nothing changed"


def test_stats_file_holds_the_stage_timings(
    clip_dir: Path, tmp_path: Path, farm: list[WorkerProcess], farm_root: Path, tiny_model: Path
) -> None:
    source = clips.video(clip_dir / "stats.mp4", frames=20)
    stats_file = tmp_path / "stats.json"
    result = esrfarm(
        "upscale", source, tmp_path / "out.mp4", "--model", tiny_model,
        "--workers", ",".join(w.url for w in farm), "--shared-root", farm_root, "--stats", stats_file, *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stats = orjson.loads(stats_file.read_bytes())
    assert stats["frames"] == 20
    for key in ("extract_s", "segment_encode_s", "join_s", "workers_ready_s", "pipeline_done_s", "total_s"):
        assert 0 <= stats[key] <= stats["total_s"], key
    assert stats["workers_ready_s"] <= stats["pipeline_done_s"] and stats["worker_idle_s"] >= 0


def test_help_explains_the_command() -> None:
    result = esrfarm("upscale", "--help")
    assert result.returncode == 0
    for option in ("--scale", "--model", "--workers", "--local-workers", "--shared-root", "--batch-size",
                   "--codec", "--crf", "--preset", "--pix-fmt", "--overwrite", "--keep-frames"):  # fmt: skip
        assert option in result.stdout


def test_local_workers_die_with_a_killed_coordinator(
    clip_dir: Path, tmp_path: Path, tiny_model: Path
) -> None:
    """SIGKILL leaves the coordinator no chance to clean up; its workers must still not outlive it."""
    source = clips.video(clip_dir / "orphans.mp4", size="160x90", frames=400)
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(tmp_path / "out.mp4"),
         "--model", str(tiny_model), "--local-workers", "2", "--shared-root", str(root),
         "--worker-arg=--cpu-threads=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        pids: list[int] = []
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            assert coordinator.poll() is None, "the coordinator ended before its workers were up"
            pids = []
            for port_file in root.glob("workers/*/worker-*.port.json"):
                with contextlib.suppress(OSError, ValueError):
                    pids.append(orjson.loads(port_file.read_bytes())["pid"])
            time.sleep(0.05)
        assert len(pids) == 2
        coordinator.kill()
        coordinator.wait()
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if running(pid)], "local workers outlived their coordinator"
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
