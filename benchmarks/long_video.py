"""A long video through the whole pipeline: wall time, peak disk, memory of every process over time.

Generates a video (default 2 hours of 160x90 at 30 fps, with audio), writes a tiny seeded model,
runs ``esrfarm upscale`` on local CPU workers, and samples once a second: the bytes in the job
directory (frames and segments) and the RSS of the coordinator and of each worker. Prints one JSON
line: wall time, peak disk, RSS (at 10/50/90%, the median of each tenth of the run, and the growth
per frame from the 2nd to the 9th tenth); checks the output frame count.

    python benchmarks/long_video.py --minutes 120 --size 160x90 --workers 2 --max-disk 256M
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from media.ffmpeg import run_ffmpeg  # noqa: E402
from media.probe import probe  # noqa: E402
from tests.model_factory import write_tiny_compact  # noqa: E402


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def tree_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--size", default="160x90")
    parser.add_argument("--rate", default="30")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-disk", default="256M")
    parser.add_argument("--frame-format", default="npy", choices=["png", "npy"])
    parser.add_argument("--scale", default="2")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-long-"))
    work.mkdir(parents=True, exist_ok=True)
    source = make_source(work, args.size, args.rate, args.minutes)
    frames = probe(source).frame_count
    model = write_tiny_compact(work / "tiny.pth")
    root = work / "root"
    output = work / "out.mp4"
    command = [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output), "--overwrite",
        "--model", str(model), "--scale", args.scale, "--shared-root", str(root),
        "--local-workers", str(args.workers), "--worker-arg=--cpu-threads=1", "--max-disk", args.max_disk,
        "--frame-format", args.frame_format, "--preset", "ultrafast", "-q",
    ]  # fmt: skip
    returncode, stderr, wall, samples = run_sampled(command, root)
    if returncode != 0:
        sys.stderr.write(stderr)
        return returncode
    out_frames = probe(output).frame_count
    record = {
        "benchmark": "long_video",
        "input": f"{args.size} {args.rate} fps, {args.minutes:g} min",
        "frames": frames,
        "output_frames": out_frames,
        "frame_count_ok": out_frames == frames,
        "workers": args.workers,
        "max_disk": args.max_disk,
        "frame_format": args.frame_format,
        "wall_s": round(wall, 1),
        "fps": round(frames / wall, 1),
        **summarise(samples, frames),
        "commit": commit(),
    }
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    (work / "long_video_samples.json").write_bytes(orjson.dumps(samples))
    return 0 if out_frames == frames else 1


def make_source(work: Path, size: str, rate: str, minutes: float) -> Path:
    """The test video (testsrc2 and a sine), generated unless ``work`` holds it from an earlier run."""
    source = work / f"long-{minutes:g}min.mp4"
    seconds = minutes * 60
    if not source.exists():
        started = time.monotonic()
        run_ffmpeg(
            [
                "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}",
                "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
                "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-b:a", "32k", str(source),
            ],
            action="generating the long test video",
        )  # fmt: skip
        sys.stderr.write(f"generated {source} in {time.monotonic() - started:.0f} s\n")
    return source


Sample = dict[str, object]


def run_sampled(command: list[str], root: Path) -> tuple[int, str, float, list[Sample]]:
    """Run the coordinator ``command`` on the shared ``root``, sampling once a second the bytes in
    its job directories and the RSS of the coordinator and its workers: (exit code, stderr, wall
    seconds, samples)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    samples: list[Sample] = []

    def sample() -> None:
        while process.poll() is None:
            workers = [p for p in children(process.pid) if "worker" in _cmdline(p)]
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "disk": tree_bytes(root / "jobs"),
                    "frame_data": sum(
                        tree_bytes(job / sub)
                        for job in (root / "jobs").glob("*")
                        for sub in ("input", "output")
                    ),
                    "coordinator_rss": rss_bytes(process.pid),
                    "worker_rss": [rss_bytes(p) for p in workers],
                }
            )
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - started
    sampler.join(timeout=5)
    return process.returncode, stderr, wall, samples


def summarise(samples: list[Sample], frames: int) -> dict[str, object]:
    """Peak disk and RSS, RSS at 10/50/90% of the run, its median by tenth and its growth per frame."""
    coordinator_medians = median_by_tenth(samples, "coordinator_rss")
    worker_medians = median_by_tenth(samples, "worker_rss")
    return {
        "peak_job_dir_bytes": max((int(s["disk"]) for s in samples), default=0),  # type: ignore[call-overload]
        "peak_frame_data_bytes": max((int(s["frame_data"]) for s in samples), default=0),  # type: ignore[call-overload]
        "coordinator_rss_at_10_50_90_pct": [rss_at(samples, f, "coordinator_rss") for f in (0.1, 0.5, 0.9)],
        "worker_rss_at_10_50_90_pct": [rss_at(samples, f, "worker_rss") for f in (0.1, 0.5, 0.9)],
        "coordinator_rss_median_by_tenth": coordinator_medians,
        "worker_rss_median_by_tenth": worker_medians,
        "coordinator_rss_growth_bytes_per_frame": growth_per_frame(coordinator_medians, frames),
        "worker_rss_growth_bytes_per_frame": growth_per_frame(worker_medians, frames),
        "peak_coordinator_rss": max((s["coordinator_rss"] or 0 for s in samples), default=0),  # type: ignore[type-var]
        "peak_worker_rss": max((max(s["worker_rss"] or [0]) for s in samples), default=0),  # type: ignore[type-var,arg-type]
    }


def rss_at(samples: list[Sample], fraction: float, key: str) -> object:
    if not samples:
        return None
    return samples[min(len(samples) - 1, int(fraction * len(samples)))][key]


def median_by_tenth(samples: list[Sample], key: str) -> list[int | None]:
    """The median RSS in each tenth of the run (for workers: of the largest worker's RSS).

    Medians, because RSS moves by a few MB from second to second as buffers come and go; the
    first tenth holds start-up (model load, planning) and the last the join.
    """
    medians: list[int | None] = []
    for tenth in range(10):
        values = []
        for s in samples[tenth * len(samples) // 10 : (tenth + 1) * len(samples) // 10]:
            value = s[key]
            if isinstance(value, list):
                value = max(value) if value and None not in value else None
            if value is not None:
                values.append(int(value))  # type: ignore[call-overload]
        medians.append(sorted(values)[len(values) // 2] if values else None)
    return medians


def growth_per_frame(medians: list[int | None], frames: int) -> float | None:
    """RSS growth from the 2nd to the 9th tenth of the run, in bytes per frame processed."""
    first, last = medians[1], medians[8]
    if first is None or last is None:
        return None
    return round((last - first) / (frames * 7 / 10), 2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
