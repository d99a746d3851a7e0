"""The job service's web page in headless Chromium, against a real service process over two real CPU
workers and the tiny seeded model: a job submitted through the form shows a moving progress bar,
reaches done, and its download link gives the upscaled video; with a token the page asks for it once,
and a file uploaded through the form becomes a job.

``ESRFARM_SCREENSHOT=docs/service-page.png python -m pytest tests/test_service_page.py`` also saves
the README's screenshot (a second job running beside the finished one).
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

from media.probe import probe
from tests import clips
from tests.browser import chromium
from tests.serviceutil import ServiceProcess, cpu_workers, start_service
from tests.workerutil import WorkerProcess

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")
SIZE = (320, 180)
FRAMES = 60
#: The live test's clip: long enough that a loaded machine still shows the bar at several widths
#: (progress arrives about twice a second; 60 frames have ended within two updates under load).
LIVE_FRAMES = 180

# Every width the running job's progress bar takes, with the stage shown beside it.
RECORD_WIDTHS = """
window.widths = [];
new MutationObserver(() => {
  for (const row of document.querySelectorAll('#running tbody tr')) {
    const bar = row.querySelector('.progress .bar');
    const last = window.widths[window.widths.length - 1];
    const seen = [row.querySelector('td.stage').textContent, bar.style.width];
    if (!last || last[0] !== seen[0] || last[1] !== seen[1]) window.widths.push(seen);
  }
}).observe(document.querySelector('#running tbody'),
           {subtree: true, childList: true, attributes: true, characterData: true});
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("page-root")
    (directory / "inputs").mkdir()
    clips.video(directory / "inputs" / "clip.mp4", size=f"{SIZE[0]}x{SIZE[1]}", frames=FRAMES)
    return directory


@pytest.fixture(scope="module")
def inputs(root: Path) -> Path:
    return root / "inputs"


@pytest.fixture(scope="module")
def logs(root: Path) -> Path:
    return root / "logs"


@pytest.fixture(scope="module")
def workers(root: Path, tiny_model: Path, logs: Path) -> Iterator[list[WorkerProcess]]:
    with cpu_workers(root, tiny_model, logs) as started:
        yield started


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium(window="1280,1000") as driver:
        yield driver


def start_page_service(
    root: Path,
    inputs: Path,
    logs: Path,
    workers: list[WorkerProcess],
    *args: str | Path,
    token: str | None = None,
) -> ServiceProcess:
    urls = ",".join(w.url for w in workers)
    return start_service(root, logs, ["--workers", urls, "--input-root", inputs, *args], token=token)


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 120.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def finished_row(browser: webdriver.Chrome, job_id: str) -> WebElement | None:
    rows = browser.find_elements(By.CSS_SELECTOR, f'#finished tbody tr[data-job-id="{job_id}"]')
    return rows[0] if rows else None


def submit_through_the_form(
    browser: webdriver.Chrome, path: Path, model: Path, scale: str, *, upload: bool = False,
    models: str | None = None,
) -> None:  # fmt: skip
    """Fill the form and submit: ``path`` as the input path, or (``upload``) as the file to upload;
    ``models`` (comma-separated) instead of ``model``."""
    source = "" if upload else str(path)
    fields = (("input-path", source), ("models", models or str(model)), ("scales", scale))
    for field, value in fields:
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    if upload:
        browser.find_element(By.ID, "upload-file").send_keys(str(path))
    button = browser.find_element(By.ID, "submit-button")
    button.click()
    status = browser.find_element(By.ID, "submit-status")
    wait_for("the submit answer", lambda: button.is_enabled() and status.text)
    assert status.text == "Submitted 1 job.", status.text


