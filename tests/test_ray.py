"""The farm's workers as Ray actors (``esrfarm upscale --ray``), on a real local multi-node cluster.

One ``ray.cluster_utils.Cluster`` for the module: a head node that takes no worker and three CPU-only
nodes, each with one unit of ``esrfarm_worker`` (the custom resource standing in for a GPU), so every
actor gets a node of its own. Real coordinator processes (killed for real), real worker processes
inside the actors, real ffmpeg, lossless outputs. Skipped only where ray is not installed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]' installs it)")
from ray.cluster_utils import Cluster  # noqa: E402

from media.extract import decode_frames  # noqa: E402
from tests import clips  # noqa: E402
from tests.workerutil import REPO, running  # noqa: E402

LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "gbrp"]
NAMESPACE = "esrfarm"
#: The fault tests' worker: a fixed latency per frame, so that a job lasts long enough to be hit.
SLOW = ["--worker-arg=--simulate-latency-ms=150"]
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    head = {"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_HEALTH}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(3):
        cluster.add_node(num_cpus=1, resources={"esrfarm_worker": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def slow_source(work: Path) -> Path:
    return clips.video(work / "slow.mp4", size="32x18", frames=48)


@pytest.fixture(scope="module")
def slow_reference(work: Path, slow_source: Path, tiny_model: Path) -> list[np.ndarray]:
    """The fault tests' job on one local worker."""
    output = work / "slow-local.mkv"
    done = run(upscale_args(slow_source, output, work / "local-root", tiny_model, "--local-workers", "1",
                            "--worker-arg=--simulate-latency-ms=1"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(decode_frames(output))


def upscale_args(source: Path, output: Path, root: Path, model: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output), "--model", str(model),
        "--scale", "2", "--batch-size", "4", "--shared-root", str(root), "--overwrite",
        "--unreachable-timeout", "3", "--worker-arg=--cpu-threads=1", "-v", *LOSSLESS, *args,
    ]  # fmt: skip


def on_ray(cluster: Cluster, source: Path, output: Path, root: Path, model: Path, *args: str) -> list[str]:
    return upscale_args(source, output, root, model, "--ray", cluster.address, "--events", "jsonl", *args)


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)


