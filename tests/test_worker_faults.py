"""The worker's fault suite, fast cases: real worker processes on 127.0.0.1, abused as a tester would.

Each test is one class of defect: what a manifest may make a worker hold, files that are not what
they claim (FIFOs, huge files, symlinks swapped in after the 202), values that can only fail later,
frames too large for memory, clients that are slow, cross-site or malformed. Memory is read from
the worker's /proc/<pid>/status (VmHWM: its peak resident set), threads from the same file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import resource
import socket
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from PIL import Image

from coordinator.client import HttpWorkerClient
from manifests import Batch, FrameFormat, plan_batches
from tests.workerutil import FifoGate, Job, WorkerProcess, encode_frame, make_job, read_frame, start_worker
from worker.runtime import RuntimeSettings, load_upscaler
from worker.service import BACKLOG, FD_RESERVE, descriptor_budget

_jobs = iter(range(1_000_000))


def new_job(root: Path, count: int, **kwargs: object) -> Job:
    return make_job(root, f"fault-{next(_jobs)}", count, **kwargs)  # type: ignore[arg-type]


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status (``VmHWM`` in kB, ``Threads``...)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(predicate())  # type: ignore[operator]


def raw_manifest(job: Job, manifest_id: str, model: str, **fields: object) -> str:
    """Write a manifest document as given (no validation on this side); its path under the shared root."""
    document: dict[str, object] = {
        "format": "esrfarm.manifest/1",
        "job_id": job.layout.job_id,
        "manifest_id": manifest_id,
        "worker_id": "w",
        "model": model,
        "input_dir": "input",
        "output_dir": "output",
        "batches": [{"id": 0, "start": 1, "end": 2}],
        **fields,
    }
    path = job.layout.manifest_path(manifest_id)
    path.write_bytes(orjson.dumps(document))
    return str(path.relative_to(job.layout.shared_root))


def raw_http(worker: WorkerProcess, data: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``data`` as it is on a new connection; the status code and body of the answer."""
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def received(sock: socket.socket) -> bytes:
    """What the worker sends before closing ``sock`` (a reset counts as closing)."""
    try:
        return sock.recv(1024)
    except ConnectionResetError:
        return b""


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# -- what a manifest may make the worker hold -------------------------------------------------------


def test_a_tiny_manifest_naming_millions_of_frames_is_refused_before_202(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path
) -> None:
    job = new_job(shared_root, 16)
    peak = proc_status(idle_worker.pid, "VmHWM")
    cases = [
        ({"batches": [{"id": 0, "start": 1, "end": 10_000_001}]}, "a batch holds at most 4096"),
        (
            {"batches": [{"id": i, "start": 1 + 4096 * i, "end": 4097 + 4096 * i} for i in range(300)]},
            "the most a manifest may hold",
        ),
        (
            {"batches": [{"id": 0, "frames": list(range(1, 5000))}]},
            "holds 4999 items; at most 4096 are allowed",
        ),
        ({"batches": [{"id": 0, "start": 99_999_999, "end": 100_000_001}]}, "must be at most"),
    ]
    for fields, message in cases:
        path = raw_manifest(job, "m", tiny_model.stem, **fields)
        response = idle_worker.post("/process_manifest", {"manifest_path": path})
        assert response.status == 400 and message in response.json()["error"], response.body
    # With the job's own frame count (job.json, as the coordinator writes it), frames beyond it are refused.
    job.layout.job_file.write_bytes(orjson.dumps({"format": "esrfarm.job/1", "frames": 16}))
    beyond = raw_manifest(job, "beyond", tiny_model.stem, batches=[{"id": 0, "start": 9, "end": 21}])
    response = idle_worker.post("/process_manifest", {"manifest_path": beyond})
    assert response.status == 400, response.body
    assert (
        "names frame 20, but job" in response.json()["error"]
        and "has 16 frame(s)" in response.json()["error"]
    )
    assert proc_status(idle_worker.pid, "VmHWM") - peak < 100_000  # kB: nothing was expanded
    assert not job.layout.status_path("beyond").exists()
    within = raw_manifest(job, "within", tiny_model.stem, batches=[{"id": 0, "start": 9, "end": 17}])
    assert idle_worker.post("/process_manifest", {"manifest_path": within}).status == 202
    assert idle_worker.wait_final("within", job.layout.job_id)["state"] == "completed"


