"""The worker service, run as a real process on 127.0.0.1 with the tiny seeded model on the CPU."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from manifests import Batch, FrameFormat, Status, plan_batches
from manifests.health import Health
from tests.workerutil import (
    FifoGate,
    Job,
    WorkerProcess,
    encode_frame,
    make_job,
    read_frame,
    request,
    start_worker,
)
from worker.runtime import RuntimeSettings, Upscaler, load_upscaler

_job_counter = iter(range(1_000_000))


def new_job(root: Path, count: int, **kwargs: object) -> Job:
    return make_job(root, f"job-{next(_job_counter)}", count, **kwargs)  # type: ignore[arg-type]


def batches(job: Job, size: int = 8) -> tuple[Batch, ...]:
    return plan_batches(len(job.frames), size, ["w"], first_frame=min(job.frames)).batches


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Upscaler:
    """The runtime, in this process, with the settings the test workers use."""
    return load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1))


def assert_outputs_match(
    job: Job, done: list[Batch], reference: Upscaler, scale: float | None = None
) -> None:
    """Every frame of every batch in ``done`` is on disk and equals the runtime's output."""
    for batch in done:
        expected = reference.upscale(np.stack([job.frames[i] for i in batch.frames]), scale)
        for position, index in enumerate(batch.frames):
            got = read_frame(job.output_path(index))
            assert got.shape == expected[position].shape, f"frame {index}"
            np.testing.assert_array_equal(got, expected[position], err_msg=f"output frame {index}")


def post_manifest(worker: WorkerProcess, path: str) -> dict[str, object]:
    response = worker.post("/process_manifest", {"manifest_path": path})
    assert response.status == 202, response.body
    return response.json()


# -- health, status, metrics ---------------------------------------------------------------------


def test_simulated_latency_worker_for_benchmarks(shared_root: Path, tmp_path: Path) -> None:
    """--simulate-latency-ms: no model, each frame takes that long and is upscaled by repeating pixels."""
    worker = start_worker(shared_root, Path("simulated"), tmp_path, args=["--simulate-latency-ms", "20"])
    try:
        health = worker.get("/health").json()
        assert (health["model"], health["precision"], health["device"]) == (
            "simulated",
            "simulated",
            "simulated",
        )
        job = new_job(shared_root, 10, seed=4)
        manifest = job.manifest("sim", "simulated", batches(job), scale=2.0)
        started = time.monotonic()
        post_manifest(worker, job.write_manifest(manifest))
        assert worker.wait_final("sim", job.layout.job_id)["state"] == "completed"
        assert time.monotonic() - started >= 10 * 0.020
        frame = job.frames[3]
        assert np.array_equal(read_frame(job.output_path(3)), frame.repeat(2, axis=0).repeat(2, axis=1))
    finally:
        worker.stop()


def test_health_reports_the_model_and_device(idle_worker: WorkerProcess, tiny_model: Path) -> None:
    response = idle_worker.get("/health")
    assert response.status == 200
    health = response.json()
    assert health["ready"] is True and health["state"] == "idle"
    assert (health["model"], health["scale"], health["native_scale"]) == (tiny_model.stem, 4.0, 4)
    assert (health["precision"], health["device"], health["gpu"], health["gpu_memory"]) == (
        "fp32",
        "cpu",
        None,
        None,
    )
    assert health["pid"] == idle_worker.pid and health["uptime_s"] > 0 and health["version"]
    # what the coordinator reads: the one declaration of /health, every field the worker sends in it
    assert set(health) == {f.encode_name for f in msgspec.structs.fields(Health)}
    assert Health.from_dict(health).model == tiny_model.stem
    status = Status.from_json(idle_worker.get("/status").body)
    # idle, or the end state of the last manifest an earlier test ran on this session worker
    assert status.state.value != "processing" and status.worker.pid == idle_worker.pid


