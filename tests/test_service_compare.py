"""Comparison jobs in the service: ``POST /api/jobs`` with ``"type": "compare"`` (and ``esrfarm submit
--compare``) runs ``esrfarm compare`` per input over all the batch's models, serves each report, and
one comparison page for the batch; bad fields are refused at submit; cancel kills a running
comparison and leaves no report; retry runs it again. Real service, real ``esrfarm compare`` child
processes on the CPU (tiny seeded model and the bicubic baseline), real ffmpeg/libvmaf."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import clips
from tests.serviceutil import ServiceProcess, start_service
from tests.workerutil import REPO

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compare-inputs")
    clips.video(folder / "first.mp4", size="128x72", frames=8)
    clips.video(folder / "second clip.mp4", size="96x64", frames=6)
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, inputs: Path) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("compare-root")
    args = ["--input-root", inputs, "--compare-device", "cpu", "--compare-arg=--cpu-threads=1"]
    process = start_service(root, tmp_path_factory.mktemp("compare-logs"), args)
    yield process
    process.stop()


def submit(service: ServiceProcess, body: dict[str, object]) -> dict[str, Any]:
    answer = service.post("/api/jobs", body)
    assert answer.status == 201, (answer.status, answer.body)
    result: dict[str, Any] = answer.json()
    return result


def compare_body(inputs: Path, model: Path, *names: str, **more: object) -> dict[str, object]:
    return {
        "type": "compare", "inputs": [str(inputs / name) for name in names],
        "models": [str(model), "bicubic"], "scales": [2], "frames": 3, **more,
    }  # fmt: skip


def test_a_batch_gets_a_report_per_input_and_one_comparison_page(
    service: ServiceProcess, inputs: Path, tiny_model: Path
) -> None:
    batch = submit(service, compare_body(inputs, tiny_model, "first.mp4", "second clip.mp4"))
    jobs = batch["jobs"]
    assert len(jobs) == 2 and all(j["kind"] == "compare" and j["codec"] == "report" for j in jobs)
    assert batch["batch_url"] == f"/api/batches/{batch['batch_id']}/compare"
    done = [service.wait_state(j["id"], "done", "failed", timeout=240) for j in jobs]
    assert [j["state"] for j in done] == ["done", "done"], done
    assert all(j["frames_done"] == j["frames_total"] == 2 for j in done), "progress counts the models"
    for job in done:
        report = orjson.loads(Path(job["output"]).with_suffix(".json").read_bytes())
        assert [row["name"] for row in report["rows"]] == ["tiny-x4", "bicubic"]
        assert report["run"][1] - report["run"][0] == 2 and report["scale"] == 2
        assert all(row["status"] == "ok" and row["vmaf_neg"] is not None for row in report["rows"])
        page = service.get(job["output_url"])
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert page.headers["Content-Disposition"].startswith("inline")
        assert b"VMAF NEG" in page.body
        assert service.get(f"/api/jobs/{job['id']}/preview").status == 404
    batch_page = service.get(batch["batch_url"])
    assert batch_page.status == 200 and batch_page.headers["Content-Type"].startswith("text/html")
    text = batch_page.body.decode()
    assert "first.mp4" in text and "second clip.mp4" in text
    assert text.count("Best by VMAF NEG") == 2
    assert all(f'href="/api/jobs/{j["id"]}/output"' in text for j in jobs)
    assert service.get("/api/batches/0123456789abcdef/compare").status == 404


def test_a_comparison_with_dedup_reports_what_it_does_to_the_run(
    service: ServiceProcess, inputs: Path, tiny_model: Path
) -> None:
    """The submit body's dedup and dedup_level reach esrfarm compare: the report holds the --dedup
    record at that level (off and on rows per model), which a comparison without it does not."""
    body = compare_body(inputs, tiny_model, "first.mp4", dedup=True, dedup_level="loose")
    jobs = submit(service, body)["jobs"]
    assert (jobs[0]["dedup"], jobs[0]["dedup_level"]) == (True, "loose")
    done = service.wait_state(jobs[0]["id"], "done", "failed", timeout=240)
    assert done["state"] == "done", done
    report = orjson.loads(Path(done["output"]).with_suffix(".json").read_bytes())
    assert report["dedup"] is not None, "the comparison ran without --dedup"
    assert report["dedup"]["level"] == "loose", report["dedup"]
    assert all(row["dedup"] is not None for row in report["rows"] if row["status"] == "ok")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "transcode"}, "type"),
        ({"codec": "ffv1"}, "codec"),
        ({"scales": [1.5]}, "scales"),
        ({"frames": 1}, "frames"),
        ({"frames": "many"}, "frames"),
        ({"models": ["no-such-model"]}, "models"),
    ],
)
def test_bad_comparison_fields_are_refused_at_submit(
    service: ServiceProcess, inputs: Path, tiny_model: Path, change: dict[str, object], field: str
) -> None:
    before = len(service.get("/api/jobs").json())
    answer = service.post("/api/jobs", compare_body(inputs, tiny_model, "first.mp4", **change))
    assert answer.status == 400 and answer.json()["error"].startswith(f"{field}:"), answer.body
    assert len(service.get("/api/jobs").json()) == before, "nothing was queued"


def test_cancel_kills_a_running_comparison_and_retry_runs_it_again(
    service: ServiceProcess, inputs: Path, tiny_model: Path
) -> None:
    job = submit(service, compare_body(inputs, tiny_model, "first.mp4", frames=6))["jobs"][0]
    service.wait_state(job["id"], "running")
    cancelled = service.post(f"/api/jobs/{job['id']}/cancel", {})
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled", cancelled.body
    report = Path(job["output"])
    assert not report.exists() and not report.with_suffix(".json").exists(), "no report from a cancel"
    assert "killing the comparison of job" in service.log_path.read_text()
    assert service.post(f"/api/jobs/{job['id']}/retry", {}).status == 200
    again = service.wait_state(job["id"], "done", "failed", timeout=240)
    assert again["state"] == "done" and report.is_file(), again


def test_submit_compare_cli_waits_and_names_the_page(
    service: ServiceProcess, inputs: Path, tiny_model: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable, "-m", "coordinator.cli", "submit", "--service", service.url, "--compare",
        str(inputs / "second clip.mp4"), "--model", f"{tiny_model},bicubic", "--frames", "2", "--wait",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert done.returncode == 0, (done.stdout, done.stderr)
    job_id = done.stdout.split()[0]
    assert service.job(job_id)["state"] == "done"
    assert f"comparison page: {service.url}/api/batches/" in done.stderr
    refused = subprocess.run(
        [*argv[:-1], "--codec", "ffv1"], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    assert refused.returncode == 1 and "--codec is for upscaling jobs" in refused.stderr
