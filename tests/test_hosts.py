"""``esrfarm upscale`` across real network stacks: three hosts made of network namespaces on a bridge.

Each host (:mod:`tests.netns`) has its own address and its own mount namespace, in which the shared
root is bind-mounted at a path of its own and the coordinator's path of it is hidden; its worker is
bound to the host's address with a token. The coordinator runs in the root namespace and reaches
the workers over the bridge. Outputs are lossless (ffv1, gbrp) and compared frame by frame with the
same job on a local worker. Without root, or without ``ip``/``unshare``/``nsenter``/``mount``, every
test here that needs hosts is skipped with the reason.
"""

from __future__ import annotations

import os
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

from media.extract import decode_frames
from tests import clips
from tests.netns import (
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    HostNetwork,
    HostWorker,
    leftovers,
    links,
    namespaces,
    ours,
    unavailable,
)
from tests.workerutil import REPO

WHY_NOT = unavailable()
needs_hosts = pytest.mark.skipif(WHY_NOT is not None, reason=f"no test hosts: {WHY_NOT}")

FRAMES = 72
JOB = ["--scale", "2", "--batch-size", "4", "--codec", "ffv1", "--pix-fmt", "gbrp"]
WORKER_ARGS = ["--device", "cpu", "--cpu-threads", "1", "--warmup-size", "16"]
TOKEN = "netns-test-token-0123456789abcdef"
DEADLINE_S = 240.0
#: The transports a job may run on; each test below runs on each.
TRANSPORTS = ["frames", "segments"]
#: Segments jobs cut the clip into ranges of 12 frames (6 ranges: each host gets some).
SEGMENT_FRAMES = 12


def upscale_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", "upscale", *map(str, args), "-q"]


def transport_args(transport: str) -> list[str]:
    return (
        [] if transport == "frames" else ["--transport", transport, "--segment-frames", str(SEGMENT_FRAMES)]
    )


