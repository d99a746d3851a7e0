"""End-to-end efficiency: is the model the only bottleneck? And how much faster than the naive way?

In one run, on the same input, model and worker count:

(a) model only: the runtime upscales the decoded frames one call per frame, in this process;
(b) ``esrfarm upscale`` end to end, against workers already running (as under systemd), with
    stage timings from the coordinator (``--stats``) and from the workers (``/metrics``);
(c) the naive way (the original design): ffmpeg extracts every frame to PNG with default settings,
    the frames are upscaled one by one and written as PNG, ffmpeg encodes the PNGs.

efficiency = time(a) / time(b); speed-up = time(c) / time(b). Prints one JSON line.

    python benchmarks/pipeline.py ../shared/media/bigbuckbunny.mp4 --size 320x180 --scale 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from coordinator.errors import WorkerStartError  # noqa: E402
from coordinator.local_workers import (  # noqa: E402
    LocalWorkerProcess,
    answers_health,
    spawn_worker,
    wait_all_listening,
)
from media.extract import decode_frames  # noqa: E402
from media.ffmpeg import run_ffmpeg  # noqa: E402
from media.probe import MediaInfo, probe  # noqa: E402
from worker.runtime import RuntimeSettings, load_upscaler  # noqa: E402


def start_workers(
    count: int, root: Path, model: str, extra: list[str], logs: Path
) -> list[LocalWorkerProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = []
    for i in range(count):
        args = [
            "--shared-root",
            str(root),
            "--model",
            model,
            "--port",
            "0",
            "--worker-id",
            f"bench-{i}",
            *extra,
        ]
        port_file, log_file = logs / f"worker-{i}.json", logs / f"worker-{i}.log"
        process = spawn_worker(args, port_file=port_file, log_file=log_file, env=env, cwd=REPO)
        workers.append(LocalWorkerProcess(i, process, port_file, log_file))
    return workers


def wait_ready(workers: list[LocalWorkerProcess], logs: Path, timeout_s: float = 600) -> list[str]:
    """The workers' URLs once every one answers /health; SystemExit if one exits or is late."""
    try:
        wait_all_listening(workers, timeout_s=timeout_s, poll_s=0.2, ready=answers_health)
    except WorkerStartError as exc:
        raise SystemExit(f"worker {exc.index} not ready; see {logs}") from None
    return [str(w.url) for w in workers]


@contextlib.contextmanager
def running_workers(count: int, root: Path, model: str, extra: list[str], logs: Path) -> Iterator[list[str]]:
    """``count`` workers on 127.0.0.1 sharing ``root`` (logs and port files in ``logs``): yields
    their URLs once every one answers /health, and stops them afterwards."""
    root.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    workers = start_workers(count, root, model, extra, logs)
    try:
        yield wait_ready(workers, logs)
    finally:
        for worker in workers:
            worker.process.terminate()
        for worker in workers:
            worker.process.wait(timeout=120)


def time_upscale(
    source: Path, output: Path, urls: list[str], root: Path, model: str, scale: str, *options: str
) -> float:
    """Seconds ``esrfarm upscale`` takes to turn ``source`` into ``output`` on the workers ``urls``."""
    command = [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output), "--overwrite",
        "--model", model, "--scale", scale, "--workers", ",".join(urls), "--shared-root", str(root),
        "-q", *options,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return time.perf_counter() - started