def test_reset_stops_the_reader_thread_promptly(shared_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A read stalled on storage (a FIFO that nobody writes) is abandoned by /reset, its thread ended."""
    worker = start_worker(shared_root, tiny_model, tmp_path)
    try:
        job = new_job(shared_root, 16, seed=3)
        idle_threads = proc_status(worker.pid, "Threads")
        with FifoGate(job.input_path(1), encode_frame(job.frames[1], FrameFormat.PNG)) as gate:
            batches = plan_batches(16, 8, ["w"]).batches
            path = job.write_manifest(job.manifest("m", tiny_model.stem, batches))
            assert worker.post("/process_manifest", {"manifest_path": path}).status == 202
            assert wait_for(lambda: proc_status(worker.pid, "Threads") > idle_threads)
            response = worker.post("/reset")
            assert response.status == 200 and response.json()["cancelled"] is True, response.body
            # The gate is still closed: only a reader that looks at the stop request can have ended.
            assert wait_for(lambda: proc_status(worker.pid, "Threads") <= idle_threads, timeout=5.0), (
                f"{proc_status(worker.pid, 'Threads')} threads, {idle_threads} when idle"
            )
            gate.release(timeout=0.1)  # nobody reads the pipe any more
        assert worker.status()["state"] == "cancelled" and job.outputs() == set()
    finally:
        assert worker.stop() == 0


# -- manifest files that are not what they claim ----------------------------------------------------


def test_manifest_path_must_be_a_small_regular_file(idle_worker: WorkerProcess, shared_root: Path) -> None:
    fifo = shared_root / f"fifo-{next(_jobs)}.json"
    os.mkfifo(fifo)
    huge = shared_root / f"huge-{next(_jobs)}.json"
    with open(huge, "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB, sparse
    idle_threads = proc_status(idle_worker.pid, "Threads")
    peak = proc_status(idle_worker.pid, "VmHWM")

    response = idle_worker.post("/process_manifest", {"manifest_path": fifo.name})
    assert response.status == 400 and "is a named pipe (FIFO), not a regular file" in response.json()["error"]
    response = idle_worker.post("/process_manifest", {"manifest_path": huge.name})
    assert response.status == 400 and "is 1.0 GiB, more than the 8.0 MiB allowed" in response.json()["error"]

    def send(_: int) -> int:
        return idle_worker.post("/process_manifest", {"manifest_path": fifo.name}).status

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = set(pool.map(send, range(100)))
    assert codes <= {400, 409}, codes
    assert wait_for(lambda: proc_status(idle_worker.pid, "Threads") <= idle_threads, timeout=5.0)
    assert proc_status(idle_worker.pid, "VmHWM") - peak < 100_000  # kB: the 1 GiB file was not read


def test_a_character_device_as_manifest_is_refused(idle_worker: WorkerProcess, shared_root: Path) -> None:
    device = shared_root / f"zero-{next(_jobs)}"
    try:
        os.mknod(device, 0o666 | 0o020000, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    response = idle_worker.post("/process_manifest", {"manifest_path": device.name})
    assert response.status == 400 and "is a character device, not a regular file" in response.json()["error"]


# -- values that could only fail later ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scale": 100}, "field 'scale' must be at most 16.0, not 100"),
        ({"scale": 1e308}, "field 'scale' must be at most 16.0"),
        ({"scale": 1e-9}, "field 'scale' must be at least 0.0625"),
        ({"tile": 10**9}, "field 'tile' must be at most 65536"),
        ({"tile_pad": 10**6}, "field 'tile_pad' must be at most 1024"),
        ({"png_compression": 10}, "field 'png_compression' must be at most 9"),
        ({"worker_id": "w" * 5000}, "field 'worker_id' is 5000 characters long"),
    ],
)
def test_values_that_would_fail_later_are_refused_at_submit(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, fields: dict[str, object], message: str
) -> None:
    job = new_job(shared_root, 1)
    path = raw_manifest(job, "v", tiny_model.stem, **fields)
    response = idle_worker.post("/process_manifest", {"manifest_path": path})
    assert response.status == 400 and message in response.json()["error"], response.body


def test_a_nan_scale_is_refused(idle_worker: WorkerProcess, shared_root: Path) -> None:
    job = new_job(shared_root, 1)
    path = raw_manifest(job, "nan", "x")
    text = job.layout.manifest_path("nan").read_text().replace('"model":"x"', '"model":"x","scale":NaN')
    job.layout.manifest_path("nan").write_text(text)
    response = idle_worker.post("/process_manifest", {"manifest_path": path})
    assert response.status == 400 and "is not valid JSON" in response.json()["error"]


# -- frames too large for memory ---------------------------------------------------------------------


def test_a_frame_above_the_output_limit_fails_its_batch_without_being_decoded(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path
) -> None:
    """A 4096x4096 PNG (a few KB) at x4 would be a 16384x16384 output: refused from its header."""
    job = new_job(shared_root, 2)
    Image.new("RGB", (4096, 4096), (20, 90, 160)).save(job.input_path(2), format="PNG")
    peak = proc_status(idle_worker.pid, "VmHWM")
    batches = (Batch(0, (1,)), Batch(1, (2,)))
    path = job.write_manifest(job.manifest("big", tiny_model.stem, batches, scale=4.0))
    assert idle_worker.post("/process_manifest", {"manifest_path": path}).status == 202
    final = idle_worker.wait_final("big", job.layout.job_id)
    assert final["state"] == "failed" and final["done_batches"] == [0], final
    [error] = final["errors"]
    assert error["frame"] == 2 and error["reason"] == (
        "input frame input/00000002.png is 4096x4096: upscaled x4 it would be 16384x16384 (268.4 Mpx), "
        "more than this worker's limit of 67.1 Mpx per output frame (--max-output-pixels)"
    )
    assert proc_status(idle_worker.pid, "VmHWM") - peak < 100_000  # kB


def test_a_large_frame_is_upscaled_in_memory_bounded_by_the_pixel_budget(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """1536x1536 at x2 from a x4 model: whole, the model's float output alone would be 453 MB."""
    worker = start_worker(shared_root, tiny_model, tmp_path, args=["--pixel-budget", "384x384"])
    try:
        job = new_job(shared_root, 1, frame_format=FrameFormat.NPY, height=1536, width=1536)
        before = proc_status(worker.pid, "VmHWM")
        path = job.write_manifest(job.manifest("large", tiny_model.stem, (Batch(0, (1,)),), scale=2.0))
        assert worker.post("/process_manifest", {"manifest_path": path}).status == 202
        final = worker.wait_final("large", job.layout.job_id, timeout=300)
        assert final["state"] == "completed", final
        assert read_frame(job.output_path(1)).shape == (3072, 3072, 3)
        grown = (proc_status(worker.pid, "VmHWM") - before) / 1024
        # input 7 MB + output 28 MB (twice, for the write) + tiles of 384x384 pixels, plus what glibc's
        # per-thread arenas keep (178-350 MB measured, more on a busy CPU); untiled it grows ~905 MB
        assert grown < 450, f"peak memory grew by {grown:.0f} MB"
    finally:
        assert worker.stop() == 0


COMPUTE_COUNT = 'esrfarm_worker_batch_seconds_count{stage="compute"}'


def test_a_batch_above_the_part_budget_is_handled_in_parts_and_claimed_whole(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """16x24 frames at x4 are 6144 output pixels; a part holds 4 x --max-output-pixels: 4 frames."""
    worker = start_worker(shared_root, tiny_model, tmp_path, args=["--max-output-pixels", "6144"])
    try:
        job = new_job(shared_root, 20, seed=12)
        job.input_path(15).unlink()  # batch 1 (frames 11-20) fails in its second part
        batches = (Batch.range(0, 1, 11), Batch.range(1, 11, 21))
        path = job.write_manifest(job.manifest("parts", tiny_model.stem, batches))
        assert worker.post("/process_manifest", {"manifest_path": path}).status == 202
        final = worker.wait_final("parts", job.layout.job_id)
        assert final["done_batches"] == [0] and final["frames_done"] == 10, final
        assert [(e["batch_id"], e["frame"]) for e in final["errors"]] == [(1, 15)]
        assert job.outputs() == set(range(1, 11))  # the first part of batch 1 was removed again
        metrics = worker.get("/metrics").body.decode()
        computed = next(line for line in metrics.splitlines() if line.startswith(COMPUTE_COUNT))
        assert float(computed.split()[1]) == 4  # batch 0 in parts of 4, 4 and 2 frames; batch 1's first
        reference = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1))
        expected = reference.upscale(np.stack([job.frames[i] for i in range(1, 11)]))
        for position, index in enumerate(range(1, 11)):
            np.testing.assert_array_equal(read_frame(job.output_path(index)), expected[position])
    finally:
        assert worker.stop() == 0


