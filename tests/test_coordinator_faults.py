"""The fast cases of the fault suite, on the coordinator's side (the slow ones: benchmarks/faults.py).

Each case is one defect an adversarial run found; each test fails without its fix. Real coordinator
processes (killed for real), real worker processes, real ffmpeg, lossless outputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from media.extract import decode_frames
from tests import clips
from tests.workerutil import REPO, WorkerProcess, running

LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "gbrp"]


def coordinator(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", "upscale", *map(str, args)]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def on_farm(farm: list[WorkerProcess], root: Path, model: Path, *args: str | Path) -> list[str]:
    return coordinator(
        *args, "--model", model, "--workers", ",".join(w.url for w in farm), "--shared-root", root,
        "--scale", "2", "--batch-size", "4",
    )  # fmt: skip


def refused(worker: WorkerProcess) -> int:
    """How many manifests the worker has answered 409 (busy) so far, from its whole log."""
    return worker.log_path.read_text(errors="replace").count(" 409 ")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_a_coordinator_killed_in_the_join_leaves_nothing_a_rerun_does_not_clean(
    farm: list[WorkerProcess], farm_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    source = clips.video_with_audio(tmp_path / "in.mp4", size="32x18", seconds=4.0)
    output = tmp_path / "out.mkv"
    args = on_farm(farm, farm_root, tiny_model, source, output, "--keep-frames", "--overwrite", *LOSSLESS)
    first = run(args)  # every segment on disk: a rerun goes straight to the join
    assert first.returncode == 0, first.stderr
    reference = list(decode_frames(output))
    output.unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    caught: list[Path] = []
    for _ in range(20):  # the join is short: try until the kill lands inside it
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO
        )
        while process.poll() is None:
            parts = list(tmp_path.glob(".out.mkv.*.part"))
            if parts:
                process.send_signal(signal.SIGKILL)
                caught = parts
                break
        process.wait()
        if caught:
            break
        output.unlink(missing_ok=True)
    assert caught, "the kill never landed in the join"
    assert not output.exists(), "nothing under the output's name"
    deadline = time.monotonic() + 10
    while any(processes_mentioning(p.name) for p in caught) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(processes_mentioning(p.name) for p in caught), "the join's ffmpeg outlived its coordinator"
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"], "the leftovers are gone"
    got = list(decode_frames(output))
    assert len(got) == len(reference) and all(
        np.array_equal(a, b) for a, b in zip(got, reference, strict=True)
    )


def test_two_jobs_share_the_workers_without_a_storm_of_409s(
    farm: list[WorkerProcess], farm_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    sources = [clips.video(tmp_path / f"in{i}.mp4", size="32x18", frames=60) for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = [refused(w) for w in farm]
    commands = [
        on_farm(farm, farm_root, tiny_model, src, tmp_path / f"out{i}.mkv", "--keep-frames", *LOSSLESS)
        for i, src in enumerate(sources)
    ]
    jobs = [subprocess.Popen(c, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for c in commands]
    for job in jobs:
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
    for i in range(2):
        frames = list(decode_frames(tmp_path / f"out{i}.mkv"))
        assert len(frames) == 60 and frames[0].shape == (36, 64, 3)
    refusals = sum(refused(w) for w in farm) - sum(before)
    job_dirs = [d for d in (farm_root / "jobs").iterdir() if d.name.startswith("in")]
    manifests = sum(len(list(d.glob("manifests/*.json"))) for d in job_dirs)
    batches = 2 * 60 // 4
    assert refusals <= 10, f"{refusals} answers 409 for two jobs of {batches // 2} batches each"
    assert manifests <= batches, f"{manifests} manifest files for {batches} batches"


def test_a_stopped_local_worker_is_given_up_and_killed_not_waited_for(
    tiny_model: Path, tmp_path: Path
) -> None:
    source = clips.video(tmp_path / "in.mp4", size="32x18", frames=80)
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        coordinator(
            source, tmp_path / "out.mkv", "--model", tiny_model, "--shared-root", root,
            "--local-workers", "2", "--worker-arg=--cpu-threads=1", "--batch-size", "2", "--scale", "2",
            "--unreachable-timeout", "2", *LOSSLESS,
        ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    stopped = None
    deadline = time.monotonic() + 240
    while stopped is None and time.monotonic() < deadline and process.poll() is None:
        for port_file in root.glob("workers/*/worker-1.port.json"):
            pid = int(orjson.loads(port_file.read_bytes())["pid"])
            if _stop_while_it_holds_a_manifest(pid, root):
                stopped = pid
        time.sleep(0.01)
    assert stopped is not None, "the second worker never got to work"
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "lost worker local-1: /health unreachable" in stderr
    assert "ignored SIGTERM" not in stderr, "a stopped worker cannot act on SIGTERM: it is killed"
    assert len(list(decode_frames(tmp_path / "out.mkv"))) == 80
    deadline = time.monotonic() + 60
    while running(stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(stopped), "the stopped worker was left behind"


def _stop_while_it_holds_a_manifest(pid: int, root: Path) -> bool:
    """SIGSTOP worker ``pid`` if, once stopped, a status file of its says it is still processing (so
    that the job cannot end without giving it up); else let it go on. True if it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    for path in root.glob("jobs/*/status/*.json"):
        try:
            status = orjson.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if status["worker"]["pid"] == pid and status["state"] == "processing":
            return True
    os.kill(pid, signal.SIGCONT)
    return False


