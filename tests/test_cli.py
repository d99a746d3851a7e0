"""The esrfarm command itself: dispatch to the worker side, help, progress display."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from coordinator.cli import ProgressDisplay, summary
from coordinator.events import JobResult, Progress
from tests import clips
from tests.workerutil import REPO


def esrfarm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=REPO,
    )


def test_models_list_through_esrfarm(tmp_path: Path) -> None:
    result = esrfarm("models", "list", "--json", env={"ESRFARM_MODEL_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    names = [line.split('"name":"')[1].split('"')[0] for line in result.stdout.splitlines()]
    assert names[0] == "realesr-animevideov3" and len(names) == 6


def test_worker_help_through_esrfarm() -> None:
    result = esrfarm("worker", "--help")
    assert result.returncode == 0
    assert "--shared-root" in result.stdout and "--gpu" in result.stdout


def test_no_command_prints_help() -> None:
    result = esrfarm()
    assert result.returncode == 2
    assert "upscale" in result.stderr and "worker" in result.stderr and "models" in result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_one_line_that_updates_in_place() -> None:
    stream = _Terminal()
    show = ProgressDisplay(stream)
    show(Progress("loading model", 0, 0, 0.0, None))
    for done in range(0, 33, 4):
        show(Progress("upscaling", done, 32, 4.0, (32 - done) / 4))
    for _ in range(50):  # the same report again and again (a stage at 100% waiting for the encoder)
        show(Progress("upscaling", 32, 32, 4.0, 0.0))
    show(Progress("encoding", 32, 32, 4.0, 0.0))
    show.close()
    text = stream.getvalue()
    upscaling = [part for part in text.split("\r") if part.startswith("upscaling")]
    assert upscaling and re.match(r"upscaling     100%\|#+\| 32/32, 4\.00 fps, ETA 0s", upscaling[-1]), (
        upscaling
    )
    assert len(upscaling) < 40, "a report that says nothing new does not redraw the bar"
    assert "\n" not in text, "one line that updates in place, whatever the stage"
    assert any(part.startswith("encoding      100%") for part in text.split("\r"))


def test_progress_lines_in_a_log(caplog: pytest.LogCaptureFixture) -> None:
    show = ProgressDisplay(io.StringIO(), interval_s=3600)
    assert not show.bar_enabled
    with caplog.at_level(logging.INFO, logger="esrfarm"):
        show(Progress("extracting", 1, 10, 5.0, 1.8))
        show(Progress("extracting", 5, 10, 5.0, 1.0))  # within the interval: not logged
        show(Progress("upscaling", 0, 10, 0.0, None))  # a new stage is logged at once
        show(Progress("upscaling", 10, 10, 2.0, 0.0))  # so is the end
    assert [r.getMessage() for r in caplog.records] == [
        "progress: extracting 1/10  5.00 fps  ETA 2s",
        "progress: upscaling 0/10  0.00 fps  ETA ?",
        "progress: upscaling 10/10  2.00 fps  ETA 0s",
    ]


def test_version() -> None:
    result = esrfarm("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"esrfarm {metadata.version('esrfarm')}"


def test_a_bad_setting_names_its_flag(tmp_path: Path) -> None:
    result = esrfarm("upscale", str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4"), "--batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "esrfarm upscale: error: --batch-size must be at least 1, not 0"


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("realesrgan-x8", "unknown model 'realesrgan-x8': it is neither a model name (realesr-animevideov3,"),
        ("{tmp}/missing.pth", "model file {tmp}/missing.pth does not exist"),
        ("{tmp}", "model file {tmp} is not a regular file"),
    ],
)
def test_a_model_that_cannot_be_used_is_one_line_before_any_worker_starts(
    tmp_path: Path, model: str, reason: str
) -> None:
    source = tmp_path / "in.mp4"
    clips.video(source, frames=2)
    root = tmp_path / "root"
    model = model.format(tmp=tmp_path)
    result = esrfarm(
        "upscale", str(source), str(tmp_path / "out.mkv"), "--model", model, "--shared-root", str(root)
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("esrfarm upscale: error: "), (
        result.stderr
    )
    assert reason.format(tmp=tmp_path) in result.stderr
    assert not root.exists(), "nothing is started or written for a model that cannot be used"


def test_a_stage_without_a_count_shows_no_empty_bar() -> None:
    stream = _Terminal()
    show = ProgressDisplay(stream)
    show(Progress("loading model", 0, 0, 0.0, None))
    show.close()
    drawn = [part for part in stream.getvalue().split("\r") if part.strip()]
    assert drawn and all(part.startswith("loading model ... 00:00") for part in drawn), drawn
    assert "0/?" not in stream.getvalue() and "%|" not in stream.getvalue()


@pytest.mark.parametrize(
    ("result", "line"),
    [
        (JobResult("j", Path("o.mp4"), 1, False, {}), "1 frame in 2.0 s (0.50 fps end to end)"),
        (JobResult("j", Path("o.mp4"), 40, False, {}), "40 frames in 2.0 s (20.00 fps end to end)"),
        (
            JobResult("j", Path("o.mp4"), 40, True, {}, frames_found=30),
            "40 frames, resumed: 30 upscaled by an earlier run, 10 in this run's 2.0 s (5.00 fps end to end)",
        ),
    ],
)
def test_the_summary_line(result: JobResult, line: str) -> None:
    assert summary(result, 2.0) == line


def test_top_level_help_names_what_upscale_takes() -> None:
    result = esrfarm("--help")
    assert "upscale a video, an image or a folder of images" in result.stdout
    assert "one video file" not in result.stdout