def metric_sums(url: str) -> dict[str, float]:
    """Per-stage seconds a worker spent, from its Prometheus histogram sums."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    for match in re.finditer(
        r'^esrfarm_worker_batch_seconds_sum\{stage="(\w+)"\} (\S+)$', text, re.MULTILINE
    ):
        sums[match.group(1)] = float(match.group(2))
    return sums


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("video")
    parser.add_argument("--size", default="320x180", help="resize the input to this first (WxH), or 'keep'")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--model", default="realesr-animevideov3")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-args", default="", help="extra worker flags, e.g. '--precision fp16'")
    parser.add_argument("--codec", default="libx264")
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--frame-format", default="png", choices=["png", "npy"])
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--work", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="esrfarm-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    source = resized_input(Path(args.video), args.size, work)
    info = probe(source)
    frames = list(decode_frames(info))
    count = len(frames)
    model_s, device = time_model_only(frames, info, args.model, args.scale)
    esrfarm_s, stats, worker_stages = time_esrfarm(source, count, work, args)
    naive_s = None if args.skip_naive else time_naive(source, info, work, args)
    sums = {
        stage: round(sum(w.get(stage, 0.0) for w in worker_stages), 2)
        for stage in ("read", "compute", "write")
    }
    record = {
        "benchmark": "pipeline",
        "input": f"{info.video.width}x{info.video.height}, {count} frames",
        "scale": args.scale,
        "model": args.model,
        "device": device,
        "workers": args.workers,
        "frame_format": args.frame_format,
        "codec": f"{args.codec} {args.preset}",
        "model_only_s": round(model_s, 2),
        "esrfarm_s": round(esrfarm_s, 2),
        "efficiency": round(model_s / esrfarm_s, 3),
        "naive_s": round(naive_s, 2) if naive_s else None,
        "speedup_over_naive": round(naive_s / esrfarm_s, 2) if naive_s else None,
        "coordinator_stages_s": stats,
        "worker_stages_s": sums,
        "commit": commit(),
    }
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    return 0


def resized_input(source: Path, size: str, work: Path) -> Path:
    """``source`` resized to ``size`` (WxH) in ``work``, or itself for ``keep``."""
    if size == "keep":
        return source
    width, height = size.split("x")
    resized = work / f"input-{size}.mp4"
    run_ffmpeg(
        ["-y", "-i", str(source), "-vf", f"scale={width}:{height}", "-c:v", "libx264", "-crf", "16",
         "-c:a", "copy", str(resized)],
        action="resizing the benchmark input",
    )  # fmt: skip
    return resized


def time_model_only(frames: list[np.ndarray], info: MediaInfo, model: str, scale: float) -> tuple[float, str]:
    """(a) Seconds the model alone takes, in this process, one frame per call (the CPU default of
    the worker); and the device it ran on."""
    upscaler = load_upscaler(model, RuntimeSettings(), allow_download=False)
    upscaler.warmup(info.video.height, info.video.width)
    started = time.perf_counter()
    for frame in frames:
        upscaler.upscale(frame[None], scale)
    return time.perf_counter() - started, upscaler.device_name


def time_esrfarm(
    source: Path, count: int, work: Path, args: argparse.Namespace
) -> tuple[float, object, list[dict[str, float]]]:
    """(b) ``esrfarm upscale`` against running workers: seconds, its --stats, each worker's stage sums."""
    output = work / "esrfarm.mp4"
    stats_file = work / "stats.json"
    with running_workers(
        args.workers, work / "root", args.model, args.worker_args.split(), work / "logs"
    ) as urls:
        esrfarm_s = time_upscale(
            source, output, urls, work / "root", args.model, f"{args.scale:g}",
            "--codec", args.codec, "--preset", args.preset, "--frame-format", args.frame_format,
            "--stats", str(stats_file),
        )  # fmt: skip
        worker_stages = [metric_sums(url) for url in urls]
    stats = orjson.loads(stats_file.read_bytes())
    assert probe(output).frame_count == count
    return esrfarm_s, stats, worker_stages


def time_naive(source: Path, info: MediaInfo, work: Path, args: argparse.Namespace) -> float:
    """(c) Seconds the naive way takes: every frame to PNG, upscaled one by one, encoded again."""
    naive = work / "naive"
    (naive / "in").mkdir(parents=True, exist_ok=True)
    (naive / "out").mkdir(exist_ok=True)
    started = time.perf_counter()
    run_ffmpeg(["-y", "-i", str(source), str(naive / "in" / "%08d.png")], action="naive extraction")
    upscaler = load_upscaler(args.model, RuntimeSettings(), allow_download=False)
    for path in sorted((naive / "in").glob("*.png")):
        frame = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(upscaler.upscale(frame[None], args.scale)[0]).save(naive / "out" / path.name)
    run_ffmpeg(
        ["-y", "-framerate", info.video.frame_rate_str, "-i", str(naive / "out" / "%08d.png"),
         "-i", str(source), "-map", "0:v", "-map", "1:a?", "-c:a", "copy", "-c:v", args.codec,
         "-preset", args.preset, "-pix_fmt", "yuv420p", str(naive / "naive.mp4")],
        action="naive encode",
    )  # fmt: skip
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