@pytest.mark.parametrize("name", ["vidéo.mp4", "映画.mp4", ".hidden.mp4", "_under.mp4", "-dash.mp4"])
def test_any_file_name_works_from_the_command_line(
    farm: list[WorkerProcess], farm_root: Path, tiny_model: Path, tmp_path: Path, name: str
) -> None:
    source = clips.video(tmp_path / name, size="32x18", frames=3)
    output = tmp_path / f"{Path(name).stem}-out.mkv"
    options = on_farm(farm, farm_root, tiny_model, *LOSSLESS)[4:]  # every option, no positional argument
    result = run([*coordinator(), *options, "--", str(source), str(output)])
    assert result.returncode == 0, result.stderr
    assert len(list(decode_frames(output))) == 3


def test_ffmpeg_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A coordinator killed by SIGKILL leaves no encoder running (PR_SET_PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from media.ffmpeg import FFmpegProcess\n"
        "p = FFmpegProcess(['-re', '-f', 'lavfi', '-i', 'testsrc2=rate=5', '-f', 'null', '-'], action='x')\n"
        "print(p._proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        ffmpeg_pid = int(parent.stdout.readline())
        assert running(ffmpeg_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while running(ffmpeg_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(ffmpeg_pid), "ffmpeg outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_ctrl_c_stops_quietly_and_the_rerun_says_it_resumes(tiny_model: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the terminal's whole foreground process group: the coordinator stops its own
    local workers, which do not take the signal themselves (no warnings of theirs); the same command
    then says it resumes, and its rate counts only the frames it upscaled."""
    source = clips.video(tmp_path / "in.mp4", size="32x18", frames=200)
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = coordinator(
        source, tmp_path / "out.mkv", "--model", tiny_model, "--shared-root", root, "--local-workers", "2",
        "--worker-arg=--cpu-threads=1", "--batch-size", "2", "--scale", "2", "--keep-frames", *LOSSLESS,
    )  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list(root.glob("jobs/*/output/0*"))) < 20 and process.poll() is None:
        assert time.monotonic() < deadline, "the job never got to upscale"
        time.sleep(0.01)
    assert process.poll() is None, "the job ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("esrfarm upscale: interrupted ("), stderr
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line], stderr
    logs = [path.read_text() for path in root.glob("workers/*/worker-*.log")]
    assert len(logs) == 2 and all("stopping: worker stopped (SIGTERM)" in text for text in logs), logs

    again = run(command)
    assert again.returncode == 0, again.stderr
    assert "resuming the job in " in again.stderr
    summary = again.stderr.strip().splitlines()[-1]
    found = int(summary.split("resumed: ")[1].split()[0])
    assert found >= 20, summary
    assert f"{200 - found} in this run's" in summary, summary
