"""The systemd units: templated by GPU index, and their command line is one the worker takes.

``systemd-analyze verify`` runs on them in CI (.ci/verify_units.py), outside this suite, so that the
README's test command needs no system package.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from worker.cli import build_parser, settings_from_args

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
VENV_PYTHON = "/opt/esrfarm/venv/bin/python"


def unit_lines(name: str) -> list[str]:
    """The unit's directives, comments dropped and continuation lines joined."""
    text = (UNITS / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def directive(name: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_lines(name) if line.split("=", 1)[0] == key]


def test_worker_unit_is_templated_by_gpu_index() -> None:
    name = "esrfarm-worker@.service"
    environment = directive(name, "Environment")
    assert "CUDA_VISIBLE_DEVICES=%i" in environment
    assert directive(name, "EnvironmentFile") == ["/etc/esrfarm/worker.env"]
    assert directive(name, "Restart") == ["on-failure"]
    assert directive(name, "StandardError") == ["journal"]
    assert directive(name, "WantedBy") == ["esrfarm-workers.target"]
    assert directive(name, "PartOf") == ["esrfarm-workers.target"]
    [exec_start] = directive(name, "ExecStart")
    assert exec_start.startswith(f"{VENV_PYTHON} -m worker ")


@pytest.mark.parametrize("index", [0, 3])
def test_exec_start_is_a_command_line_the_worker_accepts(index: int, tmp_path: Path) -> None:
    """Expand ExecStart the way systemd does with the example environment file; port = base + index."""
    env = dict(line.split("=", 1) for line in unit_lines("worker.env.example"))
    for line in directive("esrfarm-worker@.service", "Environment"):
        env.setdefault(*line.split("=", 1))
    env["ESRFARM_SHARED_ROOT"] = str(tmp_path)
    [exec_start] = directive("esrfarm-worker@.service", "ExecStart")
    command = exec_start.replace("%i", str(index)).replace("%H", "gpu-host")
    command = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env[m.group(1)]), command)
    command = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], command)  # $VAR: split on whitespace
    argv = shlex.split(command)
    assert argv[:3] == [VENV_PYTHON, "-m", "worker"]

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        settings = settings_from_args(build_parser().parse_args(argv[3:]))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert settings.port == int(env["ESRFARM_BASE_PORT"]) + index
    assert settings.worker_id == f"gpu-host-gpu{index}"
    assert settings.shared_root == tmp_path and settings.model == env["ESRFARM_MODEL"]
    assert settings.host == "127.0.0.1" and settings.device_spec == "auto"
