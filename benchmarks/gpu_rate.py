"""Can one host feed a fast GPU? CPU milliseconds per frame of everything around the model.

In one run, for each case (1280x720 x2 and 960x540 x4 by default) and each frame format:

- ``esrfarm upscale`` end to end against one worker already running (as under systemd), by
  default the stand-in model at zero latency (``--simulate-latency-ms 0``: no compute, its own
  nearest-neighbour resize timed and left out), or a real model with ``--model NAME --device cuda``;
- the CPU of each side by stage: the coordinator's from ``--stats`` (``cpu_*_s``: the ffmpeg
  decoder, taking frames from its pipe, writing input frames, reading upscaled frames, feeding
  the encoder, the ffmpeg encoder, the join) and the worker's from ``/metrics``
  (``esrfarm_worker_cpu_seconds``: read, compute, write) and from ``/proc`` (its whole process);
- the encoder alone (ffmpeg, same codec and preset) on the same number of ready upscaled frames,
  read from a raw file.

The farm's own cost is everything but the model (the worker's compute stage) and the encoder.
Projected frames per second on a host of N cores = N / (CPU seconds per frame, all of it).
Prints one JSON document and, with ``--markdown``, the RESULTS.md table rows.

    python benchmarks/gpu_rate.py ../shared/media/bigbuckbunny.mp4 --preset ultrafast
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

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_throughput import commit  # noqa: E402
from benchmarks.pipeline import start_workers, wait_ready  # noqa: E402
from media.ffmpeg import find_ffmpeg  # noqa: E402

COORDINATOR_STAGES = ("decode", "extract_read", "extract_write", "encode_read", "encode_feed")
WORKER_STAGES = ("read", "compute", "write")
CASES = {"720x2": ("1280x720", 2), "540x4": ("960x540", 4)}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_cpu_stages(url: str) -> dict[str, float]:
    """The worker's ``esrfarm_worker_cpu_seconds_total{stage=...}`` counters."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^esrfarm_worker_cpu_seconds_total\{stage="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {stage: float(value) for stage, value in found}