# -- processing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_format", [FrameFormat.PNG, FrameFormat.NPY])
def test_manifest_of_several_batches_completes_with_the_runtimes_output(
    idle_worker: WorkerProcess,
    shared_root: Path,
    tiny_model: Path,
    reference: Upscaler,
    frame_format: FrameFormat,
) -> None:
    job = new_job(shared_root, 37, frame_format=frame_format, seed=1)  # 5 batches, the last of 5 frames
    planned = batches(job)
    manifest = job.manifest("w0", tiny_model.stem, planned, scale=4.0)
    accepted = post_manifest(idle_worker, job.write_manifest(manifest))
    assert (accepted["batches"], accepted["frames"], accepted["status_file"]) == (5, 37, "status/w0.json")

    final = idle_worker.wait_final("w0", job.layout.job_id)
    assert final["state"] == "completed", final
    assert (final["batches_done"], final["frames_done"], final["errors"]) == (5, 37, [])
    assert sorted(final["done_batches"]) == [0, 1, 2, 3, 4]
    assert final["finished_at"] >= final["started_at"]
    assert (
        Status.from_json(job.layout.status_path("w0").read_bytes()).to_dict() == final
    )  # /status is the file
    assert job.outputs() == set(job.frames)
    assert_outputs_match(job, list(planned), reference)

    metrics = idle_worker.get("/metrics")
    assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    text = metrics.body.decode()
    frames_total = float(
        next(line.split()[1] for line in text.splitlines() if line.startswith("esrfarm_worker_frames_total"))
    )
    assert frames_total >= 37
    assert 'esrfarm_worker_batch_seconds_count{stage="compute"}' in text
    cpu = dict(re.findall(r'^esrfarm_worker_cpu_seconds_total\{stage="(\w+)"\} (\S+)$', text, re.MULTILINE))
    assert float(cpu["compute"]) > 0 and float(cpu["write"]) > 0  # where the worker's CPU went


def test_a_manifest_sets_the_output_scale(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, reference: Upscaler
) -> None:
    """One x4 worker serves x2 and x3 jobs: the model output is resized to the manifest's scale."""
    for scale in (2.0, 3.0):
        job = new_job(shared_root, 10, seed=3)
        planned = batches(job)
        manifest_id = f"s{scale:g}"
        manifest = job.manifest(manifest_id, tiny_model.stem, planned, scale=scale)
        post_manifest(idle_worker, job.write_manifest(manifest))
        final = idle_worker.wait_final(manifest_id, job.layout.job_id)
        assert final["state"] == "completed", final
        height, width = job.frames[1].shape[:2]
        assert read_frame(job.output_path(1)).shape == (round(height * scale), round(width * scale), 3)
        assert_outputs_match(job, list(planned), reference, scale)


def test_manifest_with_a_missing_frame_fails_that_batch_only(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, reference: Upscaler
) -> None:
    job = new_job(shared_root, 32, seed=2)
    job.input_path(12).unlink()  # batch 1 holds frames 9..16
    planned = batches(job)
    post_manifest(idle_worker, job.write_manifest(job.manifest("w0", str(tiny_model), planned)))

    final = idle_worker.wait_final("w0", job.layout.job_id)
    assert final["state"] == "failed"
    assert sorted(final["done_batches"]) == [0, 2, 3]
    assert final["frames_done"] == 24
    [error] = final["errors"]
    assert (error["batch_id"], error["frame"]) == (1, 12)
    assert "input/00000012.png is missing" in error["reason"]
    assert job.outputs() == set(job.frames) - set(range(9, 17))
    assert_outputs_match(job, [planned[0], planned[2], planned[3]], reference)


def test_a_corrupt_frame_is_named_with_its_reason(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path
) -> None:
    job = new_job(shared_root, 8, seed=3)
    job.input_path(5).write_bytes(b"not a png")
    post_manifest(idle_worker, job.write_manifest(job.manifest("w0", tiny_model.stem, batches(job))))
    final = idle_worker.wait_final("w0", job.layout.job_id)
    assert final["state"] == "failed" and final["done_batches"] == []
    assert final["errors"][0]["frame"] == 5
    assert final["errors"][0]["reason"] == (  # a sentence: no "<_io.BytesIO object at 0x...>"
        "input frame input/00000005.png is not a valid png image: "
        "it is not a PNG file (it does not start with the PNG signature)"
    )
    assert job.outputs() == set()


