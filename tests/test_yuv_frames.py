"""YUV frames: the worker's colour conversion against ffmpeg's, and whole jobs that keep YUV frames.

The conversion (worker/colour.py) is checked against ffmpeg's swscale (the converter RGB frames go
through) on real decoded frames, for each matrix, range and depth a job can send; a job of a
yuv420p source is checked to keep YUV frames end to end and to give the output the RGB path gives,
within what the two converters differ by.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from coordinator.job import upscale
from coordinator.spec import FarmSettings, JobSpec
from manifests.colour import YuvSpec
from manifests.layout import FrameFormat
from media.encode import EncodeSettings
from media.extract import decode_frames
from media.ffmpeg import run_ffmpeg
from media.probe import probe
from tests import clips
from tests.workerutil import start_worker
from worker.colour import i420_to_rgb, rgb_to_i420, upscale_i420
from worker.runtime import RuntimeSettings, load_upscaler

SCALE_MATRIX = {"bt709": "bt709", "bt601": "smpte170m", "bt2020": "bt2020nc"}
CASES = [  # (scale-filter matrix, range, source pix_fmt, bits)
    ("bt709", "tv", "yuv420p", 8),
    ("bt601", "tv", "yuv420p", 8),
    ("bt709", "pc", "yuv420p", 8),
    ("bt2020", "tv", "yuv420p10le", 10),
]


def _raw(args: list[str], path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    run_ffmpeg(["-y", *args, "-f", "rawvideo", str(path)], action="converting a test frame")
    return np.fromfile(path, dtype=np.dtype(dtype)).reshape(shape)


@pytest.mark.parametrize(("matrix", "range_", "pix_fmt", "bits"), CASES)
def test_the_workers_conversion_is_ffmpegs_within_rounding(
    tmp_path: Path, matrix: str, range_: str, pix_fmt: str, bits: int
) -> None:
    width, height = 128, 72
    source = clips.video(tmp_path / "src.mkv", size=f"{width}x{height}", frames=1, codec=("-c:v", "ffv1"))
    deep = bits > 8
    sample, rgb_fmt = ("<u2", "rgb48le") if deep else ("u1", "rgb24")
    # The frame a job sends: 4:2:0 samples of this matrix and range, as a decoder gives them.
    yuv = _raw(
        [
            "-i",
            str(source),
            "-vf",
            f"scale=out_color_matrix={matrix}:out_range={range_}",
            "-pix_fmt",
            pix_fmt,
        ],
        tmp_path / "f.yuv",
        sample,
        (height * 3 // 2, width),
    )
    tagged = ["-f", "rawvideo", "-pix_fmt", pix_fmt, "-s", f"{width}x{height}", "-i", str(tmp_path / "f.yuv")]
    flags = "bicubic+accurate_rnd+full_chroma_int"
    reference = _raw(  # what RGB frames of the same source hold (coordinator/extract.py's filter)
        [
            *tagged,
            "-vf",
            f"scale=in_color_matrix={matrix}:in_range={range_}:flags={flags}",
            "-pix_fmt",
            rgb_fmt,
        ],
        tmp_path / "f.rgb",
        sample,
        (height, width, 3),
    ).astype(np.float64)
    spec = YuvSpec(matrix, range_, bits)
    rgb = i420_to_rgb(torch.from_numpy(yuv.copy())[None], spec)[0].numpy().astype(np.float64)
    peak = 65535.0 if deep else 255.0
    error = np.abs(rgb - reference) / peak * 255  # in 8-bit steps at every depth
    psnr = 10 * np.log10(255**2 / np.mean(error**2))
    assert error.mean() < 0.8 and psnr > 40, (error.mean(), psnr)

    # Back: what swscale makes of the reference RGB, luma within one step, chroma within a step on
    # average (a 2x2 mean here, swscale's bicubic filter there; they part only at colour edges).
    expected = _raw(
        [
            "-f", "rawvideo", "-pix_fmt", rgb_fmt, "-s", f"{width}x{height}", "-i", str(tmp_path / "f.rgb"),
            "-vf", f"scale=out_color_matrix={matrix}:out_range={range_}:flags=bicubic+accurate_rnd",
            "-pix_fmt", pix_fmt,
        ],
        tmp_path / "back.yuv",
        sample,
        (height * 3 // 2, width),
    ).astype(np.int64)  # fmt: skip
    back = rgb_to_i420(torch.from_numpy(reference.astype(sample))[None], spec)[0].numpy().astype(np.int64)
    step = 1 << (bits - 8)
    assert np.abs(back[:height] - expected[:height]).max() <= step
    assert np.abs(back[height:] - expected[height:]).mean() < step


def test_the_runtime_converts_on_its_device_as_the_host_would(tiny_model: Path) -> None:
    upscaler = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1, scale=2))
    frames = np.random.default_rng(5).integers(16, 236, size=(2, 24, 20), dtype=np.uint8)  # 20x16
    spec = YuvSpec("bt709", "tv", 8)
    out = upscaler.upscale_yuv(frames, 2, spec)
    assert out.shape == (2, 48, 40) and out.dtype == np.uint8

    class RgbOnly:  # an upscaler without a YUV path of its own: converted on the host instead
        def upscale(self, frames: np.ndarray, scale: float | None = None) -> np.ndarray:
            return upscaler.upscale(frames, scale)

    assert np.array_equal(upscale_i420(RgbOnly(), frames, 2, spec), out)
    odd = np.zeros((1, 30, 20), np.uint8)  # 20x20 -> x1.25: 25x25
    with pytest.raises(ValueError, match="even width and height"):
        upscaler.upscale_yuv(odd, 1.25, spec)


def _job(source: Path, output: Path, root: Path, url: str, model: Path, **spec: Any) -> Any:
    values: dict[str, Any] = {"model": str(model), "scale": 2, "batch_size": 4, "keep_frames": True, **spec}
    farm = FarmSettings(workers=(url,), shared_root=root, poll_interval_s=0.01)
    return asyncio.run(upscale(JobSpec(source, output, **values), farm))


def test_a_yuv420p_job_keeps_yuv_frames_and_gives_the_rgb_paths_output(
    tiny_model: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    source = clips.video(tmp_path / "clip.mp4", size="96x64", frames=12)
    settings = EncodeSettings.for_codec("libx264", crf=0, preset="ultrafast")  # near-lossless output
    worker = start_worker(root, tiny_model, tmp_path / "logs")
    try:
        yuv = _job(source, tmp_path / "yuv.mkv", root, worker.url, tiny_model, encode=settings)
        rgb = _job(
            source, tmp_path / "rgb.mkv", root, worker.url, tiny_model, encode=settings,
            frame_format=FrameFormat.NPY,
        )  # fmt: skip
    finally:
        worker.stop()
    assert yuv.job_id != rgb.job_id, "YUV frames are part of the job's identity"
    job_dir = root / "jobs" / yuv.job_id
    manifests = [orjson.loads(p.read_bytes()) for p in (job_dir / "manifests").glob("*.json")]
    assert manifests and all(m["frame_format"] == "yuv" for m in manifests)
    assert manifests[0]["yuv"] == {"matrix": "bt601", "range": "tv", "bits": 8}  # 64 lines: BT.601
    assert len(list((job_dir / "output").glob("0*.yuv"))) == 12
    assert yuv.stats["cpu_decode_s"] > 0 and yuv.stats["cpu_encode_s"] > 0
    info = probe(tmp_path / "yuv.mkv")
    assert (info.video.width, info.video.height, info.video.frame_count) == (192, 128, 12)
    assert info.video.pix_fmt == "yuv420p"
    for a, b in zip(decode_frames(tmp_path / "yuv.mkv"), decode_frames(tmp_path / "rgb.mkv"), strict=True):
        error = (a.astype(np.float64) - b.astype(np.float64)) ** 2
        assert 10 * np.log10(255**2 / max(error.mean(), 1e-9)) > 35


def test_a_yuv_frame_format_the_job_cannot_keep_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    source = clips.odd_size_video(tmp_path / "odd.mp4")
    farm = FarmSettings(workers=("http://127.0.0.1:9",), shared_root=tmp_path / "root")
    spec = JobSpec(source, tmp_path / "out.mp4", model=str(tiny_model), scale=2, frame_format=FrameFormat.YUV)
    with pytest.raises(Exception, match="--frame-format yuv needs a planar 4:2:0 source"):
        asyncio.run(upscale(spec, farm))
    assert not (tmp_path / "out.mp4").exists()