# -- clients that hold or trick the worker -----------------------------------------------------------


def _lower_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))


def test_health_stays_answerable_under_300_slow_clients(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        shared_root, tiny_model, tmp_path, args=["--header-timeout", "2", "--body-timeout", "1"],
        preexec_fn=_lower_descriptor_limit,
    )  # fmt: skip
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    slow: list[socket.socket] = []
    try:
        for _ in range(300):  # each sends half its headers, then nothing
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(sock)
        started = time.monotonic()
        health = worker.get("/health")
        assert health.status == 200 and health.json()["state"] == "idle"
        log = worker.log_path.read_text()
        limit, _ = descriptor_budget(200, 256)
        assert f"at most {limit} connections" in log and "Too many open files" not in log
        # The slow ones are closed: evicted for newer connections, or at the header timeout (2 s), or
        # answered 503 at once if they came while every open one was busy.
        deadline = started + 60.0
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            answer = received(sock)  # raises TimeoutError for a connection held open
            assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
        # A body that never arrives gets 408 after the body timeout, and the worker still answers.
        status, body = raw_http(
            worker,
            b"POST /process_manifest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"manifest',
        )
        assert status == 408 and b"did not arrive within 1s" in body
        assert worker.get("/health").status == 200
    finally:
        for sock in slow:
            sock.close()
        assert worker.stop() == 0


