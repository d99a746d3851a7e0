"""``esrfarm compare --dedup``: on a clip of held frames (each drawing held for 3 frames, re-encoded by
libx264), the tiny seeded model and bicubic are run with and without ``--dedup``; the report's
numbers and its off/on rows, opened in headless Chromium."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from compare.cli import build_parser, main
from compare.dedup import HeldFrames, find_held_frames, upscale_with_dedup
from compare.frames import PillowUpscaler, read_run
from compare.metrics import temporal_energy
from compare.results import ModelResult
from compare.spec import CompareSpec
from manifests.dedup import DEDUP_LEVELS
from media.probe import probe
from tests import clips
from tests.browser import chromium

HOLD = 3
FRAMES = 6  # frames compared: two or three drawings of the clip


@pytest.fixture(scope="module")
def held_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compare-dedup-clip")
    moving = clips.video(folder / "moving.mp4", size="256x144", frames=12)
    return clips.held_video(folder / "held.mp4", moving, hold=HOLD, frames=12, size="128x72")


@pytest.fixture(scope="module")
def report(
    held_clip: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("compare-dedup-report")
    html, json = folder / "report.html", folder / "report.json"
    code = main([str(held_clip), "--models", f"{tiny_model},bicubic", "--frames", str(FRAMES), "--dedup",
                 "--report", str(html), "--json", str(json), "-q", "--cpu-threads", "2"])  # fmt: skip
    assert code == 0
    data: dict[str, Any] = orjson.loads(json.read_bytes())
    return html, data


def test_dedup_upscales_each_held_drawing_once_and_reuses_it_for_its_repeats(
    report: tuple[Path, dict[str, Any]],
) -> None:
    _, data = report
    first, last = data["run"]
    held = data["dedup"]
    assert held["frames"] == FRAMES and held["samples"] == "yuv420p"  # as a job with YUV frames decodes
    assert (held["level"], held["threshold"], held["blur"]) == ("strict", 3.0, 1)  # the default level
    drawings = {(frame - 1) // HOLD for frame in range(first, last + 1)}
    for frame, reference in held["duplicates"]:  # a repeat of the same drawing, never of a neighbour
        assert first <= reference < frame <= last and (reference - 1) // HOLD == (frame - 1) // HOLD
    upscaled = FRAMES - len(held["duplicates"])
    assert len(drawings) <= upscaled < FRAMES, held
    reused = {frame - first for frame, _ in held["duplicates"]}
    for row in data["rows"]:
        dedup = row["dedup"]
        assert (dedup["frames"], dedup["upscaled"]) == (FRAMES, upscaled), row["name"]
        # The model and bicubic are deterministic: a frame upscaled either way is the same (inf),
        # a reused frame is its reference's upscale, off by the compression noise between them.
        for index, value in enumerate(dedup["psnr_frames"]):
            assert (value != "inf") == (index in reused), (row["name"], index, value)
        finite = [v for v in dedup["psnr_frames"] if v != "inf"]
        assert dedup["psnr_min"] == min(finite) and 35 < dedup["psnr_min"] <= dedup["psnr_mean"]
        assert dedup["seconds_off"] > 0 and dedup["seconds_on"] > 0
        assert 0 < dedup["flicker"] < math.inf and row["flicker"] > 0
    restored = ModelResult.from_json(data["rows"][0])  # the service's page reads rows with it
    assert restored.dedup is not None and restored.dedup.upscaled == upscaled
    assert restored.dedup.psnr_frames.count(math.inf) == FRAMES - len(reused)


def test_a_held_frame_shows_its_references_upscale() -> None:
    """``upscale_with_dedup`` gives the model only the frames not held (besides the first, already
    upscaled off) and gives each held frame the upscale of its reference."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 8, 12, 3), dtype=np.uint8)
    given: list[int] = []

    class Counting:
        def upscale(self, batch: np.ndarray) -> np.ndarray:
            given.append(len(batch))
            return PillowUpscaler("bicubic", 2).upscale(batch)

    off = PillowUpscaler("bicubic", 2).upscale(frames)
    held = HeldFrames((None, 0, None, 2, 2), "rgb24", 0.0, DEDUP_LEVELS["strict"])
    result = upscale_with_dedup(Counting(), frames, held, off, 1.0, temporal_energy(off))
    assert given == [1] and result.upscaled == 2  # frame 2 only: frame 0 was off's warm-up
    assert result.psnr_frames[0] == result.psnr_frames[2] == math.inf
    assert all(result.psnr_frames[i] < 30 for i in (1, 3, 4))  # random frames: their reference differs
    assert result.flicker < 1  # three transitions of five show no change at all


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def test_the_report_shows_each_model_off_and_on(
    report: tuple[Path, dict[str, Any]], browser: webdriver.Chrome
) -> None:
    html, data = report
    browser.get(html.as_uri())
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    rows = browser.find_elements(By.CSS_SELECTOR, "#dedup tbody tr")
    names = [row["name"] for row in data["rows"]]
    assert [(r.get_attribute("data-model"), r.get_attribute("data-dedup")) for r in rows] == [
        (name, mode) for name in names for mode in ("off", "on")
    ]
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#dedup thead th")]
    upscaled = data["rows"][0]["dedup"]["upscaled"]
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        off_cells = dict(zip(heads, (td.text for td in off.find_elements(By.TAG_NAME, "td")), strict=True))
        on_cells = dict(zip(heads, (td.text for td in on.find_elements(By.TAG_NAME, "td")), strict=True))
        assert off_cells["frames upscaled"] == f"{FRAMES} / {FRAMES} (1.00)"
        assert on_cells["frames upscaled"] == f"{upscaled} / {FRAMES} ({upscaled / FRAMES:.2f})"
        assert on_cells["seconds"].endswith(" s") and float(on_cells["on/off"]) > 0
        assert on_cells["PSNR vs off, worst / run"].endswith(" dB")
        assert off_cells["flicker"] and on_cells["flicker"]
    found = browser.find_element(By.ID, "dedup-found").text
    assert found.startswith(
        f"{upscaled} of the run's {FRAMES} frames are upscaled with --dedup --dedup-level strict"
    )
    assert "running the comparison again with --dedup-level loose" in found
    assert "With --dedup, tiny-x4 upscales" in browser.find_element(By.ID, "verdict").text