def test_two_concurrent_posts_one_accepted_one_conflict(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path
) -> None:
    job = new_job(shared_root, 16, seed=4)
    path = job.write_manifest(job.manifest("w0", tiny_model.stem, batches(job)))
    other = job.write_manifest(job.manifest("w1", tiny_model.stem, batches(job)))
    with FifoGate(job.input_path(1), encode_frame(job.frames[1], FrameFormat.PNG)):  # holds batch 0
        barrier = threading.Barrier(2)

        def send(manifest_path: str) -> int:
            barrier.wait()
            return idle_worker.post("/process_manifest", {"manifest_path": manifest_path}).status

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            codes = sorted(pool.map(send, [path, other]))
        assert codes == [202, 409]
        conflict = idle_worker.post("/process_manifest", {"manifest_path": path})
        assert conflict.status == 409 and "POST /reset" in conflict.json()["error"]
    started = idle_worker.status()["manifest_id"]
    assert idle_worker.wait_final(started)["state"] == "completed"


def test_reset_cancels_then_idle_then_a_new_manifest_completes(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, reference: Upscaler
) -> None:
    job = new_job(shared_root, 80, seed=5)  # 10 batches; batch 3 starts at frame 25
    planned = batches(job)
    with FifoGate(job.input_path(25), encode_frame(job.frames[25], FrameFormat.PNG)):
        post_manifest(idle_worker, job.write_manifest(job.manifest("w0", tiny_model.stem, planned)))
        idle_worker.wait_status(lambda s: s["manifest_id"] == "w0" and s["batches_done"] == 3)
        assert idle_worker.get("/health").json()["state"] == "processing"

        response = idle_worker.post("/reset")
        assert response.status == 200, response.body
        assert response.json()["cancelled"] is True
    final = idle_worker.status()
    assert final["state"] == "cancelled" and "POST /reset" in final["message"]
    assert final["done_batches"] == [0, 1, 2] and final["finished_at"] is not None
    assert job.read_status("w0") == final
    assert job.outputs() == set(range(1, 25))  # nothing of the unfinished batches
    assert_outputs_match(job, list(planned[:3]), reference)

    health = idle_worker.get("/health").json()
    assert health["state"] == "idle" and health["manifest_id"] is None
    assert idle_worker.post("/reset").json() == {"state": "idle", "cancelled": False}

    again = new_job(shared_root, 16, seed=6)
    post_manifest(idle_worker, again.write_manifest(again.manifest("w0", tiny_model.stem, batches(again))))
    assert idle_worker.wait_final("w0", again.layout.job_id)["state"] == "completed"
    assert again.outputs() == set(again.frames)


# -- refusals -------------------------------------------------------------------------------------


def test_manifest_paths_outside_the_shared_root_are_forbidden(
    idle_worker: WorkerProcess, shared_root: Path, outside: Path, tiny_model: Path
) -> None:
    job = new_job(shared_root, 8)
    manifest = job.manifest("w0", tiny_model.stem, batches(job))
    (outside / "m.json").write_bytes(manifest.to_json())
    (shared_root / f"link-{job.layout.job_id}.json").symlink_to(outside / "m.json")
    for path in (
        f"../{outside.name}/m.json",
        str(outside / "m.json"),
        f"jobs/{job.layout.job_id}/../../../{outside.name}/m.json",
        f"link-{job.layout.job_id}.json",
        "/etc/passwd",
    ):
        response = idle_worker.post("/process_manifest", {"manifest_path": path})
        assert response.status == 403, (path, response.body)
        assert "outside the shared root" in response.json()["error"]
    assert not job.layout.status_path("w0").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_dir", "../../../outside"),
        ("input_dir", "/tmp"),
        ("output_dir", "../../.."),
        ("status_file", "/tmp/s.json"),
    ],
)
def test_manifest_fields_leading_outside_are_forbidden(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, field: str, value: str
) -> None:
    job = new_job(shared_root, 8)
    manifest = job.manifest("w0", tiny_model.stem, batches(job), **{field: value})
    response = idle_worker.post("/process_manifest", {"manifest_path": job.write_manifest(manifest)})
    assert response.status == 403, response.body
    assert f"manifest field '{field}'" in response.json()["error"]


