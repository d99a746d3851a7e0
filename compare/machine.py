"""Where a comparison ran: host, CPU, device, library versions and the esrfarm commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from compare.results import Machine
from media.ffmpeg import ffmpeg_version

_REPO = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 10.0


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def esrfarm_commit() -> str:
    """``git describe --always --dirty`` of the checkout esrfarm runs from, else ``unknown``."""
    try:
        result = subprocess.run(
            ["git", "-C", str(_REPO), "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def describe_machine(device: str, precision: str | None) -> Machine:
    return Machine(
        host=platform.node(),
        cpu=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        device=device,
        precision=precision,
        torch=_version("torch"),
        ffmpeg=ffmpeg_version(),
        esrfarm=_version("esrfarm") or "unknown",
        commit=esrfarm_commit(),
    )