def run(command: list[str], timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def frames_of(path: Path) -> list[np.ndarray]:
    return list(decode_frames(path))


def assert_same_frames(output: Path, reference: list[np.ndarray]) -> None:
    frames = frames_of(output)
    assert len(frames) == len(reference) == FRAMES
    for index, (got, expected) in enumerate(zip(frames, reference, strict=True), start=1):
        assert got.shape == expected.shape, f"frame {index}: {got.shape} != {expected.shape}"
        assert np.array_equal(got, expected), f"frame {index} differs from the local worker's output"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clips.video(tmp_path_factory.mktemp("hosts-clip") / "in.mp4", size="256x144", frames=FRAMES)


@pytest.fixture(scope="module")
def reference(
    request: pytest.FixtureRequest, source: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[np.ndarray]]:
    """The job's frames on a local worker (started by the coordinator on this host), per transport."""
    if WHY_NOT is not None:
        pytest.skip(f"no test hosts: {WHY_NOT}")
    work = tmp_path_factory.mktemp("hosts-reference")
    frames: dict[str, list[np.ndarray]] = {}
    for transport in TRANSPORTS:
        output = work / f"{transport}.mkv"
        command = upscale_command(
            source, output, "--model", tiny_model, "--local-workers", "1", "--shared-root", work / "root",
            *(f"--worker-arg={a}" for a in WORKER_ARGS), *JOB, *transport_args(transport),
        )  # fmt: skip
        result = run(command)
        assert result.returncode == 0, result.stderr
        frames[transport] = frames_of(output)
    return frames


@dataclass
class Farm:
    network: HostNetwork
    workers: list[HostWorker]
    shared_root: Path
    token_file: Path

    def command(self, source: Path, output: Path, model: Path, *args: str) -> list[str]:
        return upscale_command(
            source, output, "--model", model, "--workers", ",".join(w.url for w in self.workers),
            "--shared-root", self.shared_root, "--token-file", self.token_file, *JOB, *args,
        )  # fmt: skip


@pytest.fixture()
def farm(tmp_path: Path, tiny_model: Path) -> Iterator[Farm]:
    """Three hosts with a worker each; everything is torn down after the test, also when it fails,
    and nothing of the network may be left."""
    if WHY_NOT is not None:
        pytest.skip(f"no test hosts: {WHY_NOT}")
    shared_root = tmp_path / "shared"
    shared_root.mkdir()
    token_file = tmp_path / "worker.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    network = HostNetwork(tmp_path / "hosts", 3)
    with network:
        workers = network.start_workers(shared_root, tiny_model, token_file, args=WORKER_ARGS)
        yield Farm(network, workers, shared_root, token_file)
    assert leftovers(network.tag) == []


def events(stdout: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# -- without hosts ----------------------------------------------------------------------------------


ALL = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)


@pytest.mark.parametrize(
    ("euid", "capabilities", "which", "platform", "expected"),
    [
        (1000, ALL, "/usr/bin/tool", "linux", "needs root"),
        (0, 1 << CAP_SYS_ADMIN, "/usr/bin/tool", "linux", "lacks CAP_NET_ADMIN (an unprivileged"),
        (0, 0, "/usr/bin/tool", "linux", "lacks CAP_NET_ADMIN and CAP_SYS_ADMIN"),
        (0, ALL, None, "linux", "ip, unshare, nsenter, mount not found"),
        (0, ALL, "/usr/bin/tool", "darwin", "need Linux"),
        (0, ALL, "/usr/bin/tool", "linux", None),
    ],
)
def test_hosts_are_skipped_with_the_reason_where_they_cannot_be_made(
    euid: int, capabilities: int, which: str | None, platform: str, expected: str | None
) -> None:
    why = unavailable(euid=euid, capabilities=capabilities, which=lambda tool: which, platform=platform)
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why


# -- on hosts ---------------------------------------------------------------------------------------


@needs_hosts
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_job_across_three_hosts_is_frame_identical_to_a_local_worker(
    transport: str, farm: Farm, source: Path, tiny_model: Path, reference: dict[str, list[np.ndarray]],
    tmp_path: Path,
) -> None:  # fmt: skip
    output = tmp_path / "out.mkv"
    result = run(farm.command(source, output, tiny_model, "--events", "jsonl", *transport_args(transport)))
    assert result.returncode == 0, result.stderr
    assert_same_frames(output, reference[transport])
    assert not [e for e in events(result.stdout) if e["event"] in {"worker_lost", "batch_failed"}]
    if transport == "segments":  # the workers encoded the ranges
        assert (
            len([e for e in events(result.stdout) if e["event"] == "segment_done"])
            == FRAMES // SEGMENT_FRAMES
        )
    for worker in farm.workers:  # every host did its share, at its own path of the shared root
        status = worker.status()
        assert status["state"] == "completed" and status["frames_done"] > 0, (status, worker.log())
    assert not any((farm.shared_root / "jobs").iterdir()), "the job directory is removed after success"


def _mid_manifest(shared_root: Path, worker_id: str) -> dict[str, Any] | None:
    """The status of a manifest ``worker_id`` is in the middle of (a batch done, one left), if any."""
    for path in shared_root.glob("jobs/*/status/*.json"):
        try:
            status = orjson.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # replaced or removed meanwhile
        if (
            status.get("worker", {}).get("worker_id") == worker_id
            and status["state"] == "processing"
            and 1 <= len(status["done_batches"]) < status["batches_total"]
        ):
            return dict(status)
    return None


@needs_hosts
@pytest.mark.parametrize("storage", ["lost", "kept"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_host_whose_link_is_cut_mid_job_has_its_work_done_by_the_others(
    storage: str, transport: str, farm: Farm, source: Path, tiny_model: Path,
    reference: dict[str, list[np.ndarray]], tmp_path: Path,
) -> None:  # fmt: skip
    """Host 2's link goes down in the middle of a manifest (a batch done, one left). ``lost``: its
    storage goes with it (as a network mount's would), so what it had left must be upscaled by hosts
    1 and 3. ``kept``: its storage is on another network, so it may go on writing frames while the
    others redo its batches; the job must still end, frame-identical, and leave nothing behind."""
    output = tmp_path / "out.mkv"
    events_file = tmp_path / "events.jsonl"
    cut = farm.workers[1]
    assert cut.host is not None
    args = ["--events", "jsonl", "--unreachable-timeout", "4", *transport_args(transport)]
    command = farm.command(source, output, tiny_model, *args)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_file = tmp_path / "coordinator.log"
    with events_file.open("wb") as stdout, log_file.open("wb") as stderr:
        coordinator = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while (status := _mid_manifest(farm.shared_root, f"host-{cut.host.index}")) is None:
            assert coordinator.poll() is None, f"the job ended before host {cut.host.index} was mid-manifest"
            assert time.monotonic() < deadline, (
                f"host {cut.host.index} was not mid-manifest in {DEADLINE_S:g} s"
            )
            time.sleep(0.02)
        farm.network.cut(cut.host)
        if storage == "lost":
            farm.network.lose_storage(cut)
        coordinator.wait(timeout=DEADLINE_S)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
    assert coordinator.returncode == 0, log_file.read_text(errors="replace")
    assert_same_frames(output, reference[transport])
    assert not any((farm.shared_root / "jobs").iterdir()), "the job directory is removed after success"
    lost = [e for e in events(events_file.read_text()) if e["event"] == "worker_lost"]
    assert {e["worker"] for e in lost} <= {f"host-{cut.host.index}"}, lost
    if storage == "lost":  # it could not have finished its manifest: the others did
        assert len(lost) == 1 and lost[0]["batches_returned"] >= 1, (lost, status)
    for worker in (farm.workers[0], farm.workers[2]):
        assert worker.status()["state"] == "completed", worker.log()


@needs_hosts
def test_stale_networks_of_dead_runs_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """A crashed run's namespace (its process id is gone) is deleted by the next run; a live one stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"esrf-{dead.pid}z-h1", f"esrf-{os.getpid()}z-h1"
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        with HostNetwork(tmp_path, 1):
            present = namespaces()
            assert stale not in present
            assert live in present
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    assert not ours(namespaces(), os.getpid()) and not ours(links(), os.getpid())
