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

from service.cli import EXIT_DATABASE, serve_parser
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


def exec_start_argv(
    unit: str, env_file: str, index: int = 0, **overrides: str
) -> tuple[list[str], dict[str, str]]:
    """ExecStart expanded the way systemd does, with the example environment file; and that environment."""
    env = dict(line.split("=", 1) for line in unit_lines(env_file))
    for line in directive(unit, "Environment"):
        env.setdefault(*line.split("=", 1))
    env.update(overrides)
    [exec_start] = directive(unit, "ExecStart")
    command = exec_start.replace("%i", str(index)).replace("%H", "gpu-host")
    command = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env[m.group(1)]), command)
    command = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], command)  # $VAR: split on whitespace
    return shlex.split(command), env


@pytest.mark.parametrize("index", [0, 3])
def test_exec_start_is_a_command_line_the_worker_accepts(index: int, tmp_path: Path) -> None:
    """Port = base + index."""
    argv, env = exec_start_argv(
        "esrfarm-worker@.service", "worker.env.example", index, ESRFARM_SHARED_ROOT=str(tmp_path)
    )
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


def test_service_unit_runs_esrfarm_serve_after_the_workers() -> None:
    name = "esrfarm-service.service"
    assert directive(name, "EnvironmentFile") == ["/etc/esrfarm/service.env"]
    assert "esrfarm-workers.target" in directive(name, "After")[0].split()
    assert directive(name, "Restart") == ["on-failure"]
    # esrfarm serve's exit statuses for bad settings and for a database it cannot use
    assert directive(name, "RestartPreventExitStatus") == [f"2 {EXIT_DATABASE}"]
    assert directive(name, "KillSignal") == ["SIGTERM"]  # running jobs go back to the queue
    assert directive(name, "WantedBy") == ["multi-user.target"]


def test_service_exec_start_is_a_command_line_esrfarm_serve_accepts() -> None:
    argv, env = exec_start_argv("esrfarm-service.service", "service.env.example")
    assert argv[:4] == [VENV_PYTHON, "-m", "service", "serve"]
    args = serve_parser().parse_args(argv[4:])
    assert args.shared_root == Path(env["ESRFARM_SHARED_ROOT"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)
    assert args.workers == "http://127.0.0.1:8090,http://127.0.0.1:8091"  # the example's two workers
    assert args.input_root == [Path("/srv/videos")] and args.token_file is None
