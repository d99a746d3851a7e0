"""Frames against segments (``--transport``): what crosses the shared storage, and whose CPU works.

In one run, on the same clip, against the same two stand-in workers (``--simulate-latency-ms 0``:
no model, a nearest-neighbour resize), ``esrfarm upscale`` once per transport, and for each:

- **bytes written to the shared root per output frame**: ``write_bytes`` of ``/proc/<pid>/io``
  (bytes a process sent to a block device's page cache, frames deleted before writeback
  included) of the coordinator with every child it reaped (ffmpeg: read as this process's own
  counter once it reaped the coordinator, which adds its children's and theirs to it) and of
  each worker with its reaped children. The shared root is a directory on a disk; the output,
  the worker logs and the coordinator's stderr go to tmpfs (``/dev/shm``) or a pipe, which
  ``write_bytes`` does not count, so what is counted is what went to the shared root;
- **CPU seconds per frame**: the coordinator's from ``os.wait4`` (its whole process tree), the
  workers' from ``/proc/<pid>/stat`` (user + system, their reaped children's included);
- **projected frames per second for 1, 4 and 16 hosts behind one 10 GbE storage link** (1.25 GB/s
  shared by every host): ``min(hosts x host fps, 1.25e9 / (2 x bytes written per frame),
  coordinator limit)``. Every file written to the shared root is read back once by the other
  side (frames by the workers and the coordinator, segments by the join), hence 2x. A host's fps
  is ``--gpu-fps`` (its GPU: an assumption, there is no GPU here) or what ``--host-cores`` give
  at the workers' CPU per frame, whichever is lower; the coordinator's limit is
  ``--coordinator-cores`` over its CPU per frame.

Prints one JSON document and, with ``--markdown``, the RESULTS.md rows.

    python benchmarks/transport.py ../shared/media/bigbuckbunny.mp4 --markdown
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.gpu_rate import make_clip  # noqa: E402
from benchmarks.model_throughput import commit  # noqa: E402
from benchmarks.pipeline import start_workers, wait_ready  # noqa: E402

LINK_BYTES_PER_S = 1.25e9  # 10 GbE
HOSTS = (1, 4, 16)
TRANSPORTS = ("frames", "segments")


def write_bytes(pid: int | str = "self") -> int:
    """``write_bytes`` of ``/proc/<pid>/io``: what it (and every child it reaped) sent to block storage."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "write_bytes":
            return int(value)
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a running process and of the children it reaped (utime, stime, cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_job(command: list[str]) -> tuple[float, int]:
    """Run the coordinator to its end: (CPU seconds of its process tree, bytes its tree wrote)."""
    before = write_bytes()
    process = subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"esrfarm upscale failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return usage.ru_utime + usage.ru_stime, write_bytes() - before


def measure(
    transport: str,
    clip: Path,
    frames: int,
    root: Path,
    pids: list[int],
    urls: list[str],
    args: argparse.Namespace,
) -> dict[str, float]:
    output = args.out / f"out-{transport}.mp4"
    command = [
        sys.executable, "-m", "coordinator.cli", "upscale", str(clip), str(output), "--overwrite",
        "--model", "bench", "--scale", str(args.scale), "--workers", ",".join(urls),
        "--shared-root", str(root),
        "--transport", transport, "--codec", "libx264", "--preset", args.preset, "-q",
    ]  # fmt: skip
    workers_cpu = [tree_cpu(pid) for pid in pids]
    workers_written = [write_bytes(pid) for pid in pids]
    coordinator_cpu, coordinator_written = run_job(command)
    worker_cpu = sum(tree_cpu(pid) - before for pid, before in zip(pids, workers_cpu, strict=True))
    worker_written = sum(write_bytes(pid) - before for pid, before in zip(pids, workers_written, strict=True))
    output.unlink()
    return {
        "bytes_per_frame": (coordinator_written + worker_written) / frames,
        "coordinator_bytes_per_frame": coordinator_written / frames,
        "worker_bytes_per_frame": worker_written / frames,
        "coordinator_cpu_s_per_frame": coordinator_cpu / frames,
        "worker_cpu_s_per_frame": worker_cpu / frames,
    }


def project(result: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """Frames per second for N hosts behind one 10 GbE link (see the module docstring)."""
    link = LINK_BYTES_PER_S / max(2 * result["bytes_per_frame"], 1.0)  # each file is read back once
    coordinator = args.coordinator_cores / max(result["coordinator_cpu_s_per_frame"], 1e-9)
    host = min(args.gpu_fps, args.host_cores / max(result["worker_cpu_s_per_frame"], 1e-9))
    return {str(hosts): round(min(hosts * host, link, coordinator), 1) for hosts in HOSTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("video")
    parser.add_argument("--size", default="1280x720", help="the clip's size (WxH) before the x2 upscale")
    parser.add_argument("--frames", type=int, default=66)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--preset", default="veryfast", help="libx264 preset of the output (both transports)")
    parser.add_argument("--gpu-fps", type=float, default=30.0, help="one host's GPU rate for the projection")
    parser.add_argument("--host-cores", type=int, default=16)
    parser.add_argument("--coordinator-cores", type=int, default=16)
    parser.add_argument("--work", type=Path, help="a directory on a disk (default: a new one under $TMPDIR)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-transport-"))
    args.out = Path(tempfile.mkdtemp(prefix="esrfarm-transport-", dir="/dev/shm"))
    root, logs = work / "root", args.out / "logs"
    root.mkdir(parents=True, exist_ok=True)
    logs.mkdir()
    clip = make_clip(Path(args.video), args.size, args.frames, work / f"clip-{args.size}.mp4")
    processes = start_workers(2, root, "bench", ["--simulate-latency-ms", "0", "--device", "cpu"], logs)
    try:
        urls = wait_ready(logs, 2)
        pids = [process.pid for process in processes]
        results = {t: measure(t, clip, args.frames, root, pids, urls, args) for t in TRANSPORTS}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=120)
        shutil.rmtree(args.out, ignore_errors=True)
    report = {
        "commit": commit(),
        "clip": f"{args.video} at {args.size}, {args.frames} frames, x{args.scale}, libx264 {args.preset}",
        "projection": {"gpu_fps": args.gpu_fps, "host_cores": args.host_cores,
                       "coordinator_cores": args.coordinator_cores, "link_bytes_per_s": LINK_BYTES_PER_S},
        "transports": {t: {**r, "projected_fps": project(r, args)} for t, r in results.items()},
    }  # fmt: skip
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    if args.markdown:
        for transport, r in report["transports"].items():  # type: ignore[attr-defined]
            fps = r["projected_fps"]
            written = r["bytes_per_frame"] / 1e6
            coordinator_ms, worker_ms = (
                r["coordinator_cpu_s_per_frame"] * 1e3,
                r["worker_cpu_s_per_frame"] * 1e3,
            )
            print(
                f"| {transport} | {written:.3f} MB | {coordinator_ms:.1f} ms | {worker_ms:.1f} ms "
                f"| {fps['1']} | {fps['4']} | {fps['16']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
