"""The job service's API contract, against a real service process over two real CPU workers and the
tiny seeded model: submit and batch expansion, list and filter, cancel (running and queued), retry,
delete, output with a range request, preview, uploads and their limit, path confinement, the token,
SSE in order with a replay, bad input failing alone, no busy refusals."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from media.probe import probe
from service.preview import decoded_frame
from tests import clips
from tests.serviceutil import ServiceProcess, service_command, sse_events, start_service
from tests.workerutil import REPO, Response, WorkerProcess, request, start_worker

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-root")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("service-inputs")
    clips.video(directory / "small.mp4", frames=10)
    clips.video(directory / "other.mp4", frames=6, size="48x32")
    clips.video(directory / "long.mp4", size="320x180", frames=60)
    (directory / "notes.mp4").write_text("this is not a video\n")
    return directory


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="module")
def workers(root: Path, tiny_model: Path, logs: Path) -> Iterator[list[WorkerProcess]]:
    started = [start_worker(root, tiny_model, logs) for _ in range(2)]
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def service(root: Path, inputs: Path, logs: Path, workers: list[WorkerProcess]) -> Iterator[ServiceProcess]:
    urls = ",".join(w.url for w in workers)
    args = ["--workers", urls, "--input-root", inputs, "--max-running", "2", "--max-upload", "64K"]
    args += ["--body-timeout", "3"]  # a stalled upload is dropped within the tests' patience
    process = start_service(root, logs, args)
    yield process
    assert process.stop() == 0, "SIGTERM stops the service, whatever its jobs went through"


@pytest.fixture()
def model(tiny_model: Path) -> str:
    return str(tiny_model)


def test_batch_expands_runs_and_lists(service: ServiceProcess, inputs: Path, model: str) -> None:
    batch = service.submit(
        inputs=[str(inputs / "small.mp4"), str(inputs / "other.mp4")], models=[model], scales=[2, 3]
    )
    jobs = batch["jobs"]
    assert len(jobs) == 4 and len({j["id"] for j in jobs}) == 4
    assert {j["batch_id"] for j in jobs} == {batch["batch_id"]}
    assert sorted((Path(j["input"]).name, j["scale"]) for j in jobs) == [
        ("other.mp4", 2.0), ("other.mp4", 3.0), ("small.mp4", 2.0), ("small.mp4", 3.0),
    ]  # fmt: skip
    assert all(j["state"] == "queued" and j["output_url"] is None and not j["dedup"] for j in jobs)
    for job in jobs:
        done = service.wait_state(job["id"], "done", "failed")
        assert done["state"] == "done", done
        assert done["frames_done"] == done["frames_total"] == (10 if "small" in job["input"] else 6)
        assert done["output_url"] == f"/api/jobs/{job['id']}/output"
        assert done["duration_s"] is not None and done["duration_s"] >= 0
        video = probe(Path(done["output"])).video
        source = probe(Path(done["input"])).video
        assert (video.width, video.height) == (source.width * job["scale"], source.height * job["scale"])
    listed = service.get("/api/jobs?state=done").json()
    assert {j["id"] for j in jobs} <= {j["id"] for j in listed}
    assert all(j["state"] == "done" for j in listed)
    assert service.get("/api/jobs?state=nonsense").status == 400
    assert service.get("/api/jobs/nope").status == 404


def test_no_busy_refusals_with_several_jobs_queued(
    service: ServiceProcess, inputs: Path, model: str, workers: list[WorkerProcess]
) -> None:
    small, other = str(inputs / "small.mp4"), str(inputs / "other.mp4")
    batch = service.submit(inputs=[small, other, small], models=[model], scales=[2, 4])
    assert len(batch["jobs"]) == 6  # two of each (small, scale): the same job, run one after the other
    for job in batch["jobs"]:
        assert service.wait_state(job["id"], "done", "failed")["state"] == "done"
    for worker in workers:
        # the worker logs each refusal as "refused manifest PATH: STATUS MESSAGE"
        refusals = [line for line in worker.log().splitlines() if "refused manifest" in line]
        assert not refusals, refusals
    assert "is busy" not in service.log_path.read_text()
    metrics = service.get("/metrics").body.decode()
    assert 'esrfarm_service_jobs{state="done"}' in metrics
    assert "esrfarm_service_queue_length 0.0" in metrics
    assert "esrfarm_service_frames_upscaled_total" in metrics
    assert "esrfarm_service_job_duration_seconds_count" in metrics


def test_bad_input_fails_alone_and_bad_fields_are_refused(
    service: ServiceProcess, inputs: Path, model: str
) -> None:
    missing = service.submit(inputs=[str(inputs / "missing.mp4")], models=[model], scales=[2])["jobs"][0]
    not_video = service.submit(inputs=[str(inputs / "notes.mp4")], models=[model], scales=[2])["jobs"][0]
    good = service.submit(inputs=[str(inputs / "small.mp4")], models=[model], scales=[2])["jobs"][0]
    failed = service.wait_state(missing["id"], "done", "failed")
    assert failed["state"] == "failed"
    assert "missing.mp4" in failed["error"] and "\n" not in failed["error"]
    failed = service.wait_state(not_video["id"], "done", "failed")
    assert failed["state"] == "failed" and "notes.mp4" in failed["error"], failed
    assert service.wait_state(good["id"], "done", "failed")["state"] == "done"
    small = str(inputs / "small.mp4")
    for body, field in (
        ({"inputs": [small], "models": ["no-such-model"]}, "models"),
        ({"inputs": [small], "models": [model], "scales": [99]}, "scales"),
        ({"inputs": [small], "models": [model], "codec": "divx"}, "codec"),
        ({"inputs": [small], "models": [model], "crf": 99}, "crf"),
        ({"inputs": [], "models": [model]}, "inputs"),
        ({"inputs": [small], "models": [model], "priority": "high"}, "priority"),
        ({"inputs": [small], "colour": "red"}, "colour"),
        ({"inputs": [small], "models": [model], "backend": "vulkan"}, "backend"),
        ({"inputs": [small], "models": [model], "dedup": "yes"}, "dedup"),
        ({"inputs": [small], "models": [model], "transport": "pigeon"}, "transport"),
        ({"inputs": [small], "models": [model], "dedup_level": "loose"}, "dedup_level"),  # no dedup
        ({"inputs": [small], "type": "compare", "dedup_level": "loose"}, "dedup_level"),
        # These workers run torch: no worker runs the model on ncnn.
        ({"inputs": [small], "models": [model], "backend": "ncnn"}, "models"),
    ):
        response = service.post("/api/jobs", body)
        assert response.status == 400, (body, response.body)
        assert response.json()["error"].startswith(f"{field}: "), response.json()
    plain = urllib.request.Request(service.url + "/api/jobs", data=b"{}", method="POST")
    plain.add_header("Content-Type", "text/plain")  # what a cross-site form may send
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(plain, timeout=30)
    assert refused.value.code == 415
    assert service.get("/healthz").status == 200


def test_cancel_running_and_queued_then_retry_resumes(
    service: ServiceProcess, inputs: Path, model: str, root: Path
) -> None:
    long = str(inputs / "long.mp4")
    jobs = service.submit(inputs=[long, long, long], models=[model], scales=[2, 3], priority=5)["jobs"]
    running = service.wait_job(jobs[0]["id"], lambda j: j["stage"] == "upscaling" and j["frames_done"] > 0)
    queued = [j for j in jobs if service.job(j["id"])["state"] == "queued"]
    assert queued, "with two jobs at once, later ones wait"
    started = time.monotonic()
    cancelled = service.post(f"/api/jobs/{running['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and time.monotonic() - started < 10
    assert not Path(running["output"]).exists(), "a cancelled job publishes no output"
    assert service.post(f"/api/jobs/{running['id']}/cancel").status == 409
    last = queued[-1]
    assert service.post(f"/api/jobs/{last['id']}/cancel").json()["state"] == "cancelled"
    assert service.post(f"/api/jobs/{jobs[1]['id']}/retry").status in {409}
    retried = service.post(f"/api/jobs/{running['id']}/retry").json()
    assert retried["state"] == "queued" and retried["error"] is None
    for job in jobs:
        if job["id"] != last["id"]:
            assert service.wait_state(job["id"], "done", "failed", timeout=180)["state"] == "done"
    assert service.job(last["id"])["state"] == "cancelled"
    assert "resuming job" in service.log_path.read_text(), "the retried job continued from its job directory"


def test_a_cancel_right_after_the_submit_ends_the_job(
    service: ServiceProcess, inputs: Path, model: str
) -> None:
    """Each cancel comes as soon as the submit's 201 is in: the job ends cancelled, never running on
    (tests/test_service_scheduler.py sweeps every instant of the start in process)."""
    for _ in range(5):
        job = service.submit(inputs=[str(inputs / "other.mp4")], models=[model], priority=50)["jobs"][0]
        answer = service.post(f"/api/jobs/{job['id']}/cancel")
        assert answer.status == 200 and answer.json()["state"] == "cancelled", answer.body
        assert service.job(job["id"])["state"] == "cancelled"


def test_delete_only_finished_jobs(service: ServiceProcess, inputs: Path, model: str) -> None:
    jobs = service.submit(inputs=[str(inputs / "long.mp4")] * 2, models=[model], scales=[2, 3])["jobs"]
    assert service.delete(f"/api/jobs/{jobs[0]['id']}").status == 409
    for job in jobs:
        service.wait_state(job["id"], "done")
    assert service.delete(f"/api/jobs/{jobs[0]['id']}").json() == {"deleted": jobs[0]["id"]}
    assert service.get(f"/api/jobs/{jobs[0]['id']}").status == 404
    assert service.delete("/api/jobs/nope").status == 404


def test_output_range_request_and_preview(service: ServiceProcess, inputs: Path, model: str) -> None:
    job = service.submit(inputs=[str(inputs / "small.mp4")], models=[model], scales=[2])["jobs"][0]
    done = service.wait_state(job["id"], "done")
    data = Path(done["output"]).read_bytes()
    req = urllib.request.Request(service.url + done["output_url"], headers={"Range": "bytes=10-99"})
    with urllib.request.urlopen(req, timeout=30) as response:
        assert response.status == 206
        assert response.read() == data[10:100]
        assert response.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    full = service.get(done["output_url"])
    assert full.status == 200 and full.body == data
    preview = service.get(f"{done['preview_url']}?frame=3")
    assert preview.status == 200 and preview.headers["Content-Type"] == "image/png"
    with Image.open(BytesIO(preview.body)) as image:
        assert image.size == (128 + 128, 72), "input and output at the same size, side by side"
        rgb = image.convert("RGB")
    source = Image.fromarray(decoded_frame(inputs / "small.mp4", 3))
    assert rgb.crop((0, 0, 128, 72)).tobytes() == source.resize((128, 72), Image.Resampling.NEAREST).tobytes()
    assert rgb.crop((0, 36, 128, 72)).getextrema() != ((0, 0), (0, 0), (0, 0)), "no black padding"
    assert service.get(f"{done['preview_url']}?frame=11").status == 400
    queued = service.submit(inputs=[str(inputs / "long.mp4")], models=[model], scales=[2])["jobs"][0]
    assert service.get(f"/api/jobs/{queued['id']}/output").status == 404
    service.wait_state(queued["id"], "done")


def test_upload_limit_and_uploaded_job(service: ServiceProcess, inputs: Path, model: str, root: Path) -> None:
    too_big = request(service.url + "/api/uploads", "POST", os.urandom(65 * 1024))
    assert too_big.status == 413, too_big.body  # refused from its Content-Length
    chunks = (os.urandom(16 * 1024) for _ in range(5))  # chunked: no length told, refused while streamed
    streamed = urllib.request.Request(service.url + "/api/uploads", data=chunks, method="POST")
    streamed.add_header("Content-Type", "application/octet-stream")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(streamed, timeout=30)
    assert refused.value.code == 413
    assert not list((root / "service" / "uploads").iterdir()), "nothing of a refused upload is kept"
    raw = (inputs / "small.mp4").read_bytes()
    boundary = "esrfarmboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="../../evil.mp4"\r\n'
            f"Content-Type: video/mp4\r\n\r\n"
        ).encode()
        + raw
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(service.url + "/api/uploads", data=form, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with urllib.request.urlopen(req, timeout=30) as response:
        upload = json.loads(response.read())["upload"]
    stored = root / "service" / "uploads" / upload
    assert stored.read_bytes() == raw and "evil" not in upload
    assert not (root.parent / "evil.mp4").exists()
    job = service.submit(upload=upload, models=[model], scales=[2])["jobs"][0]
    assert service.wait_state(job["id"], "done", "failed")["state"] == "done"
    assert service.post("/api/jobs", {"upload": "0" * 32, "models": [model]}).status == 400


def test_every_error_is_a_json_error_bounded_where_parsed(
    service: ServiceProcess, inputs: Path, model: str
) -> None:
    """Numbers beyond 64 bits, paths longer than the file system takes, an output directory nested
    thousands deep, a directory named like a video: each a 400 naming its field, never a 500."""
    small = str(inputs / "small.mp4")
    folder = inputs / "folder.mp4"
    folder.mkdir(exist_ok=True)
    (folder / "frame.png").write_bytes(b"")
    for body, field in (
        ({"inputs": [small], "priority": 2**64 - 1}, "priority"),
        ({"inputs": [small], "priority": -(2**63)}, "priority"),
        ({"inputs": [small], "type": "compare", "frames": 2**64 - 1}, "frames"),
        ({"inputs": [str(inputs / ("x" * 300 + ".mp4"))]}, "inputs"),
        ({"inputs": [str(inputs) + "/a" * 3000 + ".mp4"]}, "inputs"),
        ({"inputs": [str(folder)]}, "inputs"),
        ({"inputs": [small], "output_dir": "d/" * 3000}, "output_dir"),
        ({"inputs": [small], "output_dir": "d/" * 100}, "output_dir"),
        ({"inputs": [small], "output_dir": "n" * 300}, "output_dir"),
    ):
        response = service.post("/api/jobs", {**body, "models": [model]})
        assert response.status == 400, (str(body)[:200], response.status, response.body[:300])
        error = response.json()["error"]
        assert error.startswith(f"{field}: ") and len(error) < 400, error
    assert (
        "is a directory, not a video file"
        in service.post("/api/jobs", {"inputs": [str(folder)]}).json()["error"]
    )
    for header in (str(2**64), "9" * 5000, "-1"):
        replay = request_with(service, "/api/events", {"Last-Event-ID": header})
        assert replay.status == 400 and replay.json()["error"].startswith("Last-Event-ID"), replay.body[:300]
    boundary = "b0undary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{"n" * 100_000}"; filename="a.mp4"\r\n\r\n'
        f"abc\r\n--{boundary}--\r\n"
    ).encode()
    chunked = iter([form])  # no Content-Length: the service reads the part's headers
    req = urllib.request.Request(service.url + "/api/uploads", data=chunked, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 400 and json.loads(refused.value.read())["error"].startswith("file: ")
    assert service.get("/healthz").status == 200
    assert "Traceback" not in service.log_path.read_text(errors="replace")


def request_with(service: ServiceProcess, path: str, headers: dict[str, str]) -> Response:
    req = urllib.request.Request(service.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return Response(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), dict(exc.headers))


def open_files(pid: int) -> list[str]:
    """What the process has open now; a descriptor closed while we read the list is not open."""
    names = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            names.append(os.readlink(fd))
        except FileNotFoundError:
            continue
    return names


def test_a_stalled_upload_is_dropped_and_leaves_nothing(service: ServiceProcess, root: Path) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    uploads = root / "service" / "uploads"
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 60000\r\n\r\n" + b"x" * 10
        )  # then nothing more: the service drops it after --body-timeout
        answer = connection.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"error":"the upload stalled' in answer, answer
    assert not list(uploads.glob(".*.part")), "a dropped upload leaves no .part file"
    still_open = open_files(service.process.pid)
    assert not [name for name in still_open if name.endswith(".part")], "nor an open file"
    log_before = service.log_path.read_text(errors="replace")
    with socket.create_connection((host, int(port)), timeout=60) as connection:  # one that hangs up
        connection.sendall(
            b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 60000\r\n\r\n" + b"x" * 1000
        )
    wait_until(
        lambda: "the client went away" in service.log_path.read_text(errors="replace"), "the hang-up seen"
    )
    assert not list(uploads.glob(".*.part")), "an interrupted upload leaves nothing"
    assert "Traceback" not in service.log_path.read_text(errors="replace")[len(log_before) :]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_paths_are_confined_to_the_roots(
    service: ServiceProcess, inputs: Path, model: str, tmp_path: Path
) -> None:
    outside = clips.video(tmp_path / "outside.mp4", frames=2)
    link = inputs / f"link-{tmp_path.name}.mp4"
    link.symlink_to(outside)
    for path in (str(outside), str(link), str(inputs / ".." / outside.name), "relative.mp4"):
        response = service.post("/api/jobs", {"inputs": [path], "models": [model]})
        assert response.status == 403, (path, response.body)
        assert response.json()["error"].startswith("inputs: ")
    escape = service.post("/api/jobs", {"inputs": [str(inputs / "small.mp4")], "output_dir": str(tmp_path)})
    assert escape.status == 403 and escape.json()["error"].startswith("output_dir: ")


def test_events_arrive_in_order_and_replay_after_a_reconnect(
    service: ServiceProcess, inputs: Path, model: str
) -> None:
    since = service.get("/healthz").json()["last_event_id"]
    job = service.submit(inputs=[str(inputs / "long.mp4")], models=[model], scales=[2])["jobs"][0]
    ended = lambda seen: any(j["id"] == job["id"] and j["state"] == "done" for j in seen)  # noqa: E731
    stream = list(sse_events(f"{service.url}/api/events?since={since}", {}, ended))
    mine = [(i, j) for i, j in stream if j["id"] == job["id"]]
    ids = [i for i, _ in stream]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    states = [j["state"] for _, j in mine]
    assert states[0] == "queued" and states[-1] == "done"
    assert states == sorted(states, key=["queued", "running", "done"].index)
    done_counts = [j["frames_done"] for _, j in mine if j["stage"] == "upscaling"]
    assert done_counts == sorted(done_counts) and len(done_counts) >= 2
    middle = mine[len(mine) // 2][0]
    replay = list(
        sse_events(f"{service.url}/api/events", {"Last-Event-ID": str(middle)}, lambda seen: ended(seen))
    )
    assert [(i, j) for i, j in replay] == [(i, j) for i, j in stream if i > middle]


def test_submit_with_dedup(service: ServiceProcess, inputs: Path, model: str) -> None:
    job = service.submit(inputs=[str(inputs / "small.mp4")], models=[model], scales=[2], dedup=True)["jobs"][
        0
    ]
    assert job["dedup"] is True
    done = service.wait_state(job["id"], "done", "failed")
    assert done["state"] == "done", done
    assert probe(Path(done["output"]), full_decode=True).video.frame_count == 10


def test_submit_with_the_segments_transport(service: ServiceProcess, inputs: Path, model: str) -> None:
    job = service.submit(inputs=[str(inputs / "small.mp4")], models=[model], scales=[2], transport="segments")
    done = service.wait_state(job["jobs"][0]["id"], "done", "failed")
    assert done["state"] == "done", done
    assert probe(Path(done["output"]), full_decode=True).video.frame_count == 10
    assert "coordinator.segment_run" in service.log(), "the workers decoded and encoded its ranges"


def test_submit_wait_cli(service: ServiceProcess, inputs: Path, model: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ESRFARM_SERVICE": service.url}
    good = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "submit", str(inputs / "small.mp4"), "--model", model,
         "--scale", "2,3", "--preset", "ultrafast", "--wait"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "0frame" not in good.stderr and ": :" not in good.stderr, good.stderr  # no empty bar
    ids = good.stdout.split()[:2]
    assert all(service.job(i)["state"] == "done" for i in ids)
    bad = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "submit", str(inputs / "notes.mp4"), "--model", model,
         "--wait"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert bad.returncode == 1 and "failed" in bad.stdout, (bad.stdout, bad.stderr)
    listing = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "jobs", "--state", "done"],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )  # fmt: skip
    assert listing.returncode == 0 and ids[0] in listing.stdout
    assert listing.stdout.splitlines()[0].split()[:4] == ["ID", "STATE", "STAGE", "FRAMES"], listing.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "show", ids[0][:8]],  # as the page and --wait show it
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )  # fmt: skip
    assert json.loads(shown.stdout)["id"] == ids[0]


def test_a_unique_start_of_an_id_names_its_job(service: ServiceProcess, inputs: Path, model: str) -> None:
    small = str(inputs / "small.mp4")
    batch = service.submit(inputs=[small] * 17, models=[model], priority=-100)["jobs"]  # 17 ids: two
    try:  # share a first character at least
        job = batch[0]
        for prefix in (job["id"][:8], job["id"][:12], job["id"]):
            assert service.job(prefix)["id"] == job["id"]
        ids = sorted(j["id"] for j in batch)
        shared = next(a[:1] for a, b in itertools.pairwise(ids) if a[0] == b[0])
        ambiguous = service.post(f"/api/jobs/{shared}/cancel")
        assert ambiguous.status == 409, ambiguous.body
        assert ambiguous.json()["error"].startswith(f"job id {shared} is ambiguous: it starts "), (
            ambiguous.body
        )
        env = {**os.environ, "PYTHONPATH": str(REPO), "ESRFARM_SERVICE": service.url}
        last = batch[-1]  # the same input, model and scale: it waits for the 16 others
        for command, said in (("cancel", "cancelled"), ("retry", "queued again"), ("cancel", "cancelled")):
            done = subprocess.run(
                [sys.executable, "-m", "coordinator.cli", command, last["id"][:8]],
                capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
            )  # fmt: skip
            assert done.returncode == 0 and done.stdout.startswith(f"job {last['id']} {said}"), done
        assert service.job(last["id"])["state"] == "cancelled"
        missing = service.get("/api/jobs/zzzzzzzz")
        assert missing.status == 404 and missing.json() == {"error": "no job zzzzzzzz"}
        assert service.get(f"/api/jobs/{'a' * 1000}").json()["error"].startswith("no job 'aaa")
    finally:
        for each in batch:
            service.post(f"/api/jobs/{each['id']}/cancel")


def test_workers_and_health(service: ServiceProcess, workers: list[WorkerProcess]) -> None:
    listed = service.get("/api/workers").json()
    assert sorted(w["url"] for w in listed) == sorted(w.url for w in workers)
    assert all(w["model"] == "tiny-x4" and w["state"] in {"idle", "processing"} for w in listed)
    assert set(listed[0]) == {"url", "state", "model", "gpu_memory_used", "gpu_memory_total", "batch"}
    page = service.get("/")
    assert page.status == 200 and b"<html" in page.body


def test_off_loopback_needs_a_token(
    root: Path, logs: Path, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(
        service_command(root, ["--workers", workers[0].url, "--host", "0.0.0.0", "--port", "0"]),
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )  # fmt: skip
    assert refused.returncode == 2 and "--token-file" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    guarded = start_service(
        root, logs, ["--workers", workers[0].url, "--host", "0.0.0.0", "--token-file", token_file,
                     "--db", tmp_path / "jobs.db"],
    )  # fmt: skip
    try:
        assert guarded.get("/api/jobs").status == 401
        assert guarded.get("/api/jobs", token="wrong").status == 401
        assert guarded.get("/api/jobs", token="s3cret").status == 200
        assert guarded.post("/api/jobs", {"inputs": []}).status == 401
        assert guarded.get("/healthz").status == 200
        req = urllib.request.Request(f"{guarded.url}/api/events?token=s3cret")
        with urllib.request.urlopen(req, timeout=10) as stream:
            assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    finally:
        guarded.stop()