def severe_errors(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_a_job_submitted_through_the_form_runs_live_and_downloads(
    root: Path, inputs: Path, logs: Path, workers: list[WorkerProcess], tiny_model: Path,
    browser: webdriver.Chrome, tmp_path: Path,
) -> None:  # fmt: skip
    service = start_page_service(root, inputs, logs, workers)
    try:
        browser.get(service.url + "/")
        connection = browser.find_element(By.ID, "connection")
        wait_for("the event stream", lambda: connection.text == "live", 30)
        wait_for(
            "both workers", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2
        )
        browser.execute_script(RECORD_WIDTHS)

        live = clips.video(inputs / "live.mp4", size=f"{SIZE[0]}x{SIZE[1]}", frames=LIVE_FRAMES)
        submit_through_the_form(browser, live, tiny_model, "2")
        [job] = service.get("/api/jobs").json()
        row = wait_for("the finished row", lambda: finished_row(browser, job["id"]))
        assert row.get_attribute("data-state") == "done"

        # The bar moved while the job ran: several widths within the upscaling stage, none reloaded.
        widths: list[list[str]] = browser.execute_script("return window.widths")
        upscaling = [float(width.rstrip("%")) for stage, width in widths if stage == "upscaling"]
        assert len({w for w in upscaling if 0 < w < 100}) >= 2, widths
        assert upscaling == sorted(upscaling), widths
        assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1

        # The download link gives the upscaled video: every frame, twice the size.
        link = row.find_element(By.CSS_SELECTOR, "a.download")
        href = link.get_attribute("href")
        assert href == service.url + service.job(job["id"])["output_url"]
        output = tmp_path / "downloaded.mp4"
        with urllib.request.urlopen(href, timeout=30) as response:
            assert response.status == 200
            output.write_bytes(response.read())
        info = probe(output)
        assert (info.video.width, info.video.height) == (SIZE[0] * 2, SIZE[1] * 2)
        assert info.frame_count == LIVE_FRAMES

        # The preview is the PNG of input and output side by side, loaded by the page.
        preview = row.find_element(By.CSS_SELECTOR, "img.preview")
        wait_for("the preview", lambda: browser.execute_script("return arguments[0].naturalWidth", preview))
        # Input and output at the same size: twice the output's width, shown at one height.
        assert browser.execute_script("return arguments[0].naturalWidth", preview) == SIZE[0] * 4
        with urllib.request.urlopen(preview.get_attribute("src"), timeout=30) as response:
            assert Image.open(BytesIO(response.read())).size == (SIZE[0] * 4, SIZE[1] * 2)
        assert row.find_element(By.CSS_SELECTOR, "td.duration").text != ""
        assert browser.find_element(By.ID, "running-count").text == "0"
        assert browser.find_element(By.ID, "finished-count").text == "1"
        assert severe_errors(browser) == []

        screenshot = os.environ.get("ESRFARM_SCREENSHOT")
        if screenshot:
            save_screenshot(browser, service, inputs, tiny_model, Path(screenshot))
    finally:
        service.stop()


def save_screenshot(
    browser: webdriver.Chrome, service: ServiceProcess, inputs: Path, model: Path, path: Path
) -> None:
    """A second, longer job halfway through beside the finished one, and one queued behind it."""
    clips.video(inputs / "episode-02.mp4", size="320x180", frames=120)
    service.submit(inputs=[str(inputs / "episode-02.mp4")], models=[str(model)], scales=[4], priority=0)
    submit_through_the_form(browser, inputs / "episode-02.mp4", model, "2")
    service.submit(inputs=[str(inputs / "episode-02.mp4")], models=[str(model)], scales=[3], priority=1)
    bar = wait_for("a running bar", lambda: browser.find_elements(By.CSS_SELECTOR, "#running .progress .bar"))
    wait_for("upscaling", lambda: "upscaling" in browser.find_element(By.ID, "running").text)
    wait_for("progress", lambda: float(bar[0].value_of_css_property("width").rstrip("px")) > 60)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(path))


def test_with_a_token_the_page_asks_for_it_once(
    root: Path, inputs: Path, logs: Path, workers: list[WorkerProcess], tiny_model: Path,
    browser: webdriver.Chrome, tmp_path: Path,
) -> None:  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text("page-secret\n")
    service = start_page_service(
        root,
        inputs,
        logs,
        workers,
        "--token-file",
        token_file,
        "--db",
        tmp_path / "jobs.db",
        token="page-secret",
    )
    try:
        browser.get("about:blank")
        browser.get_log("browser")  # what an earlier page left there
        browser.get(service.url + "/")
        form = browser.find_element(By.ID, "token-form")
        wait_for("the token form", form.is_displayed, 30)
        browser.find_element(By.ID, "token-input").send_keys("wrong")
        form.find_element(By.TAG_NAME, "button").click()
        wait_for(
            "the token refused", lambda: form.is_displayed() and "refused" in form.get_attribute("class")
        )

        browser.find_element(By.ID, "token-input").send_keys("page-secret")
        form.find_element(By.TAG_NAME, "button").click()
        connection = browser.find_element(By.ID, "connection")
        wait_for("the event stream", lambda: connection.text == "live", 30)
        assert not form.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('esrfarm-token')") == "page-secret"

        # The form uploads the file and submits it with the header; live updates arrive over the
        # token-authorised event stream. The upload is stored under a generated name.
        submit_through_the_form(browser, inputs / "clip.mp4", tiny_model, "2", upload=True)
        [job] = service.get("/api/jobs").json()
        assert Path(job["input"]).parent == root / "service" / "uploads" and "clip" not in job["input"]
        row = wait_for("the finished row", lambda: finished_row(browser, job["id"]))
        preview = row.find_element(By.CSS_SELECTOR, "img.preview")
        wait_for("the preview", lambda: browser.execute_script("return arguments[0].naturalWidth", preview))
        assert preview.get_attribute("src").startswith("blob:")

        # A reload asks nothing: the token is kept for the tab.
        browser.refresh()
        wait_for("the event stream", lambda: browser.find_element(By.ID, "connection").text == "live", 30)
        assert not browser.find_element(By.ID, "token-form").is_displayed()
        errors = severe_errors(browser)  # the refused requests, and nothing else
        assert all("401" in entry["message"] for entry in errors), errors
    finally:
        service.stop()


