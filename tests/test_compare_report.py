"""``esrfarm compare`` end to end: a generated clip, the tiny seeded model and bicubic, the report
opened in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from compare.cli import main
from compare.results import ModelResult, table_cells
from compare.run import default_models, run_comparison
from compare.spec import CompareSpec
from tests import clips
from tests.browser import chromium
from tests.model_factory import write_tiny_compact
from tests.workerutil import REPO

SCORES = ("psnr", "ssim", "vmaf", "vmaf_neg", "flicker", "fps", "projected_s")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clips.video(tmp_path_factory.mktemp("compare-clip") / "clip.mp4", size="128x72", frames=12)


@pytest.fixture(scope="module")
def report(clip: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One real comparison through the command: the tiny model and bicubic on 4 frames."""
    folder = tmp_path_factory.mktemp("compare-report")
    html, json = folder / "report.html", folder / "report.json"
    code = main([str(clip), "--models", f"{tiny_model},bicubic", "--frames", "4", "--report", str(html),
                 "--json", str(json), "-q", "--cpu-threads", "2"])  # fmt: skip
    assert code == 0
    return html, json, str(tiny_model)


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def test_the_json_has_every_row_and_every_figure(report: tuple[Path, Path, str], clip: Path) -> None:
    _, json, _ = report
    data = read_json(json)
    assert data["format"] == "esrfarm-compare/1"
    assert data["input"] == str(clip) and (data["width"], data["height"], data["frame_count"]) == (
        128,
        72,
        12,
    )
    assert [r["name"] for r in data["rows"]] == ["tiny-x4", "bicubic"]
    assert data["run"][1] - data["run"][0] == 3 and data["scale"] == 2
    for row in data["rows"]:
        assert row["status"] == "ok", row
        for key in SCORES:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["name"], key)
        assert 10 < row["psnr"] < 60 and 0 < row["ssim"] <= 1 and 0 <= row["vmaf_neg"] <= 100
        assert len(row["psnr_frames"]) == len(row["vmaf_frames"]) == len(row["vmaf_neg_frames"]) == 4
        assert row["shift"] is not None and row["projected_s"] == pytest.approx(12 / row["fps"])
    bicubic = data["rows"][1]
    assert bicubic["flicker"] == 1.0  # the flicker reference is bicubic itself
    assert bicubic["shift"] == [0.0, 0.0]  # Pillow's downscale and upscale are aligned
    assert data["best"] in ("tiny-x4", "bicubic") and data["fastest_near_best"] in ("tiny-x4", "bicubic")
    assert data["machine"]["device"] == "cpu" and data["machine"]["commit"] != ""
    assert data["dedup"] is None and all(row["dedup"] is None for row in data["rows"])  # without --dedup


def test_a_json_row_reads_back_as_the_row_that_wrote_it(report: tuple[Path, Path, str]) -> None:
    """``ModelResult.from_json`` (the service's batch page reads reports with it) inverts the JSON,
    infinities written as "inf" included, so the page shows the report's own cells."""
    for data in read_json(report[1])["rows"]:
        row = ModelResult.from_json(data)
        assert orjson.loads(orjson.dumps(asdict(row))) == data
    identical = {"name": "same", "kind": "model", "status": "ok", "psnr": "inf", "psnr_frames": ["inf", 40.0],
                 "shift": [0.25, -0.5], "ssim": 1.0}  # fmt: skip
    row = ModelResult.from_json(identical)
    assert row.psnr == math.inf and row.psnr_frames == (math.inf, 40.0) and row.shift == (0.25, -0.5)
    assert table_cells(row)[1:3] == ["inf", "1.0000"]