def run_measured(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run ``command`` to its end; its CPU seconds and its waited-for children's (os.wait4)."""
    process = subprocess.Popen(command, env=env, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{command[:4]}... exited with {process.returncode}")
    return usage.ru_utime + usage.ru_stime


def make_clip(source: Path, size: str, frames: int, target: Path) -> Path:
    """``frames`` frames of ``source`` (looped as often as needed) at ``size`` (H.264 CRF 18, yuv420p)."""
    width, height = size.split("x")
    subprocess.run(
        [
            find_ffmpeg(), "-v", "error", "-y", "-stream_loop", "-1", "-i", str(source), "-an",
            "-frames:v", str(frames),
            "-vf", f"scale={width}:{height}:flags=bicubic", "-c:v", "libx264", "-crf", "18",
            "-preset", "fast", "-pix_fmt", "yuv420p", str(target),
        ],
        check=True,
    )  # fmt: skip
    return target


def encoder_alone(clip: Path, scale: int, frames: int, codec: list[str], work: Path) -> float:
    """CPU ms per frame of ffmpeg encoding ``frames`` ready upscaled yuv420p frames from a raw file
    (the frames are nearest-neighbour upscales of the clip's: what the stand-in gives the encoder)."""
    raw = work / "ready.yuv"
    subprocess.run(
        [find_ffmpeg(), "-v", "error", "-y", "-i", str(clip), "-frames:v", str(frames),
         "-vf", f"scale=iw*{scale}:ih*{scale}:flags=neighbor", "-f", "rawvideo", "-pix_fmt", "yuv420p",
         str(raw)],
        check=True,
    )  # fmt: skip
    width, height = (int(side) * scale for side in _size(clip))
    seconds = run_measured(
        [
            find_ffmpeg(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "yuv420p",
            "-s", f"{width}x{height}", "-r", "25", "-i", str(raw), *codec, str(work / "alone.mp4"),
        ]
    )  # fmt: skip
    raw.unlink()
    return 1000 * seconds / frames


def _size(clip: Path) -> tuple[int, int]:
    import av

    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height


@contextlib.contextmanager
def one_worker(root: Path, logs: Path, model: str, extra: list[str]) -> Iterator[tuple[str, int]]:
    root.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    (worker,) = start_workers(1, root, model, extra, logs)
    try:
        (url,) = wait_ready([worker], logs)
        yield url, worker.process.pid
    finally:
        worker.process.terminate()
        worker.process.wait(timeout=120)


def measure(
    clip: Path,
    scale: int,
    frame_format: str,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, object]:
    """One job end to end; CPU ms per frame by side and stage."""
    frames = args.frames
    root = work / f"root-{frame_format}"
    extra = ["--device", args.device]
    if args.model is None:
        extra += ["--simulate-latency-ms", "0"]
    model = args.model or "realesr-animevideov3"
    stats_file = work / "stats.json"
    codec = ["--codec", args.codec, "--preset", args.preset]
    with one_worker(root, work / f"logs-{frame_format}", model, extra) as (url, pid):
        worker_before, stages_before = process_cpu(pid), worker_cpu_stages(url)
        started = time.perf_counter()
        coordinator = run_measured(
            [
                sys.executable, "-m", "coordinator.cli", "upscale", str(clip), str(work / "out.mp4"),
                "--overwrite", "-q", "--model", model, "--scale", str(scale), "--workers", url,
                "--shared-root", str(root), "--frame-format", frame_format, "--stats", str(stats_file),
                *codec,
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        wall = time.perf_counter() - started
        worker_total = process_cpu(pid) - worker_before
        stages_after = worker_cpu_stages(url)
    stats = orjson.loads(stats_file.read_bytes())
    per_frame = 1000 / frames

    def stat(stage: str) -> float:
        return float(stats.get(f"cpu_{stage}_s", 0.0))

    coord = {stage: stat(stage) * per_frame for stage in COORDINATOR_STAGES}
    encode = (stat("encode") + stat("join")) * per_frame
    coord["python_other"] = (stat("process") - sum(stat(s) for s in COORDINATOR_STAGES[1:])) * per_frame
    coord["all_but_encoder"] = coordinator * per_frame - encode
    worker = {s: (stages_after.get(s, 0.0) - stages_before.get(s, 0.0)) * per_frame for s in WORKER_STAGES}
    worker["other"] = worker_total * per_frame - sum(worker.values())
    worker["all_but_model"] = worker_total * per_frame - worker["compute"]
    farm = coord["all_but_encoder"] + worker["all_but_model"]
    rounded = {
        "coordinator_ms": {k: round(v, 1) for k, v in coord.items()},
        "worker_ms": {k: round(v, 1) for k, v in worker.items()},
        "encoder_in_job_ms": round(encode, 1),
        "farm_ms": round(farm, 1),
        "all_but_model_ms": round(farm + encode, 1),
        "wall_s": round(wall, 2),
        "fps_wall": round(frames / wall, 1),
        "projected_fps": round(args.cores * 1000 / (farm + encode), 1),
        "projected_fps_without_encoder": round(args.cores * 1000 / farm, 1),
    }
    return rounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a video to cut the test clips from")
    parser.add_argument("--frames", type=int, default=250, help="frames per clip (a 10 s clip at 25 fps)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--formats", nargs="+", default=["yuv", "npy", "png"])
    parser.add_argument("--codec", default="libx264")
    parser.add_argument("--preset", default="ultrafast")
    parser.add_argument(
        "--alone-presets",
        nargs="*",
        default=["ultrafast", "veryfast", "medium"],
        help="encoder alone also at these",
    )
    parser.add_argument("--cores", type=int, default=16, help="project frames per second for this many cores")
    parser.add_argument("--model", help="a real model (default: the stand-in at zero latency)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="where clips and job directories go (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="also print RESULTS.md rows")
    args = parser.parse_args()
    base = args.work or Path(tempfile.mkdtemp(prefix="gpu-rate-"))
    results: dict[str, object] = {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    rows = []
    for case in args.cases:
        size, scale = CASES[case]
        work = base / case
        work.mkdir(parents=True, exist_ok=True)
        clip = make_clip(args.source, size, args.frames, work / "clip.mp4")
        alone_by_preset = {
            preset: round(
                encoder_alone(clip, scale, args.frames, ["-c:v", args.codec, "-preset", preset], work), 1
            )
            for preset in dict.fromkeys([args.preset, *args.alone_presets])
        }
        alone = alone_by_preset[args.preset]
        case_results: dict[str, object] = {"encoder_alone_ms": alone_by_preset}
        for frame_format in args.formats:
            result = measure(clip, scale, frame_format, args, work)
            case_results[frame_format] = result
            rows.append((case, frame_format, result, alone))
            print(case, frame_format, orjson.dumps(result).decode(), file=sys.stderr)
        results[case] = case_results
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    if args.markdown:
        for case, frame_format, r, alone in rows:
            c, w = r["coordinator_ms"], r["worker_ms"]
            assert isinstance(c, dict) and isinstance(w, dict)
            print(
                f"| {case} | {frame_format} | {c['decode']} | {c['extract_read'] + c['extract_write']:.1f} | "
                f"{c['encode_read'] + c['encode_feed']:.1f} | {c['python_other']} | {w['read']} | "
                f"{w['write']} | {w['other']} | {r['farm_ms']} | {r['encoder_in_job_ms']} | {alone} | "
                f"{r['projected_fps']} |"
            )


if __name__ == "__main__":
    main()
