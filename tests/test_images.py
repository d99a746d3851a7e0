"""Still images and folders of images through the same engine and workers as videos."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coordinator.errors import JobError
from coordinator.events import Finished
from coordinator.images import probe_images
from media.errors import InputError, OutputPathError
from tests import clips
from tests.fakeworkers import fake_farm, nearest
from tests.test_job_engine import farm, run, spec
from tests.workerutil import REPO
from worker.runtime import RuntimeSettings, load_upscaler


def picture(path: Path, size: tuple[int, int], *, mode: str = "RGB", seed: int = 0, **save: object) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(path, **save)
    return path


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_one_image_in_one_image_out(tmp_path: Path) -> None:
    source = picture(tmp_path / "photo.png", (13, 7))
    output = tmp_path / "big.png"
    root = tmp_path / "root"
    events, _, error = asyncio.run(run(spec(source, output), fake_farm(root, 1), farm(root)))
    assert error is None, error
    assert isinstance(events[-1], Finished) and events[-1].result.frames == 1
    assert np.array_equal(rgb(output), nearest(rgb(source), 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "photo.png", "root"]


def test_a_folder_of_images_of_every_size_and_format(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    picture(photos / "a.png", (16, 9), seed=1)
    picture(photos / "b.jpg", (10, 20), seed=2, quality=95)
    picture(photos / "c.webp", (7, 7), seed=3, lossless=True)
    (photos / "notes.txt").write_text("not an image")
    output = tmp_path / "upscaled"
    root = tmp_path / "root"
    _, _, error = asyncio.run(run(spec(photos, output, max_disk=20_000), fake_farm(root, 2), farm(root)))
    assert error is None, error
    assert sorted(p.name for p in output.iterdir()) == ["a.png", "b.jpg", "c.webp"]
    for name in ("a.png", "c.webp"):  # written losslessly
        assert np.array_equal(rgb(output / name), nearest(rgb(photos / name), 2)), name
    with Image.open(output / "b.jpg") as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (20, 40)
    error = np.abs(rgb(output / "b.jpg").astype(int) - nearest(rgb(photos / "b.jpg"), 2)).mean()
    assert error < 12, f"JPEG at quality 95 keeps the picture (mean error {error:.1f})"


def test_transparency_and_orientation_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    source = picture(tmp_path / "logo.png", (8, 6), mode="RGBA")
    output = tmp_path / "logo-x2.png"
    _, _, error = asyncio.run(run(spec(source, output), fake_farm(root, 1), farm(root)))
    assert error is None, error
    with Image.open(output) as result, Image.open(source) as original:
        assert result.mode == "RGBA" and result.size == (16, 12)
        expected = np.asarray(original.getchannel("A").resize((16, 12), Image.Resampling.LANCZOS))
        assert np.array_equal(np.asarray(result.getchannel("A")), expected)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    rotated = picture(tmp_path / "phone.jpg", (12, 4), exif=exif.tobytes())
    _, _, error = asyncio.run(run(spec(rotated, tmp_path / "phone-x2.png"), fake_farm(root, 1), farm(root)))
    assert error is None, error
    with Image.open(tmp_path / "phone-x2.png") as result:
        assert result.size == (8, 24), "upright, as every viewer shows it"


def test_bad_image_inputs_are_refused_with_a_reason(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="holds no images"):
        probe_images(empty, tmp_path / "out", overwrite=False)
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="is an animated image"):
        probe_images(tmp_path / "anim.gif", tmp_path / "a.png", overwrite=False)
    (tmp_path / "fake.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="is not an image esrfarm can read"):
        probe_images(tmp_path / "fake.png", tmp_path / "b.png", overwrite=False)
    source = picture(tmp_path / "p.png", (4, 4))
    (tmp_path / "exists.png").write_bytes(b"precious")
    with pytest.raises(OutputPathError, match="already exists"):
        probe_images(source, tmp_path / "exists.png", overwrite=False)
    folder = tmp_path / "in"
    folder.mkdir()
    picture(folder / "x.png", (4, 4))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.png").write_bytes(b"precious")
    with pytest.raises(OutputPathError, match=r"already holds x.png .*--overwrite"):
        probe_images(folder, tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "x.png").read_bytes() == b"precious"
    with pytest.raises(OutputPathError, match="is the input file"):
        probe_images(source, source, overwrite=True)


def test_an_image_output_for_a_folder_or_a_video_says_what_is_wrong(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    picture(folder / "a.png", (4, 4))
    output = tmp_path / "x.png"
    with pytest.raises(OutputPathError, match=r"x.png is an image file name, but the input .* is a folder"):
        probe_images(folder, output, overwrite=False)
    assert not output.exists(), "no directory named like an image is made"
    (tmp_path / "dir.png").mkdir()  # a folder that exists is a folder, whatever its name
    assert probe_images(folder, tmp_path / "dir.png", overwrite=False).folder
    video = clips.video(tmp_path / "in.mp4", frames=2)
    with pytest.raises(OutputPathError, match=r"is an image file name, but the input in.mp4 is not an image"):
        probe_images(video, tmp_path / "y.png", overwrite=False)
    unlisted = picture(tmp_path / "photo.pic", (4, 4), format="PNG")  # an image by content, not suffix
    assert probe_images(unlisted, tmp_path / "z.png", overwrite=False).frame_count == 1


def test_an_image_job_fails_cleanly_and_leaves_no_half_written_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        picture(photos / f"{i}.png", (6, 6), seed=i)
    workers = fake_farm(root, 2, fail_batches={1})
    _, _, error = asyncio.run(run(spec(photos, tmp_path / "out"), workers, farm(root)))
    assert isinstance(error, JobError) and "batch 1 (frame 2) failed on 2 different workers" in str(error)
    assert not (tmp_path / "out").exists(), "no image is published before every one is done"


def test_esrfarm_upscale_an_image_on_a_real_worker(tiny_model: Path, tmp_path: Path) -> None:
    source = picture(tmp_path / "photo.png", (24, 16), seed=5)
    output = tmp_path / "photo-x4.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "upscale", str(source), str(output),
         "--model", str(tiny_model), "--shared-root", str(tmp_path / "root"), "--local-workers", "1",
         "--worker-arg=--cpu-threads=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    upscaler = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1))
    assert np.array_equal(rgb(output), upscaler.upscale(rgb(source)[None])[0]), "exactly the model's output"
