"""The esrfarm command itself: dispatch to the worker side, help, progress display."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import ProgressPrinter
from coordinator.job import JobProgress
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


def test_progress_bar_on_a_terminal() -> None:
    stream = _Terminal()
    show = ProgressPrinter(stream)
    show(JobProgress("upscale", 8, 32, 4.0, 6.0))
    show(JobProgress("upscale", 32, 32, 4.0, 0.0))
    text = stream.getvalue()
    assert "\r[" + "#" * 7 + "." * 23 + "] upscale  8/32 frames  4.00 fps  ETA 6s\x1b[K\r" in text
    assert text.endswith("upscale  32/32 frames  4.00 fps  ETA 0s\x1b[K\n")


def test_progress_lines_in_a_log(caplog: pytest.LogCaptureFixture) -> None:
    show = ProgressPrinter(io.StringIO(), interval_s=3600)
    with caplog.at_level(logging.INFO, logger="esrfarm"):
        show(JobProgress("extract", 1, 10, 5.0, 1.8))
        show(JobProgress("extract", 5, 10, 5.0, 1.0))  # within the interval: not logged
        show(JobProgress("upscale", 0, 10, 0.0, None))  # a new stage is logged at once
        show(JobProgress("upscale", 10, 10, 2.0, 0.0))  # so is the end
    assert [r.getMessage() for r in caplog.records] == [
        "progress: extract  1/10 frames  5.00 fps  ETA 2s",
        "progress: upscale  0/10 frames  0.00 fps  ETA ?",
        "progress: upscale  10/10 frames  2.00 fps  ETA 0s",
    ]