def _busy_connection(host: str, port: int) -> socket.socket:
    """A connection whose request is in its handler: whole headers, half a body. ``Expect:
    100-continue`` makes the worker say when it took the request up (no sleeping on it)."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(
        b"POST /process_manifest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n"
    )
    assert sock.recv(1024).startswith(b"HTTP/1.1 100"), "the worker did not take the request up"
    sock.sendall(b"{")
    return sock


@pytest.mark.parametrize("soft", [200, 256, 1024, 65536])
@pytest.mark.parametrize("max_connections", [4, 256, 10_000])
def test_the_descriptor_budget_leaves_the_workers_own_and_an_accept_burst(
    soft: int, max_connections: int
) -> None:
    limit, lingering = descriptor_budget(soft, max_connections)
    assert 4 <= limit <= max_connections
    assert limit + lingering + FD_RESERVE + 2 * BACKLOG <= soft
    assert lingering >= 1


def test_past_the_connection_limit_with_every_connection_busy_a_new_one_gets_503(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        shared_root, tiny_model, tmp_path, args=["--max-connections", "4", "--body-timeout", "3"]
    )
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    busy: list[socket.socket] = []
    try:
        busy = [_busy_connection(host, int(port)) for _ in range(4)]
        status, body = raw_http(worker, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 503 and b"too many connections" in body  # answered: nothing busy could give way
        assert "every one busy: answering a new one 503" in worker.log()
        for sock in busy:  # the body timeout ends them, and the worker answers again
            assert sock.recv(1024).startswith(b"HTTP/1.1 408")
        assert worker.get("/health").status == 200
    finally:
        for sock in busy:
            sock.close()
        assert worker.stop() == 0


def test_a_flood_of_posts_gets_http_answers_and_the_client_retries_the_503s(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """200 simultaneous POSTs to a worker of 8 connections: each gets an answer (one 202, 409s,
    503s with Retry-After), none a reset; the coordinator's client gets through a full worker."""
    worker = start_worker(shared_root, tiny_model, tmp_path, args=["--max-connections", "8"])
    job = new_job(shared_root, 2)
    path = job.write_manifest(job.manifest("flood", tiny_model.stem, plan_batches(2, 2, ["w"]).batches))
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"POST /process_manifest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(orjson.dumps({'manifest_path': path}))}\r\nConnection: close\r\n\r\n"
    ).encode() + orjson.dumps({"manifest_path": path})

    def post() -> tuple[int, bytes]:
        return raw_http(worker, request, timeout=60)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
            answers = list(pool.map(lambda _: post(), range(200)))  # a reset raises here
        codes = [status for status, _ in answers]
        assert set(codes) <= {202, 409, 503} and 202 in codes, sorted(set(codes))  # 202 again once done
        worker.wait_final("flood", job.layout.job_id)

        async def through_a_full_worker() -> None:
            blockers = [_busy_connection(host, int(port)) for _ in range(8)]
            shed = worker.log_path.read_text().count("answering a new one 503")
            async with aiohttp.ClientSession() as session:
                client = HttpWorkerClient(worker.url, session, timeout_s=60)
                task = asyncio.ensure_future(client.health())
                while worker.log_path.read_text().count("answering a new one 503") == shed:
                    await asyncio.sleep(0.02)
                for sock in blockers:  # the bodies complete (400): the connections free up
                    sock.sendall(b"}" + b" " * 98)
                    sock.close()
                assert (await task).ready is True

        asyncio.run(through_a_full_worker())
    finally:
        assert worker.stop() == 0