def test_the_same_inputs_give_the_same_numbers(report: tuple[Path, Path, str], clip: Path) -> None:
    _, json, tiny = report
    again = run_comparison(CompareSpec(clip, models=(tiny, "bicubic"), frames=4, cpu_threads=2)).to_json()
    first = read_json(json)
    assert again["run"] == first["run"]
    for before, after in zip(first["rows"], again["rows"], strict=True):
        for key in ("psnr", "ssim", "vmaf", "vmaf_neg", "flicker", "shift", "psnr_frames", "vmaf_neg_frames"):
            assert before[key] == after[key], key


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def test_the_report_opens_offline_in_chromium(
    report: tuple[Path, Path, str], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    html, _, _ = report
    text = html.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    browser.get(html.as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []

    rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert [r.get_attribute("data-model") for r in rows] == ["tiny-x4", "bicubic"]
    assert rows[0].find_elements(By.TAG_NAME, "td")[0].text == "tiny-x4"
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 3 + 2  # input, tiny, bicubic crops; the slider's two frames
    for image in images:
        loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        assert loaded and loaded > 0, image.get_attribute("alt")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith("data:") for name in resources), resources
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-svg circle.point")) == 2

    browser.execute_script(
        "var r = document.getElementById('ba-range'); r.value = 20; r.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element(By.ID, "ba-after").get_attribute("style") == "width: 20%;"
    assert "Best by VMAF NEG" in browser.find_element(By.ID, "verdict").text
    assert browser.find_elements(By.ID, "dedup") == []  # the --dedup section only with --dedup
    assert browser.save_screenshot(str(tmp_path / "report.png"))


def run_cli(*args: str) -> tuple[int, str, str]:
    process = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    return process.returncode, process.stdout, process.stderr


def test_esrfarm_runs_compare_and_lists_it() -> None:
    code, out, _ = run_cli("compare", "--help")
    assert code == 0 and out.startswith("usage: esrfarm compare") and "Cost:" in out
    code, _, err = run_cli()
    assert code == 2 and "compare" in err


def test_bad_inputs_give_one_line_and_no_report(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html = tmp_path / "r.html"
    cases: list[tuple[list[str], int, str]] = [
        ([str(tmp_path / "missing.mp4")], 1, "does not exist"),
        ([str(clip), "--models", "no-such-model"], 2, "unknown model 'no-such-model'"),
        ([str(clip), "--frames", "20"], 1, "has 12 frames in the window (frames 1-12), fewer than the 20"),
        ([str(clip), "--region", "64x48+100+40"], 1, "region 64x48+100+40 does not fit in the 128x72 frame"),
        ([str(clip), "--start", "9"], 1, "has no frame between 9 s and the end"),
    ]
    for args, expected_code, message in cases:
        code = main([*args, "--models", "bicubic", "--report", str(html), "-q"] if "--models" not in args
                    else [*args, "--report", str(html), "-q"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == expected_code, (args, err)
        assert err.startswith("esrfarm compare: error: ") and message in err and err.count("\n") == 1, err
        assert not html.exists() and not html.with_suffix(".json").exists()
        assert list(tmp_path.iterdir()) == []  # no temporary file left either

    html.write_text("an earlier report")
    assert main([str(clip), "--models", "bicubic", "--report", str(html), "-q"]) == 2
    assert (
        "already exists (pass --overwrite" in capsys.readouterr().err
        and html.read_text() == "an earlier report"
    )


def test_models_that_cannot_serve_or_load_are_skipped_rows(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x2 = write_tiny_compact(tmp_path / "tiny-x2.pth", scale=2)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a model")
    html = tmp_path / "r.html"
    code = main([str(clip), "--models", f"{x2},{broken},bicubic", "--scale", "4", "--frames", "2",
                 "--report", str(html), "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = {r["name"]: r for r in read_json(html.with_suffix(".json"))["rows"]}
    assert (
        rows["tiny-x2"]["status"] == "skipped" and "a x2 model cannot serve x4" in rows["tiny-x2"]["reason"]
    )
    assert rows["broken"]["status"] == "skipped" and "cannot load" in rows["broken"]["reason"]
    assert rows["bicubic"]["status"] == "ok"
    assert "tiny-x2: skipped: a x2 model cannot serve x4" in out and "broken: skipped: cannot load" in out


def test_the_default_models_are_the_offline_ones_then_the_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESRFARM_MODEL_DIR", str(tmp_path))  # an empty cache: only the ncnn copies are offline
    assert default_models() == (
        "realesr-animevideov3",
        "realesrgan-x4plus",
        "realesrgan-x4plus-anime",
        "bicubic",
        "lanczos",
    )
    write_tiny_compact(tmp_path / "realesr-general-x4v3.pth")  # a cached official file counts too
    assert "realesr-general-x4v3" in default_models()


class Cancelled(Exception):
    pass


def test_a_progress_callback_can_cancel_a_comparison(clip: Path) -> None:
    seen: list[str] = []

    def progress(text: str) -> None:
        seen.append(text)
        if text.startswith("[1/"):
            raise Cancelled

    with pytest.raises(Cancelled):
        run_comparison(CompareSpec(clip, models=("bicubic",), frames=2), progress)
    assert seen[0].startswith("reading frames") and seen[-1] == "[1/1] bicubic"
