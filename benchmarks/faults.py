"""The slow half of the fault suite: random faults over many runs, one table of what they cost.

Every run upscales the same generated clip losslessly (FFV1, RGB) on a farm of real CPU workers
with the tiny seeded model, and a fault strikes at a random moment (seeded):

- ``worker SIGKILL`` / ``worker SIGSTOP``: one of the two workers, mid-job;
- ``coordinator SIGKILL`` / ``coordinator SIGTERM``: the coordinator, then the same command again;
- ``disk full``: the shared root is a small tmpfs that cannot hold the job (needs ``mount``; the
  row says so when this machine does not allow it), then the same command with room enough;
- ``concurrent jobs``: three jobs at once on the same two workers.

For each fault: runs, outputs correct (every frame equal to an uninterrupted run's), clear failures
(a non-zero exit with one ``error:`` line, no traceback), frames lost (in outputs that were written
but differ), leftovers (files beside the output other than the output itself).

    python benchmarks/faults.py --runs 5 --frames 120
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from coordinator.local_workers import spawn_worker, wait_listening  # noqa: E402
from media.extract import decode_frames  # noqa: E402
from tests import clips  # noqa: E402
from tests.model_factory import write_tiny_compact  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "gbrp"]


@dataclass
class Tally:
    fault: str
    runs: int = 0
    correct: int = 0
    clear_failures: int = 0
    frames_lost: int = 0
    leftovers: int = 0
    note: str = ""

    def row(self) -> str:
        return (
            f"| {self.fault} | {self.runs} | {self.correct} | {self.clear_failures} | {self.frames_lost} "
            f"| {self.leftovers} | {self.note} |"
        )


class Farm:
    """Two real CPU workers on one shared root; a killed or stopped one is replaced before the next run."""

    def __init__(self, root: Path, model: Path, logs: Path) -> None:
        self.root, self.model, self.logs = root, model, logs
        root.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        for index in range(2):
            self._start(index)

    def _start(self, index: int) -> None:
        port_file = self.logs / f"worker-{index}.json"
        log_file = self.logs / f"worker-{index}.log"
        args = ["--shared-root", str(self.root), "--model", str(self.model), "--device", "cpu"]
        args += ["--cpu-threads", "1", "--port", "0", "--warmup-size", "16", "--worker-id", f"w{index}"]
        process = spawn_worker(args, port_file=port_file, log_file=log_file, env=ENV, cwd=REPO)
        url = wait_listening(process, port_file, log_file, timeout_s=120)
        if index < len(self.processes):
            self.processes[index], self.urls[index] = process, url
        else:
            self.processes.append(process)
            self.urls.append(url)

    def heal(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is None and _state(process.pid) == "T":
                process.send_signal(signal.SIGCONT)
                process.kill()
            if process.poll() is None and _state(process.pid) != "Z":
                continue
            process.wait()
            self._start(index)

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            process.wait(timeout=60)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def upscale_command(source: Path, output: Path, root: Path, model: Path, urls: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output), "--model", str(model),
        "--workers", ",".join(urls), "--shared-root", str(root), "--scale", "2", "--batch-size", "4",
        "--unreachable-timeout", "2", "--max-disk", "2M", "--overwrite", *LOSSLESS,
    ]  # fmt: skip


def run_until(
    command: list[str], strike: Callable[[subprocess.Popen[str]], None] | None, at_s: float
) -> tuple[int, str]:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO
    )
    if strike is not None:
        deadline = time.monotonic() + at_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if process.poll() is None:
            strike(process)
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def judge(tally: Tally, code: int, stderr: str, output: Path, reference: list[np.ndarray]) -> None:
    tally.runs += 1
    tally.leftovers += len(list(output.parent.glob(f".{output.name}.*")))  # temporary files beside it
    if code == 0:
        got = list(decode_frames(output))
        same = len(got) == len(reference) and all(
            np.array_equal(a, b) for a, b in zip(got, reference, strict=True)
        )
        if same:
            tally.correct += 1
        else:
            tally.frames_lost += sum(
                1 for i, frame in enumerate(reference) if i >= len(got) or not np.array_equal(got[i], frame)
            )
        return
    lines = stderr.strip().splitlines()
    if lines and "error:" in lines[-1] and "Traceback" not in stderr:
        tally.clear_failures += 1
    assert not output.exists() or code == 0, "a failed run left an output"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[bool]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(path)], capture_output=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per fault (default %(default)s)")
    parser.add_argument("--frames", type=int, default=120, help="frames of the clip (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    return parser


@dataclass
class Bench:
    """What every fault's runs share: the clip, the farm, the uninterrupted run's frames and time."""

    work: Path
    source: Path
    output: Path
    root: Path
    model: Path
    logs: Path
    farm: Farm
    runs: int
    rng: random.Random
    reference: list[np.ndarray]
    clean_s: float

    def command(self, root: Path | None = None, farm: Farm | None = None) -> list[str]:
        farm = farm or self.farm
        return upscale_command(self.source, self.output, root or self.root, self.model, farm.urls)

    def at(self) -> float:
        """A random moment of an uninterrupted run."""
        return self.rng.uniform(0.1, 0.9) * self.clean_s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="esrfarm-faults-"))
    model = write_tiny_compact(work / "tiny.pth")
    out_dir = work / "out"
    out_dir.mkdir()
    source = clips.video(out_dir / "in.mp4", size="64x36", frames=args.frames)
    root = work / "root"
    logs = work / "logs"
    logs.mkdir()
    farm = Farm(root, model, logs)
    output = out_dir / "out.mkv"
    tallies: list[Tally] = []
    clean_s = 0.0
    try:
        started = time.monotonic()
        code, stderr = run_until(upscale_command(source, output, root, model, farm.urls), None, 0)
        assert code == 0, stderr
        clean_s = time.monotonic() - started
        reference = list(decode_frames(output))
        output.unlink()
        print(f"uninterrupted run: {clean_s:.1f} s, {len(reference)} frames", file=sys.stderr)
        bench = Bench(
            work,
            source,
            output,
            root,
            model,
            logs,
            farm,
            args.runs,
            random.Random(args.seed),
            reference,
            clean_s,
        )
        tallies += worker_faults(bench) + coordinator_faults(bench) + disk_full(bench)
        tallies.append(concurrent_jobs(bench, out_dir, args.frames))
    finally:
        farm.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"Commit {commit()}, {os.cpu_count()} CPUs, {args.runs} runs per fault, {args.frames} frames")
    print(f"seed {args.seed}, an uninterrupted run takes {clean_s:.1f} s")
    print("| fault | runs | outputs correct | clear failures | frames lost | leftovers | note |")
    print("|---|---|---|---|---|---|---|")
    for tally in tallies:
        print(tally.row())
    return 0


def worker_faults(bench: Bench) -> list[Tally]:
    """One of the two workers SIGKILLed or SIGSTOPped mid-job."""
    tallies = []
    for name, sig in (("worker SIGKILL", signal.SIGKILL), ("worker SIGSTOP", signal.SIGSTOP)):
        tally = Tally(name)
        for _ in range(bench.runs):
            victim = bench.farm.processes[bench.rng.randrange(2)]
            code, stderr = run_until(
                bench.command(), lambda _p, v=victim, s=sig: v.send_signal(s), bench.at()
            )
            judge(tally, code, stderr, bench.output, bench.reference)
            bench.output.unlink(missing_ok=True)
            bench.farm.heal()
        tallies.append(tally)
    return tallies


def coordinator_faults(bench: Bench) -> list[Tally]:
    """The coordinator SIGKILLed or SIGTERMed mid-job, then the same command again."""
    tallies = []
    for name, sig in (
        ("coordinator SIGKILL, rerun", signal.SIGKILL),
        ("coordinator SIGTERM, rerun", signal.SIGTERM),
    ):
        tally = Tally(name)
        for _ in range(bench.runs):
            command = bench.command()
            code, _ = run_until(command, lambda p, s=sig: p.send_signal(s), bench.at())
            if code != 0:
                code, stderr = run_until(command, None, 0)
            judge(tally, code, stderr if code else "", bench.output, bench.reference)
            bench.output.unlink(missing_ok=True)
            bench.farm.heal()
        tallies.append(tally)
    return tallies


def disk_full(bench: Bench) -> list[Tally]:
    """A shared root too small for the job (a tmpfs), then the same command with room enough."""
    full, room = Tally("disk full"), Tally("... then room: the same command")
    small = bench.work / "small"
    with tmpfs(small, "160k") as mounted:
        if not mounted:
            full.note = room.note = "not run: this machine does not allow mount"
            return [full, room]
        small_farm = Farm(small, bench.model, bench.logs)
        try:
            for _ in range(bench.runs):
                subprocess.run(["mount", "-o", "remount,size=160k", str(small)], check=True)
                command = bench.command(small, small_farm)
                code, stderr = run_until(command, None, 0)
                judge(full, code, stderr, bench.output, bench.reference)
                subprocess.run(["mount", "-o", "remount,size=256M", str(small)], check=True)
                code, stderr = run_until(command, None, 0)
                judge(room, code, stderr, bench.output, bench.reference)
                bench.output.unlink(missing_ok=True)
                small_farm.heal()
        finally:
            small_farm.stop()
    return [full, room]


def concurrent_jobs(bench: Bench, out_dir: Path, frames: int) -> Tally:
    """Three jobs at once on the same two workers."""
    tally = Tally("three concurrent jobs")
    sources = [clips.video(out_dir / f"c{i}.mp4", size="64x36", frames=frames // 2 + i) for i in range(3)]
    outputs = [out_dir / f"c{i}.mkv" for i in range(3)]
    commands = [
        upscale_command(src, out, bench.root, bench.model, bench.farm.urls)
        for src, out in zip(sources, outputs, strict=True)
    ]
    references = []
    for command, out in zip(commands, outputs, strict=True):
        code, stderr = run_until(command, None, 0)
        assert code == 0, stderr
        references.append(list(decode_frames(out)))
        out.unlink()
    for _ in range(bench.runs):
        processes = [
            subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO
            )
            for command in commands
        ]
        for process, out, ref in zip(processes, outputs, references, strict=True):
            _, stderr = process.communicate(timeout=600)
            judge(tally, process.returncode, stderr, out, ref)
            out.unlink(missing_ok=True)
    return tally


if __name__ == "__main__":
    raise SystemExit(main())