def test_state_changing_requests_need_json_and_no_foreign_origin_or_host(idle_worker: WorkerProcess) -> None:
    port = idle_worker.url.rsplit(":", 1)[1]

    def post(path: str, headers: str, body: bytes = b"{}") -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return raw_http(idle_worker, head.encode() + body)

    local = f"Host: 127.0.0.1:{port}\r\n"
    json_type = "Content-Type: application/json\r\n"
    for path in ("/reset", "/process_manifest"):
        status, body = post(path, local + "Content-Type: text/plain\r\n")
        assert status == 415 and b"takes Content-Type: application/json" in body, body
        status, body = post(path, local)
        assert status == 415, body
        status, body = post(path, local + json_type + "Origin: http://evil.example\r\n")
        assert status == 403 and b"http://evil.example" in body and b"cross-site" in body, body
        status, body = post(path, f"Host: evil.example:{port}\r\n" + json_type)
        assert status == 403 and b"is not this worker's" in body, body
    # The worker's own names and origin are fine; a GET is never refused for its Origin.
    assert post("/reset", local + json_type + f"Origin: http://127.0.0.1:{port}\r\n")[0] == 200
    assert post("/reset", f"Host: localhost:{port}\r\n" + json_type)[0] == 200
    assert post("/reset", f"Host: [::1]:{port}\r\n" + json_type)[0] == 200
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n\r\n"
    assert raw_http(idle_worker, head.encode())[0] == 200


def test_the_coordinators_client_still_drives_the_worker(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path
) -> None:
    job = new_job(shared_root, 8)
    path = job.write_manifest(job.manifest("client", tiny_model.stem, plan_batches(8, 8, ["w"]).batches))

    async def drive() -> None:
        async with aiohttp.ClientSession() as session:
            client = HttpWorkerClient(idle_worker.url, session)
            await client.process_manifest(path)
            await client.reset()

    asyncio.run(drive())
    assert idle_worker.wait_final("client", job.layout.job_id)["state"] in {"completed", "cancelled"}


def test_a_non_ascii_authorization_header_gets_401(
    shared_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        shared_root, tiny_model, tmp_path, env={"ESRFARM_WORKER_TOKEN": "s3cret"}, token="s3cret"
    )
    try:
        for value in (b"Bearer \xff\xfe", b"Bearer s3cret\xc3\xa9", b"\xe2\x82\xac"):
            status, body = raw_http(
                worker, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + value + b"\r\n\r\n"
            )
            assert status == 401 and b"bearer token" in body, (value, status, body)
        assert worker.get("/status").status == 200
        assert "Traceback" not in worker.log()
    finally:
        assert worker.stop() == 0


def test_a_newline_in_manifest_path_cannot_forge_a_log_line(idle_worker: WorkerProcess) -> None:
    forged = "2026-01-01 00:00:00,000 INFO worker.service: forged by a client"
    response = idle_worker.post(
        "/process_manifest", {"manifest_path": f"nothing-{next(_jobs)}.json\n{forged}"}
    )
    assert response.status == 400
    lines = idle_worker.log().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any("\\n" + forged in line for line in lines)


# -- the shared root, checked at every write ----------------------------------------------------------


def test_directories_swapped_for_symlinks_after_202_are_never_written_through(
    idle_worker: WorkerProcess, shared_root: Path, tiny_model: Path, outside: Path
) -> None:
    job = new_job(shared_root, 16, seed=9)
    layout = job.layout
    batches = plan_batches(16, 8, ["w"]).batches
    path = job.write_manifest(job.manifest("swap", tiny_model.stem, batches))
    with FifoGate(job.input_path(1), encode_frame(job.frames[1], FrameFormat.PNG)):  # holds batch 0
        assert idle_worker.post("/process_manifest", {"manifest_path": path}).status == 202
        assert wait_for(lambda: layout.status_path("swap").exists())
        for name in ("output", "status"):
            (layout.job_dir / name).rename(layout.job_dir / f"{name}.moved")
            (outside / name).mkdir()
            (layout.job_dir / name).symlink_to(outside / name)
    final = idle_worker.wait_final("swap", layout.job_id)
    assert final["state"] == "failed" and final["done_batches"] == []
    assert all("was replaced" in error["reason"] for error in final["errors"]), final["errors"]
    assert sorted(p.name for p in outside.rglob("*")) == ["output", "status"]  # nothing written out there
    moved = orjson.loads((layout.job_dir / "status.moved" / "swap.json").read_bytes())
    assert moved == final  # the status went on into the directory opened at submit
    assert list((layout.job_dir / "output.moved").iterdir()) == []
    assert np.array_equal(read_frame(job.input_path(1)), job.frames[1])
