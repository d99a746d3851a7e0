"""Does the coordinator keep N workers busy? Throughput with 1, 2, 4, 8 fixed-latency workers.

Each worker runs the benchmark model (``--simulate-latency-ms``): every frame takes the same time
and no CPU, like a GPU would, so on any machine perfect scaling is N times one worker's throughput.
Throughput is measured over the coordinator's pipeline (first dispatch to last segment encoded,
from ``--stats``), and over the whole command. Prints one JSON line per worker count.

    python benchmarks/worker_scaling.py --latency-ms 50 --frames 640 --counts 1 2 4 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from benchmarks.pipeline import running_workers, time_upscale  # noqa: E402
from tests import clips  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--frames", type=int, default=640)
    parser.add_argument("--size", default="64x36")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    source = clips.video(work / "input.mp4", size=args.size, rate="25", frames=args.frames)
    base = None
    for count in args.counts:
        root = work / f"root-{count}"
        stats_file = work / f"stats-{count}.json"
        latency = ["--simulate-latency-ms", f"{args.latency_ms:g}"]
        with running_workers(count, root, "simulated", latency, work / f"logs-{count}") as urls:
            wall = time_upscale(
                source, work / f"out-{count}.mp4", urls, root, "simulated", "2",
                "--preset", "ultrafast", "--stats", str(stats_file),
            )  # fmt: skip
        stats = orjson.loads(stats_file.read_bytes())
        pipeline_s = stats["pipeline_done_s"] - stats["workers_ready_s"]
        fps = args.frames / pipeline_s
        base = base or fps / count
        record = {
            "benchmark": "worker_scaling",
            "workers": count,
            "latency_ms_per_frame": args.latency_ms,
            "frames": args.frames,
            "ideal_fps": round(count * 1000 / args.latency_ms, 2),
            "pipeline_fps": round(fps, 2),
            "scaling_vs_one_worker": round(fps / (count * base), 3),
            "efficiency_vs_ideal": round(fps / (count * 1000 / args.latency_ms), 3),
            "command_s": round(wall, 2),
            "worker_idle_s": stats["worker_idle_s"],
            "commit": commit(),
        }
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
