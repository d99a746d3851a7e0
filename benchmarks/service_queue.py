"""How many jobs should the service run at once? A queue of short clips on fixed-latency workers.

8 short clips are queued at once (one ``POST /api/jobs``) on a service over 2 benchmark workers
(``--simulate-latency-ms``: every frame costs the same time and no CPU, as a GPU would), for each
``--max-running`` K; then the same clips are upscaled one after another with ``esrfarm upscale``.
Each run gives its total time (submit to the last job done; for the sequential run, the first
command's start to the last one's end) and the workers' idle fraction: 1 - (seconds the workers
spent computing, from their Prometheus sums) / (workers x total time). One JSON line per run, then
the ratios against the sequential run and against K=1.

    python benchmarks/service_queue.py --clips 8 --frames 64 --size 320x180 --latency-ms 50 \\
        --max-running 1 2 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path, where its name would hide the
# standard library's queue module (which torch and others import): put the repository there instead.
if sys.path and Path(sys.path[0]).resolve() == REPO / "benchmarks":
    sys.path[0] = str(REPO)
else:
    sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from benchmarks.pipeline import metric_sums, running_workers, time_upscale  # noqa: E402
from media.ffmpeg import run_ffmpeg  # noqa: E402
from tests.serviceutil import FAST, start_service  # noqa: E402

MODEL = "simulated"


def computing_s(urls: list[str]) -> float:
    """Seconds the workers have spent computing (the stand-in for the GPU) since they started."""
    return sum(metric_sums(url).get("compute", 0.0) for url in urls)


def make_clips(folder: Path, count: int, frames: int, size: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"clip-{index}.mp4"
        run_ffmpeg(
            ["-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25,hue=h={index * 40}",
             "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
             str(path)],
            action="generating a queue clip",
        )  # fmt: skip
        paths.append(path)
    return paths


def run_queue(work: Path, root: Path, urls: list[str], clips: list[Path], k: int) -> dict[str, Any]:
    """The clips (each its own content, so its own job) queued at once on a fresh service (its own
    database) with ``--max-running k``."""
    args = ["--workers", ",".join(urls), "--input-root", clips[0].parent, "--max-running", str(k),
            "--db", work / f"jobs-k{k}.db", "--output-dir", work / f"out-k{k}"]  # fmt: skip
    service = start_service(root, work / "logs", args)
    try:
        busy_before = computing_s(urls)
        started = time.perf_counter()
        batch = service.submit(inputs=[str(p) for p in clips], models=[MODEL], scales=[2])
        ids = [job["id"] for job in batch["jobs"]]
        while True:
            jobs = [service.job(job_id) for job_id in ids]
            if all(job["state"] in ("done", "failed", "cancelled") for job in jobs):
                break
            time.sleep(0.05)
        total_s = time.perf_counter() - started
        busy_s = computing_s(urls) - busy_before
    finally:
        service.stop()
    failed = [job for job in jobs if job["state"] != "done"]
    assert not failed, f"jobs did not finish: {failed}\n{service.log()}"
    return {"run": f"service --max-running {k}", "max_running": k, "total_s": total_s, "busy_s": busy_s}


def run_sequential(work: Path, root: Path, urls: list[str], clips: list[Path]) -> dict[str, Any]:
    """The same clips, one ``esrfarm upscale`` after another."""
    busy_before = computing_s(urls)
    started = time.perf_counter()
    for path in clips:
        output = work / "out-sequential" / path.name
        output.parent.mkdir(parents=True, exist_ok=True)
        time_upscale(path, output, urls, root, MODEL, "2", "--preset", FAST["preset"])
    total_s = time.perf_counter() - started
    return {"run": "esrfarm upscale, one after another", "max_running": None, "total_s": total_s,
            "busy_s": computing_s(urls) - busy_before}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=64, help="frames per clip")
    parser.add_argument("--size", default="320x180")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="each worker's time per frame")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-running", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-queue-"))
    work.mkdir(parents=True, exist_ok=True)
    clips = make_clips(work / "clips", args.clips, args.frames, args.size)
    root = work / "root"
    latency = ["--simulate-latency-ms", f"{args.latency_ms:g}"]
    ideal_busy_s = args.clips * args.frames * args.latency_ms / 1000
    records = []
    with running_workers(args.workers, root, MODEL, latency, work / "worker-logs") as urls:
        runs = [run_sequential(work, root, urls, clips)]
        runs += [run_queue(work, root, urls, clips, k) for k in args.max_running]
    sequential_s = runs[0]["total_s"]
    first_queue_s = runs[1]["total_s"] if len(runs) > 1 else None
    for run in runs:
        total_s, k = run["total_s"], run["max_running"]
        record = {
            "benchmark": "queue",
            **run,
            "total_s": round(total_s, 2),
            "busy_s": round(run["busy_s"], 2),
            "idle_fraction": round(1 - run["busy_s"] / (args.workers * total_s), 3),
            "speedup_vs_sequential": round(sequential_s / total_s, 2),
            "speedup_vs_k1": round(first_queue_s / total_s, 2) if first_queue_s and k else None,
            "ideal_s": round(ideal_busy_s / args.workers, 2),
            "clips": args.clips, "frames": args.frames, "size": args.size,
            "latency_ms_per_frame": args.latency_ms, "workers": args.workers,
            "commit": commit(),
        }  # fmt: skip
        records.append(record)
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