def test_symlinks_leading_out_are_forbidden(
    idle_worker: WorkerProcess, shared_root: Path, outside: Path, tiny_model: Path
) -> None:
    # a symlinked input directory
    job = new_job(shared_root, 8)
    (outside / "input").mkdir()
    manifest = job.manifest("w0", tiny_model.stem, batches(job), input_dir="linked-input")
    (job.layout.job_dir / "linked-input").symlink_to(outside / "input")
    response = idle_worker.post("/process_manifest", {"manifest_path": job.write_manifest(manifest)})
    assert response.status == 403 and "input_dir" in response.json()["error"]

    # a job directory that is a symlink leading out
    escaped = new_job(outside, 8)
    (shared_root / "jobs" / "escaped").symlink_to(escaped.layout.job_dir)
    manifest = job.manifest("w1", tiny_model.stem, batches(job), input_dir="input")
    document = json.loads(manifest.to_json())
    document["job_id"] = "escaped"
    (job.layout.manifests_dir / "escaped.json").write_text(json.dumps(document))
    response = idle_worker.post(
        "/process_manifest", {"manifest_path": f"jobs/{job.layout.job_id}/manifests/escaped.json"}
    )
    assert response.status == 403 and "outside the shared root" in response.json()["error"]

    # an input frame that is a symlink (leading out, or anywhere): that batch fails, naming the frame
    (outside / "secret.png").write_bytes(encode_frame(job.frames[3], FrameFormat.PNG))
    job.input_path(3).unlink()
    job.input_path(3).symlink_to(outside / "secret.png")
    post_manifest(idle_worker, job.write_manifest(job.manifest("w2", tiny_model.stem, batches(job))))
    final = idle_worker.wait_final("w2", job.layout.job_id)
    assert final["state"] == "failed" and final["errors"][0]["frame"] == 3
    assert "input/00000003.png is a symbolic link" in final["errors"][0]["reason"]
    assert job.outputs() == set()


@pytest.mark.parametrize(
    ("body", "manifest_text", "message"),
    [
        (b"{not json", None, "request body is not valid JSON"),
        (b'{"path": "x"}', None, '{"manifest_path": '),
        (b'["x"]', None, '{"manifest_path": '),
        (b'{"manifest_path": "jobs/a\\u0000.json"}', None, "must not contain a NUL character"),
        (None, None, "does not exist"),
        (None, b'{"format": "esrfarm.manifest/1", ', "is not valid JSON"),
        (
            None,
            b'{"format": "esrfarm.manifest/7"}',
            "has format 'esrfarm.manifest/7', but this esrfarm reads only",
        ),
        (None, b'{"format": "esrfarm.manifest/1", "job_id": "j"}', "field 'manifest_id' is missing"),
    ],
)
def test_bad_requests_and_manifests_get_400_with_a_message(
    idle_worker: WorkerProcess,
    shared_root: Path,
    body: bytes | None,
    manifest_text: bytes | None,
    message: str,
) -> None:
    name = f"bad-{next(_job_counter)}.json"
    if manifest_text is not None:
        (shared_root / name).write_bytes(manifest_text)
    response = idle_worker.post("/process_manifest", body if body is not None else {"manifest_path": name})
    assert response.status == 400, response.body
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "realesrgan-x4plus"}, "manifest asks for model 'realesrgan-x4plus', but this worker runs"),
        ({"tile": 128}, "manifest asks for tile 128, but this worker runs tile 0"),
    ],
)
def test_a_manifest_for_another_model_or_tiling_is_refused(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, options: dict[str, object], message: str
) -> None:
    job = new_job(shared_root, 8)
    values: dict[str, object] = {"model": tiny_model.stem, **options}
    manifest = job.manifest("w0", str(values.pop("model")), batches(job), **values)
    response = idle_worker.post("/process_manifest", {"manifest_path": job.write_manifest(manifest)})
    assert response.status == 400 and message in response.json()["error"]


