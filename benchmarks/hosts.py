"""Does the farm scale across hosts? 1, 2 and 3 hosts of fixed-latency workers against N x one host.

Each host is a network namespace on a bridge (:mod:`tests.netns`, needs root and iproute2): its own
address, its own mount of the shared root at a path of its own, one worker bound to that address
with a token, running the benchmark model (``--simulate-latency-ms``: every frame takes the same
time and no CPU, like a GPU would). The coordinator runs in the root namespace and reaches them
over the bridge. Throughput is measured over the coordinator's pipeline (workers ready to last
segment encoded, from ``--stats``); perfect scaling is N times one host's. The same runs on N
workers on 127.0.0.1 of this host (the machine's own load, without the network stacks) follow each
count unless ``--no-local``. Prints one JSON line per count; everything is torn down afterwards.

    python benchmarks/hosts.py --latency-ms 50 --frames 400 --counts 1 2 3
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from benchmarks.pipeline import running_workers, time_upscale  # noqa: E402
from tests import clips  # noqa: E402
from tests.netns import HostNetwork, unavailable  # noqa: E402


def measure(
    source: Path, urls: list[str], root: Path, stats_file: Path, token_file: Path
) -> dict[str, float]:
    """One ``esrfarm upscale`` of ``source`` on the workers ``urls``: its pipeline seconds (workers
    ready to last segment encoded), whole-command seconds and idle worker seconds."""
    wall = time_upscale(
        source, stats_file.with_suffix(".mp4"), urls, root, "simulated", "2", "--token-file", str(token_file),
        "--preset", "ultrafast", "--stats", str(stats_file),
    )  # fmt: skip
    stats = orjson.loads(stats_file.read_bytes())
    return {
        "pipeline_s": stats["pipeline_done_s"] - stats["workers_ready_s"],
        "command_s": wall,
        "idle_s": stats["worker_idle_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--size", default="64x36")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--no-local", action="store_true", help="skip the same runs on workers on 127.0.0.1 of this host"
    )
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    why_not = unavailable()
    if why_not is not None:
        parser.error(f"cannot make hosts here: {why_not}")

    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-hosts-"))
    work.mkdir(parents=True, exist_ok=True)
    source = clips.video(work / "input.mp4", size=args.size, frames=args.frames)
    token_file = work / "worker.token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    latency = ["--simulate-latency-ms", f"{args.latency_ms:g}"]
    one: dict[str, float] = {}  # one worker's fps, on a host and on loopback
    for count in args.counts:
        runs: dict[str, dict[str, float]] = {}
        root = work / f"root-hosts-{count}"
        root.mkdir(exist_ok=True)
        with HostNetwork(work / f"hosts-{count}", count) as network:
            urls = [w.url for w in network.start_workers(root, "simulated", token_file, args=latency)]
            runs["hosts"] = measure(source, urls, root, work / f"stats-hosts-{count}.json", token_file)
        if not args.no_local:
            root = work / f"root-local-{count}"
            extra = [*latency, "--token-file", str(token_file)]
            with running_workers(count, root, "simulated", extra, work / f"logs-local-{count}") as urls:
                runs["local"] = measure(source, urls, root, work / f"stats-local-{count}.json", token_file)
        record: dict[str, object] = {
            "benchmark": "hosts", "hosts": count, "latency_ms_per_frame": args.latency_ms,
            "frames": args.frames, "ideal_fps": round(count * 1000 / args.latency_ms, 2),
        }  # fmt: skip
        for kind, run in runs.items():
            fps = args.frames / run["pipeline_s"]
            one.setdefault(kind, fps / count)
            record[f"{kind}_fps"] = round(fps, 2)
            record[f"{kind}_vs_n_x_one"] = round(fps / (count * one[kind]), 3)
            record[f"{kind}_command_s"] = round(run["command_s"], 2)
            record[f"{kind}_worker_idle_s"] = run["idle_s"]
        record["commit"] = commit()
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