def test_help_names_dedup() -> None:
    text = build_parser().format_help()
    assert "--dedup" in text and "With --dedup, the held frames of the run" in text


def test_the_level_reaches_the_detector_and_the_record(tmp_path: Path) -> None:
    """``--dedup-level loose``: the run's held frames are found at that level, and the report's record
    says which (on a clip re-encoded at CRF 28, where the levels differ)."""
    moving = clips.video(tmp_path / "moving.mp4", size="256x144", frames=24)
    clip = clips.held_video(tmp_path / "held3-28.mp4", moving, hold=3, frames=24, crf=28)
    info = probe(clip)
    run = range(24)
    frames = read_run(info, run)
    strict = find_held_frames(info, run, frames, DEDUP_LEVELS["strict"])
    loose = find_held_frames(info, run, frames, DEDUP_LEVELS["loose"])
    assert len(loose.upscaled) < len(strict.upscaled)
    record = loose.record(1)
    assert (record.level, record.blur, record.threshold) == ("loose", 2, 4.0)
    assert record.upscaled == len(loose.upscaled)
    args = build_parser().parse_args([str(clip), "--dedup", "--dedup-level", "loose"])
    assert (args.dedup, args.dedup_level) == (True, "loose")
    with pytest.raises(ValueError, match=r"^dedup_level is for --dedup: say --dedup as well$"):
        CompareSpec(input=clip, dedup_level="loose")
    with pytest.raises(ValueError, match=r"^dedup_level must be one of strict, loose, not 'lax'$"):
        CompareSpec(input=clip, dedup=True, dedup_level="lax")
