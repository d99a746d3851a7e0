"""Workers as Ray actors: throughput with 1, 2, 4, 8 fixed-latency actors, and what Ray's start-up costs.

A local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and ``--nodes`` CPU-only nodes,
each with ``esrfarm_worker`` slots) runs ``esrfarm upscale --ray ADDRESS --ray-workers N`` with the
fixed-latency benchmark worker (``--simulate-latency-ms``: every frame takes the same time and no
CPU, as on a GPU), so perfect scaling is N times one actor's throughput, the measure of
``worker_scaling.py``. The same job also runs on N local workers (``--local-workers N``), for the
start-up each way: from the command's start to every worker answering /health (``workers_ready_s``
of ``--stats``: actors placed, worker processes started, models loaded). Throughput is taken over
the coordinator's pipeline (workers ready to last segment encoded). Prints one JSON line for the
cluster's own start, then one per (where, count). Needs the ``ray`` extra.

    python benchmarks/ray_scaling.py --latency-ms 50 --frames 800 --counts 1 2 4 8
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from tests import clips  # noqa: E402


def upscale(source: Path, work: Path, name: str, latency_ms: float, where: list[str]) -> dict[str, Any]:
    """One job; its --stats plus the command's wall time."""
    stats = work / f"stats-{name}.json"
    command = [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(work / f"out-{name}.mp4"),
        "--overwrite", "--model", "simulated", "--scale", "2", "--shared-root", str(work / f"root-{name}"),
        f"--worker-arg=--simulate-latency-ms={latency_ms:g}", "--preset", "ultrafast", "--stats", str(stats),
        "-q", *where,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    wall = time.perf_counter() - started
    return {**orjson.loads(stats.read_bytes()), "command_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--frames", type=int, default=800)
    parser.add_argument("--size", default="64x36")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes of the local cluster")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)

    from ray.cluster_utils import Cluster

    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-ray-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    source = clips.video(work / "input.mp4", size=args.size, rate="25", frames=args.frames)
    slots = math.ceil(max(args.counts) / args.nodes)
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=slots, resources={"esrfarm_worker": slots})
        cluster.wait_for_nodes()
        emit({"benchmark": "ray_scaling", "cluster_start_s": round(time.perf_counter() - started, 2),
              "nodes": args.nodes + 1, "commit": commit()})  # fmt: skip
        base: dict[str, float] = {}
        for count in args.counts:
            ready: dict[str, float] = {}
            for where, flags in (
                ("ray", ["--ray", cluster.address, "--ray-workers", str(count)]),
                ("local", ["--local-workers", str(count)]),
            ):
                stats = upscale(source, work, f"{where}-{count}", args.latency_ms, flags)
                pipeline_s = stats["pipeline_done_s"] - stats["workers_ready_s"]
                fps = args.frames / pipeline_s
                base.setdefault(where, fps / count)
                ready[where] = stats["workers_ready_s"]
                emit({
                    "benchmark": "ray_scaling", "where": where, "workers": count,
                    "latency_ms_per_frame": args.latency_ms, "frames": args.frames,
                    "ideal_fps": round(count * 1000 / args.latency_ms, 2), "pipeline_fps": round(fps, 2),
                    "scaling_vs_one_worker": round(fps / (count * base[where]), 3),
                    "workers_ready_s": round(stats["workers_ready_s"], 2),
                    "command_s": round(stats["command_s"], 2), "commit": commit(),
                })  # fmt: skip
            emit({"benchmark": "ray_scaling", "workers": count,
                  "ray_startup_over_local_s": round(ready["ray"] - ready["local"], 2)})  # fmt: skip
    finally:
        cluster.shutdown()
    return 0


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
