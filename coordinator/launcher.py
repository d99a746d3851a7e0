"""Start and stop N workers on a host without systemd (behind ``scripts/start_workers.sh``).

``start N``: worker ``i`` gets ``CUDA_VISIBLE_DEVICES=i`` (unless ``--cpu``) and port
``base_port + i`` (any free port when the base port is 0), logs to ``<run_dir>/worker-<i>.log``;
once every ``/health`` answers 200 the PIDs and URLs go to ``<run_dir>/workers.json``. If one
worker exits or does not get healthy in time, the others are stopped and the exit status is 1.

``stop``: SIGTERM to every recorded worker (each finishes its batch in flight), SIGKILL after
the timeout, then ``workers.json`` is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from coordinator.errors import CoordinatorError, WorkerStartError
from coordinator.local_workers import (
    LocalWorkerProcess,
    answers_health,
    log_tail,
    spawn_worker,
    wait_all_listening,
)
from manifests import write_json_atomic

PID_FILE = "workers.json"


class LaunchError(CoordinatorError, RuntimeError):
    """Workers could not be started or stopped; the message says which and why."""


def default_run_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "esrfarm"
    return Path("/tmp") / f"esrfarm-{os.getuid()}"


def start(
    count: int,
    worker_args: Sequence[str],
    *,
    run_dir: Path,
    base_port: int,
    cpu: bool,
    health_timeout_s: float,
    poll_s: float = 0.2,
) -> list[dict[str, object]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file = run_dir / PID_FILE
    if pid_file.exists():
        alive = [w for w in _recorded(pid_file) if _is_worker(int(w["pid"]))]  # type: ignore[call-overload]
        if alive:
            raise LaunchError(
                f"{len(alive)} worker(s) recorded in {pid_file} are still running; stop them first"
            )
        pid_file.unlink()
    launched: list[LocalWorkerProcess] = []
    try:
        for index in range(count):
            launched.append(_spawn(index, worker_args, run_dir, base_port, cpu))
        _wait_healthy(launched, health_timeout_s, poll_s)
    except BaseException:
        for item in launched:
            _terminate(item.process.pid, timeout_s=30.0)
        raise
    records: list[dict[str, object]] = [
        {"index": w.index, "pid": w.process.pid, "url": w.url, "log": str(w.log_file)} for w in launched
    ]
    write_json_atomic(pid_file, json.dumps({"workers": records}, indent=2).encode() + b"\n")
    return records


def _spawn(
    index: int, worker_args: Sequence[str], run_dir: Path, base_port: int, cpu: bool
) -> LocalWorkerProcess:
    log = run_dir / f"worker-{index}.log"
    port_file = run_dir / f"worker-{index}.port.json"
    env = dict(os.environ)
    args = [*worker_args, "--port", str(base_port + index if base_port else 0)]
    if cpu:
        args += ["--device", "cpu"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    # They outlive this script: their own session, and no death signal tied to it.
    process = spawn_worker(
        args, port_file=port_file, log_file=log, env=env, die_with_parent_process=False, new_session=True
    )
    return LocalWorkerProcess(index, process, port_file=port_file, log_file=log)


def _wait_healthy(launched: list[LocalWorkerProcess], timeout_s: float, poll_s: float) -> None:
    healthy: set[int] = set()

    def report(item: LocalWorkerProcess) -> None:
        print(f"worker {item.index}: {item.url} (pid {item.process.pid})", flush=True)
        healthy.add(item.index)

    try:
        wait_all_listening(
            launched, timeout_s=timeout_s, poll_s=poll_s, ready=answers_health, on_ready=report
        )
    except WorkerStartError as exc:
        item = next(w for w in launched if w.index == exc.index)
        code = item.process.returncode
        if code is not None:
            tail = log_tail(item.log_file, 20, "\n") or "(no log)"
            raise LaunchError(f"worker {item.index} exited with status {code}:\n{tail}") from None
        pending = [w for w in launched if w.index not in healthy]
        names = ", ".join(str(w.index) for w in pending)
        raise LaunchError(
            f"worker(s) {names} not healthy after {timeout_s:g}s; see {pending[0].log_file}"
        ) from None


def stop(*, run_dir: Path, timeout_s: float) -> int:
    pid_file = run_dir / PID_FILE
    if not pid_file.exists():
        print(f"no workers recorded in {pid_file}", flush=True)
        return 0
    stopped = 0
    for record in _recorded(pid_file):
        pid = int(record["pid"])  # type: ignore[call-overload]
        if _is_worker(pid):
            code = _terminate(pid, timeout_s=timeout_s)
            how = "cleanly" if code == 0 else f"by SIGKILL after {timeout_s:g}s"
            print(f"worker {record['index']} (pid {pid}) stopped {how}", flush=True)
            stopped += 1
    pid_file.unlink(missing_ok=True)
    return stopped


def _recorded(pid_file: Path) -> list[dict[str, object]]:
    try:
        workers = json.loads(pid_file.read_text())["workers"]
    except (OSError, ValueError, KeyError) as exc:
        raise LaunchError(f"{pid_file} is not a workers file: {exc}") from None
    return list(workers)


def _is_worker(pid: int) -> bool:
    """True if ``pid`` is alive and is an esrfarm worker (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc here: trust the record
    return b"worker" in cmdline


def _terminate(pid: int, *, timeout_s: float) -> int:
    """SIGTERM, wait, SIGKILL. Returns 0 if it exited on SIGTERM, 1 if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return 0
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return 1


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False  # a zombie waiting for a parent that is not us
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="start_workers.sh / stop_workers.sh", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start N workers and wait until each is healthy")
    up.add_argument("count", type=int, help="number of workers (one per GPU)")
    up.add_argument(
        "--base-port", type=int, default=8090, help="worker i listens on base + i; 0: any free port"
    )
    up.add_argument("--cpu", action="store_true", help="run the workers on the CPU (no CUDA_VISIBLE_DEVICES)")
    up.add_argument("--health-timeout", type=float, default=600.0, help="seconds to wait for every /health")
    down = sub.add_parser("stop", help="stop the workers recorded in the run directory")
    down.add_argument("--timeout", type=float, default=120.0, help="seconds before SIGKILL")
    for p in (up, down):
        p.add_argument(
            "--run-dir", type=Path, default=default_run_dir(), help="PID file and logs (%(default)s)"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "start":
            if args.count < 1:
                parser.error("the number of workers must be at least 1")
            if rest and rest[0] == "--":
                rest = rest[1:]
            records = start(
                args.count,
                rest,
                run_dir=args.run_dir,
                base_port=args.base_port,
                cpu=args.cpu,
                health_timeout_s=args.health_timeout,
            )
            print(f"{len(records)} worker(s) healthy; PIDs in {args.run_dir / PID_FILE}", flush=True)
            return 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        stop(run_dir=args.run_dir, timeout_s=args.timeout)
        return 0
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