def test_request_bodies_are_size_limited(idle_worker: WorkerProcess) -> None:
    response = idle_worker.post("/process_manifest", b'{"manifest_path": "' + b"a" * 200_000 + b'"}')
    assert response.status == 413 and "too large" in response.json()["error"]


# -- signals --------------------------------------------------------------------------------------


def test_sigterm_mid_manifest_finishes_the_batch_and_leaves_a_valid_final_status(
    shared_root: Path, tiny_model: Path, reference: Upscaler, tmp_path: Path
) -> None:
    job = new_job(shared_root, 1600, seed=7)  # 200 batches: SIGTERM lands long before the end
    planned = batches(job)
    worker = start_worker(shared_root, tiny_model, tmp_path)
    post_manifest(worker, job.write_manifest(job.manifest("w0", tiny_model.stem, planned)))
    worker.wait_status(lambda s: s["manifest_id"] == "w0" and s["batches_done"] >= 2)

    assert worker.stop(signal.SIGTERM) == 0
    final = job.read_status("w0")
    Status.from_dict(final)  # valid
    assert final["state"] == "cancelled" and "SIGTERM" in final["message"], final
    assert 2 <= final["batches_done"] < len(planned) and final["finished_at"] is not None
    done = [b for b in planned if b.id in set(final["done_batches"])]
    assert job.outputs() == {i for b in done for i in b.frames}  # claimed == on disk, nothing partial
    assert_outputs_match(job, done, reference)
    assert "worker.service: stopped" in worker.log()


def test_sigkill_mid_batch_leaves_a_valid_status_that_claims_only_written_batches(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    job = new_job(shared_root, 1600, seed=8)
    planned = batches(job)
    worker = start_worker(shared_root, tiny_model, tmp_path)
    post_manifest(worker, job.write_manifest(job.manifest("w0", tiny_model.stem, planned)))
    worker.wait_status(lambda s: s["manifest_id"] == "w0" and s["batches_done"] >= 2)

    assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
    status = Status.from_json(job.layout.status_path("w0").read_bytes())  # whole, valid JSON
    assert status.state.value == "processing" and status.batches_done < len(planned)
    for batch in planned:
        if batch.id in status.done_batches:
            assert all(job.output_path(i).is_file() for i in batch.frames), (
                f"batch {batch.id} claimed, frames missing"
            )
    assert status.current_batch not in status.done_batches


# -- security -------------------------------------------------------------------------------------


def test_off_loopback_every_endpoint_but_health_needs_the_token(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    token = "s3cret-token"
    worker = start_worker(
        shared_root, tiny_model, tmp_path, args=["--host", "0.0.0.0"], env={"ESRFARM_WORKER_TOKEN": token}
    )
    try:
        assert worker.get("/health", token=None).status == 200
        for method, path in (
            ("GET", "/status"),
            ("GET", "/metrics"),
            ("POST", "/reset"),
            ("POST", "/process_manifest"),
        ):
            for given in (None, "wrong"):
                response = request(
                    worker.url + path, method, b"{}" if method == "POST" else None, token=given
                )
                assert response.status == 401, (method, path, given)
                assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert request(
                worker.url + path, method, b"{}" if method == "POST" else None, token=token
            ).status in {200, 400}
    finally:
        assert worker.stop() == 0


def test_token_file_is_read(shared_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-a-file\n")
    worker = start_worker(
        shared_root, tiny_model, tmp_path,
        args=["--host", "0.0.0.0", "--token-file", str(tmp_path / "token")],
        token="from-a-file", wait_healthy=False,
    )  # fmt: skip
    try:
        assert worker.get("/status").status == 200
        assert worker.get("/status", token="other").status == 401
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_binding_off_loopback_without_a_token_refuses_to_start(shared_root: Path, host: str) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ESRFARM_WORKER_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--shared-root", str(shared_root), "--host", host, "--model", "x"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs a bearer token" in result.stderr and "--token-file" in result.stderr


def test_a_model_that_cannot_load_exits_with_status_3(shared_root: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "worker", "--shared-root", str(shared_root), "--port", "0", "--device", "cpu",
         "--model", str(tmp_path / "missing.pth")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "cannot load model" in result.stderr and "missing.pth" in result.stderr