def test_a_comparison_submitted_through_the_form_links_its_report_and_batch_page(
    root: Path, inputs: Path, logs: Path, workers: list[WorkerProcess], tiny_model: Path,
    browser: webdriver.Chrome, tmp_path: Path,
) -> None:  # fmt: skip
    service = start_page_service(
        root, inputs, logs, workers, "--db", tmp_path / "jobs.db", "--compare-device", "cpu",
        "--compare-arg=--cpu-threads=1",
    )  # fmt: skip
    try:
        browser.get("about:blank")
        browser.get_log("browser")  # what an earlier page left there (its service stopped under it)
        browser.get(service.url + "/")
        Select(browser.find_element(By.ID, "job-type")).select_by_value("compare")
        assert not browser.find_element(By.ID, "codec").is_enabled(), "a comparison has no codec"
        submit_through_the_form(browser, inputs / "clip.mp4", tiny_model, "2", models=f"{tiny_model},bicubic")
        [job] = service.get("/api/jobs").json()
        assert job["kind"] == "compare" and job["model"] == f"{tiny_model},bicubic", job
        assert service.wait_state(job["id"], "done", "failed", timeout=240)["state"] == "done"
        row = wait_for("the finished row", lambda: finished_row(browser, job["id"]))
        report = row.find_element(By.CSS_SELECTOR, "a.report")
        assert report.get_attribute("href") == service.url + job_output_url(service, job["id"])
        batch = row.find_element(By.CSS_SELECTOR, "a.batch")
        assert batch.get_attribute("href") == f"{service.url}/api/batches/{job['batch_id']}/compare"
        assert row.find_element(By.CSS_SELECTOR, "td.model").text == "tiny-x4, bicubic"
        assert not row.find_elements(By.CSS_SELECTOR, "img.preview"), "a comparison has no preview"
        browser.get(batch.get_attribute("href"))
        assert "Best by VMAF NEG" in browser.find_element(By.TAG_NAME, "body").text
        assert severe_errors(browser) == []
    finally:
        service.stop()


def job_output_url(service: ServiceProcess, job_id: str) -> str:
    url: str = service.job(job_id)["output_url"]
    return url


def test_the_page_says_loading_until_its_first_data(
    root: Path, inputs: Path, logs: Path, workers: list[WorkerProcess], browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:  # fmt: skip
    """While /api/jobs and /api/workers do not answer (blocked here, as a slow service would hold
    them), no table says it is empty: each says Loading…; once they answer, the empty ones say so."""
    service = start_page_service(root, inputs, logs, workers, "--db", tmp_path / "jobs.db")
    notes = {"running": "Nothing running.", "queue": "The queue is empty.", "workers": "No worker.",
             "finished": "No finished job yet."}  # fmt: skip

    def note(table: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, f'.empty[data-for="{table}"]').text)

    try:
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/api/jobs*", "*/api/workers*"]})
        try:
            browser.get(service.url + "/")
            connection = browser.find_element(By.ID, "connection")
            wait_for("a failed first load", lambda: connection.text in ("offline", "reconnecting"), 30)
            assert {table: note(table) for table in notes} == dict.fromkeys(notes, "Loading…")
            assert browser.find_element(By.ID, "running-count").text == ""
            shot = os.environ.get("ESRFARM_LOADING_SCREENSHOT")
            if shot:
                assert browser.save_screenshot(shot)
        finally:
            browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        wait_for("the event stream", lambda: connection.text == "live", 30)
        wait_for("the first data", lambda: note("running") == notes["running"], 30)
        wait_for("the workers", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2)
        assert {table: note(table) for table in ("running", "queue", "finished")} == {
            table: notes[table] for table in ("running", "queue", "finished")
        }
        assert browser.find_element(By.ID, "running-count").text == "0"
    finally:
        browser.get_log("browser")  # the blocked requests' errors stay with this test
        service.stop()