def events(stdout: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def statuses(root: Path) -> list[dict[str, Any]]:
    found = []
    for path in root.glob("jobs/*/status/*.json"):
        try:
            found.append(orjson.loads(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return found


def wait_mid_manifest(root: Path, process: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    """A status file of a manifest under way: at least one batch done, more to go."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for status in statuses(root):
            if status["state"] == "processing" and 0 < status["batches_done"] < status["batches_total"]:
                return status
        assert process is None or process.poll() is None, "the coordinator ended before its manifests began"
        time.sleep(0.05)
    raise AssertionError("no manifest got under way")


def actor_of(status: dict[str, Any]) -> Any:
    name = status["worker"]["worker_id"].split("@")[0]
    return ray.get_actor(name, namespace=NAMESPACE)


def run_actors(coordinator_pid: int) -> list[str]:
    prefix = f"esrfarm-{socket.gethostname()}-{coordinator_pid}-"
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )


def assert_same_frames(output: Path, reference: list[np.ndarray]) -> None:
    got = list(decode_frames(output))
    assert len(got) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))


@dataclass
class SlowJob:
    """A fault test's job: the slow workers' job on Ray, its files named ``name`` in the work folder."""

    root: Path
    output: Path
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, cluster: Cluster, work: Path, name: str, model: Path, source: Path, actors: int
    ) -> SlowJob:
        root, output, log = work / f"{name}-root", work / f"{name}.mkv", work / f"{name}.log"
        args = on_ray(
            cluster, source, output, root, model, "--ray-workers", str(actors), "--keep-frames", *SLOW
        )
        return cls(root, output, args, log, start(args, log))

    def rerun(self) -> SlowJob:
        """The same command again."""
        log = self.log.with_suffix(".rerun.log")
        return SlowJob(self.root, self.output, self.args, log, start(self.args, log))

    def wait(self) -> list[dict[str, Any]]:
        """Its exit (which must be 0) and its events."""
        assert self.process.wait(timeout=240) == 0, self.log.read_text()
        return events(self.log.read_text())


SERVES = re.compile(r"Ray actor (\S+) on node (\w+) \(\S+\) serves at (\S+)")


def test_a_job_on_actors_over_two_nodes_is_frame_identical_to_local_workers(
    cluster: Cluster, work: Path, tiny_model: Path
) -> None:
    source = clips.video(work / "real.mp4", size="32x18", frames=24)
    local = run(upscale_args(source, work / "real-local.mkv", work / "local-root", tiny_model,
                             "--local-workers", "1"))  # fmt: skip
    assert local.returncode == 0, local.stderr
    root = work / "real-root"
    done = run(on_ray(cluster, source, work / "real-ray.mkv", root, tiny_model, "--ray-workers", "2",
                      "--keep-frames"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert events(done.stdout)[-1]["event"] == "finished"
    actors = {m.group(1): m.group(2) for m in SERVES.finditer(done.stderr)}
    assert len(actors) == 2 and len(set(actors.values())) == 2, f"two actors on two nodes: {actors}"
    workers = {s["worker"]["worker_id"].split("@")[0] for s in statuses(root) if s["state"] == "completed"}
    assert workers == set(actors), "both actors upscaled batches"
    assert_same_frames(work / "real-ray.mkv", list(decode_frames(work / "real-local.mkv")))
    assert run_actors(0) == [] and not [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE
    ], "every actor is gone after the job"


def test_a_segments_job_on_actors_gives_the_frames_jobs_frames(
    cluster: Cluster, work: Path, tiny_model: Path, slow_source: Path, slow_reference: list[np.ndarray]
) -> None:
    """The actors run the ordinary worker: the segment transport works on them as on any worker."""
    output = work / "segments-ray.mkv"
    segments = ["--transport", "segments", "--segment-frames", "12", "--worker-arg=--simulate-latency-ms=1"]
    done = run(on_ray(cluster, slow_source, output, work / "segments-root", tiny_model, "--ray-workers", "2",
                      *segments))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [e["event"] for e in events(done.stdout)].count("segment_done") == 4
    assert_same_frames(output, slow_reference)


def test_the_only_actor_killed_mid_manifest_is_restarted_and_the_job_ends_right(
    cluster: Cluster, work: Path, tiny_model: Path, slow_source: Path, slow_reference: list[np.ndarray]
) -> None:
    job = SlowJob.start(cluster, work, "kill", tiny_model, slow_source, actors=1)
    status = wait_mid_manifest(job.root, job.process)
    ray.kill(actor_of(status), no_restart=False)  # as if its process had crashed: Ray restarts it
    lost = [e for e in job.wait() if e["event"] == "worker_lost"]
    assert len(lost) == 1 and "died" in lost[0]["reason"], lost
    after = {s["worker"]["pid"] for s in statuses(job.root) if s["state"] == "completed"}
    assert after - {status["worker"]["pid"]}, "the restarted actor's new worker did the rest"
    assert not running(status["worker"]["pid"]), "the killed actor's worker died with it"
    assert_same_frames(job.output, slow_reference)


def test_a_node_removed_mid_job_costs_a_retry_not_the_job(
    cluster: Cluster, work: Path, tiny_model: Path, slow_source: Path, slow_reference: list[np.ndarray]
) -> None:
    job = SlowJob.start(cluster, work, "node", tiny_model, slow_source, actors=2)
    status = wait_mid_manifest(job.root, job.process)
    node_id = ray.get(actor_of(status).where.remote(), timeout=30)["node_id"]
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    try:
        cluster.remove_node(node, allow_graceful=False)
        lost = [e for e in job.wait() if e["event"] == "worker_lost"]
    finally:
        cluster.add_node(num_cpus=1, resources={"esrfarm_worker": 1})  # three nodes for the next test
    assert lost and lost[0]["worker"] == status["worker"]["worker_id"], lost
    assert_same_frames(job.output, slow_reference)


def test_a_coordinator_killed_mid_job_leaves_no_actor_and_its_rerun_resumes(
    cluster: Cluster, work: Path, tiny_model: Path, slow_source: Path, slow_reference: list[np.ndarray]
) -> None:
    job = SlowJob.start(cluster, work, "sigkill", tiny_model, slow_source, actors=2)
    wait_mid_manifest(job.root, job.process)
    assert len(run_actors(job.process.pid)) == 2
    job.process.send_signal(signal.SIGKILL)
    job.process.wait()
    killed_at = time.monotonic()
    worker_pids = {s["worker"]["pid"] for s in statuses(job.root)}
    done_before = {b for s in statuses(job.root) for b in s["done_batches"]}
    while (
        run_actors(job.process.pid) or any(map(running, worker_pids))
    ) and time.monotonic() - killed_at < 60:
        time.sleep(0.2)
    assert run_actors(job.process.pid) == [], "Ray destroyed the dead coordinator's actors"
    assert not any(map(running, worker_pids)), "and their workers: no orphan holds a GPU"
    again = job.rerun()
    started = next(e for e in again.wait() if e["event"] == "started")
    assert started["run"] == 2, started
    redone = {
        b["id"]
        for m in job.root.glob("jobs/*/manifests/r02-*.json")
        for b in orjson.loads(m.read_bytes())["batches"]
    }
    assert done_before and not done_before & redone, "the rerun upscaled only what the first left undone"
    assert run_actors(again.process.pid) == []
    assert_same_frames(job.output, slow_reference)


def test_a_coordinator_on_ray_stopped_by_sigterm_waits_for_its_batch_and_exits_as_interrupted(
    cluster: Cluster, work: Path, tiny_model: Path
) -> None:
    """Stopping takes as long as the batch in flight (8 s here). Ray's crash handler, once it has seen
    SIGTERM, aborts its process 3 s later (SIGABRT, exit -6): a coordinator or service that took longer
    to stop was killed mid-stop (seen on loaded machines). The pool turns that handler off."""
    source = clips.video(work / "sigterm.mp4", size="32x18", frames=16)
    root, log = work / "sigterm-root", work / "sigterm.log"
    args = on_ray(cluster, source, work / "sigterm.mkv", root, tiny_model, "--ray-workers", "1",
                  "--worker-arg=--simulate-latency-ms=2000")  # fmt: skip
    process = start(args, log)
    wait_mid_manifest(root, process)  # the first batch is done; the second (its frames read ahead) upscales
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    text = log.read_text()
    assert code == 130, f"exit {code}:\n{text}"
    assert text.strip().splitlines()[-1].startswith("esrfarm upscale: interrupted ("), text
    assert sum(s["batches_done"] for s in statuses(root)) >= 2, "the batch in flight was finished"
    assert run_actors(process.pid) == [], "and its actor is gone"


def test_the_service_runs_its_jobs_on_ray_actors_and_leaves_none_when_it_stops(
    cluster: Cluster, work: Path, tiny_model: Path
) -> None:
    from tests.serviceutil import start_service

    inputs = work / "service-inputs"
    inputs.mkdir()
    source = clips.video(inputs / "clip.mp4", size="32x18", frames=16)
    root = work / "service-root"
    args = ["--ray", cluster.address, "--ray-workers", "2", "--worker-arg=--cpu-threads=1",
            "--input-root", inputs]  # fmt: skip
    service = start_service(root, work / "service-logs", args)
    served: set[str] = set()
    try:
        job = service.submit(inputs=[str(source)], models=[str(tiny_model)], scales=[2])
        done = service.wait_state(job["jobs"][0]["id"], "done", "failed", timeout=240)
        assert done["state"] == "done", done
        log = service.log_path.read_text()
        actors = {m.group(1): m.group(3) for m in SERVES.finditer(log)}
        served |= set(actors)
        assert len(actors) == 2, f"two worker actors: {log}"
        assert {w["url"] for w in service.get("/api/workers").json()} == set(actors.values())
        assert re.search(r"upscaling with 2 worker\(s\): esrfarm-", log), "the job ran on the actors"
        frames = list(decode_frames(done["output"]))
        assert len(frames) == 16 and frames[0].shape == (36, 64, 3)
    finally:
        assert service.stop() == 0, service.log()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] in served], (
        "the service's actors are gone once it stops"
    )


def test_the_service_stops_cleanly_while_an_actor_cannot_be_placed(
    cluster: Cluster, work: Path, tiny_model: Path
) -> None:
    """Four actors on a cluster with room for three: the fourth stays pending creation. Stopping the
    service then must stop the three and kill the fourth, not wait on it, and exit 0."""
    from tests.serviceutil import start_service

    inputs = work / "pending-inputs"
    inputs.mkdir()
    source = clips.video(inputs / "clip.mp4", size="32x18", frames=8)
    args = ["--ray", cluster.address, "--ray-workers", "4", "--worker-arg=--cpu-threads=1",
            "--input-root", inputs]  # fmt: skip
    service = start_service(work / "pending-root", work / "pending-logs", args)
    try:
        service.submit(inputs=[str(source)], models=[str(tiny_model)], scales=[2])
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and "asked Ray for 4 worker actor(s)" not in service.log_path.read_text()
        ):
            time.sleep(0.1)
        assert "asked Ray for 4 worker actor(s)" in service.log_path.read_text(), service.log()
        time.sleep(1.0)  # some actors may come up meanwhile; the fourth cannot
    finally:
        code = service.stop()
    assert code == 0, service.log()
    text = service.log_path.read_text()
    assert "stopped (jobs that were running stay queued" in text
    assert re.search(r"Ray actor esrfarm-\S+ is not up: killed, not waited for", text), text
    mine = f"esrfarm-{socket.gethostname()}-{service.process.pid}-"
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(mine)]
