"""Sources of more than 8 bits per sample and HDR10, end to end (issue 15).

Real ffmpeg clips (a 10-bit ramp, an x265 HDR10 clip), a real worker process on 127.0.0.1 with the
tiny seeded model, the coordinator's job in process; plus the pieces on their own: the 16-bit frame
files, the manifest's depth, the encoder choice per depth, and fp16's precision on 10/12-bit codes.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import orjson
import pytest
import torch

from coordinator.job import upscale
from coordinator.media import VideoMedia
from coordinator.spec import FarmSettings, JobSpec
from manifests.chunks import frame_file_bytes
from manifests.errors import DocumentError, FrameFileError
from manifests.frames import decode_frame, encode_frame_into, frame_file_is_sound, write_frame
from manifests.layout import FrameFormat
from manifests.manifest import Batch, Manifest
from media.encode import EncodeSettings, settings_for_depth
from media.errors import EncodeSettingsError
from media.extract import decode_frames
from media.probe import probe
from tests import clips
from tests.workerutil import WorkerProcess, start_worker
from worker.runtime import RuntimeSettings, from_unit_range, load_upscaler, to_unit_range

FAST = EncodeSettings.for_codec("libx265", preset="ultrafast")


# -- fp16 and the runtime's conversion ------------------------------------------------------------


def _through_fp16(bits: int) -> np.ndarray:
    """Every ``bits``-bit code as the 16-bit sample ffmpeg's rgb48 gives it, into the model's fp16
    input with the runtime's own conversion, out again as the runtime rounds, back to ``bits`` bits."""
    top = (1 << bits) - 1
    codes = np.arange(top + 1, dtype=np.float64)
    samples = np.round(codes * 65535 / top).astype(np.uint16)
    frames = torch.from_numpy(np.repeat(samples.reshape(1, 1, -1, 1), 3, axis=3))
    model_input = to_unit_range(frames, torch.float16)
    assert model_input.dtype == torch.float16
    out = from_unit_range(model_input.float(), torch.uint16).numpy()[0, 0, :, 0]
    return np.round(out.astype(np.float64) * top / 65535).astype(np.int64) - codes.astype(np.int64)


def test_every_10_bit_code_survives_fp16_exactly() -> None:
    assert not np.any(_through_fp16(10)), "a 10-bit code changed on its way through fp16"


def test_12_bit_codes_move_at_most_one_step_in_fp16() -> None:
    moved = _through_fp16(12)
    assert np.abs(moved).max() == 1  # what the README and the coordinator's warning say
    assert np.count_nonzero(moved) == 1023  # a quarter of the codes, all in the upper half
    assert np.count_nonzero(moved[:2048]) == 0


def test_the_runtime_keeps_uint16_frames_16_bit(tiny_model: Path) -> None:
    upscaler = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1, scale=2))
    ramp = np.linspace(0, 65535, 40 * 3).round().astype(np.uint16).reshape(1, 1, 40, 3).repeat(8, axis=1)
    out = upscaler.upscale(ramp)
    assert out.dtype == np.uint16 and out.shape == (1, 16, 80, 3)
    assert len(np.unique(out)) > 256
    eight = upscaler.upscale((ramp >> 8).astype(np.uint8))
    assert eight.dtype == np.uint8  # the 8-bit path is the 8-bit path


# -- the protocol: 16-bit frame files and the manifest's depth ----------------------------------


def test_16_bit_frames_are_npy_uint16_checked_like_8_bit_ones(tmp_path: Path) -> None:
    frame = np.arange(6 * 5 * 3, dtype=np.uint16).reshape(6, 5, 3) * 1000
    path = tmp_path / "00000001.npy"
    write_frame(path, frame, FrameFormat.NPY, png_compression=1)
    data = path.read_bytes()
    decoded = decode_frame(data, FrameFormat.NPY, bit_depth=16)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, frame)
    assert frame_file_is_sound(path, FrameFormat.NPY, 5, 6, bit_depth=16)
    assert not frame_file_is_sound(path, FrameFormat.NPY, 5, 6)  # an 8-bit job does not trust it
    path.write_bytes(data[:-1])
    assert not frame_file_is_sound(path, FrameFormat.NPY, 5, 6, bit_depth=16)
    with pytest.raises(FrameFileError, match="not \\(H, W, 3\\) uint8"):
        decode_frame(data, FrameFormat.NPY)
    with pytest.raises(FrameFileError, match="declares"):
        decode_frame(data[:-2], FrameFormat.NPY, bit_depth=16)
    eight = io.BytesIO()
    encode_frame_into(eight, frame.astype(np.uint8), FrameFormat.NPY, 1)
    with pytest.raises(FrameFileError, match="not \\(H, W, 3\\) uint16"):
        decode_frame(eight.getvalue(), FrameFormat.NPY, bit_depth=16)
    with pytest.raises(ValueError, match="Pillow cannot write 16-bit"):
        encode_frame_into(io.BytesIO(), frame, FrameFormat.PNG, 1)
    with pytest.raises(FrameFileError, match="16-bit frames are stored as npy"):
        decode_frame(data, FrameFormat.PNG, bit_depth=16)


def test_16_bit_frames_count_twice_in_the_disk_budget() -> None:
    assert frame_file_bytes(640, 360, FrameFormat.NPY, 16) - 128 == 2 * (
        frame_file_bytes(640, 360, FrameFormat.NPY) - 128
    )


def _manifest(**overrides: Any) -> Manifest:
    values: dict[str, Any] = {
        "job_id": "j", "manifest_id": "w0", "worker_id": "w", "model": "m",
        "batches": (Batch.range(0, 1, 3),), "frame_format": FrameFormat.NPY,
    }  # fmt: skip
    return Manifest(**{**values, **overrides})


def test_only_a_16_bit_manifest_says_its_depth() -> None:
    eight = _manifest()
    assert "bit_depth" not in eight.to_dict()  # an 8-bit manifest is what it was before
    sixteen = _manifest(bit_depth=16)
    assert sixteen.to_dict()["bit_depth"] == 16
    assert Manifest.from_json(sixteen.to_json()) == sixteen
    assert Manifest.from_json(eight.to_json()).bit_depth == 8
    with pytest.raises(DocumentError, match="must be 8 or 16"):
        Manifest.from_dict({**sixteen.to_dict(), "bit_depth": 12})
    with pytest.raises(DocumentError, match="must be npy or yuv for 16-bit frames"):
        Manifest.from_dict({**sixteen.to_dict(), "frame_format": "png"})


# -- the encoder per depth -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "depth", "expected"),
    [
        ("libx264", None, 8, "yuv420p"),
        ("libx264", None, 10, "yuv420p10le"),
        ("libx265", None, 10, "yuv420p10le"),
        ("libx265", None, 12, "yuv420p12le"),
        ("libsvtav1", None, 10, "yuv420p10le"),
        ("ffv1", None, 10, "gbrp16le"),
        ("ffv1", None, 8, "gbrp"),
        ("hevc_nvenc", None, 10, "p010le"),
        ("libx265", "yuv420p", 10, "yuv420p"),  # --pix-fmt still chooses
        ("libx264rgb", None, 10, "refused"),
        ("libx264", None, 12, "refused"),
        ("libsvtav1", None, 12, "refused"),
    ],
)
def test_the_output_keeps_the_source_depth(
    codec: str, pix_fmt: str | None, depth: int, expected: str
) -> None:
    settings = EncodeSettings.for_codec(codec, pix_fmt=pix_fmt)
    if expected == "refused":
        with pytest.raises(EncodeSettingsError, match=f"the source has {depth}; use --codec"):
            settings_for_depth(settings, depth)
    else:
        assert settings_for_depth(settings, depth).effective_pix_fmt == expected


# -- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("high-depth-root")


@pytest.fixture(scope="module")
def worker(root: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = start_worker(root, tiny_model, tmp_path_factory.mktemp("high-depth-logs"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ramp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clips.ramp_10bit(tmp_path_factory.mktemp("ramp") / "ramp10.mkv")


def _upscale(source: Path, output: Path, root: Path, worker: WorkerProcess, model: Path, **spec: Any) -> Any:
    values: dict[str, Any] = {"model": str(model), "scale": 2, "batch_size": 2, "encode": FAST, **spec}
    farm = FarmSettings(workers=(worker.url,), shared_root=root, poll_interval_s=0.01)
    return asyncio.run(upscale(JobSpec(source, output, **values), farm))


def _luma_rows(path: Path) -> tuple[str, np.ndarray]:
    """The pixel format and the luma plane (codes as stored) of the first frame of ``path``."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        plane = frame.planes[0]
        dtype = np.dtype("<u2") if frame.format.components[0].bits > 8 else np.dtype(np.uint8)
        rows = np.frombuffer(bytes(plane), dtype=dtype).reshape(plane.height, -1)[:, : plane.width]
        return frame.format.name, rows


def test_a_10_bit_ramp_comes_out_10_bit_without_banding(
    ramp: Path, tmp_path: Path, root: Path, worker: WorkerProcess, tiny_model: Path
) -> None:
    output = tmp_path / "ramp-x2.mkv"
    result = _upscale(ramp, output, root, worker, tiny_model, keep_frames=True)
    pix_fmt, luma = _luma_rows(output)
    assert pix_fmt == "yuv420p10le" and luma.shape == (32, 2048)
    levels = len(np.unique(luma[16]))
    assert levels > 600, f"a row of the upscaled ramp has {levels} levels; an 8-bit path gives at most 256"
    _, source_luma = _luma_rows(ramp)
    assert len(np.unique(source_luma[8])) == 877
    # On shared storage: the decoder's own 10-bit 4:2:0 samples in 16-bit YUV frames (the worker
    # converts them), manifests that say so, an identity that names the depth.
    job_dir = root / "jobs" / result.job_id
    frame = job_dir / "output" / "00000001.yuv"
    assert decode_frame(frame.read_bytes(), FrameFormat.YUV, bit_depth=16).shape == (48, 2048)
    manifests = [orjson.loads(p.read_bytes()) for p in (job_dir / "manifests").glob("*.json")]
    assert manifests and all(
        m["bit_depth"] == 16 and m["frame_format"] == "yuv" and m["yuv"]["bits"] == 10 for m in manifests
    )
    assert orjson.loads((job_dir / "job.json").read_bytes())["identity"]["frame_bit_depth"] == 16


def test_a_10_bit_ramp_in_npy_frames_comes_out_10_bit_without_banding(
    ramp: Path, tmp_path: Path, root: Path, worker: WorkerProcess, tiny_model: Path
) -> None:
    output = tmp_path / "ramp-npy.mkv"
    result = _upscale(ramp, output, root, worker, tiny_model, keep_frames=True, frame_format=FrameFormat.NPY)
    pix_fmt, luma = _luma_rows(output)
    assert pix_fmt == "yuv420p10le" and len(np.unique(luma[16])) > 600
    frame = root / "jobs" / result.job_id / "output" / "00000001.npy"
    assert decode_frame(frame.read_bytes(), FrameFormat.NPY, bit_depth=16).shape == (32, 2048, 3)


def test_lossless_16_bit_output_is_the_runtime_output_bit_for_bit(
    ramp: Path, tmp_path: Path, root: Path, worker: WorkerProcess, tiny_model: Path
) -> None:
    output = tmp_path / "ramp-lossless.mkv"
    _upscale(ramp, output, root, worker, tiny_model, encode=EncodeSettings.for_codec("ffv1"))
    assert probe(output).video.pix_fmt == "gbrp16le"
    upscaler = load_upscaler(str(tiny_model), RuntimeSettings(device="cpu", cpu_threads=1, scale=2))
    inputs, outputs = list(decode_frames(ramp)), list(decode_frames(output))
    assert len(inputs) == len(outputs) == 3
    # The decoded input holds the source's 877 luma codes; the output, stored losslessly, far more
    # than the 256 levels per channel that rounding to 8 bits anywhere on the way would leave.
    assert len(np.unique(inputs[0][8, :, 1])) == 877
    assert len(np.unique(outputs[0][16, :, 1])) > 600
    for i, (frame_in, frame_out) in enumerate(zip(inputs, outputs, strict=True)):
        assert frame_in.dtype == frame_out.dtype == np.uint16
        expected = upscaler.upscale(frame_in[None])[0]
        assert np.array_equal(frame_out, expected), f"frame {i + 1} differs from the runtime's 16-bit output"


def _hdr_side_data(path: Path) -> dict[str, bytes]:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return {sd.type.name: bytes(sd) for sd in frame.side_data if sd.type.name != "SEI_UNREGISTERED"}


def test_hdr10_tags_and_static_metadata_are_carried(
    tmp_path: Path, root: Path, worker: WorkerProcess, tiny_model: Path
) -> None:
    source = clips.hdr10_video(tmp_path / "hdr10.mp4")
    output = tmp_path / "hdr10-x2.mp4"
    _upscale(source, output, root, worker, tiny_model)
    video = probe(output).video
    assert (video.pix_fmt, video.width, video.height) == ("yuv420p10le", 128, 96)
    assert (video.color.primaries, video.color.transfer, video.color.matrix, video.color.range) == (
        "bt2020", "smpte2084", "bt2020nc", "tv"
    )  # fmt: skip
    assert video.hdr.mastering is not None
    assert video.hdr.mastering.x265_value() == clips.HDR10_MASTER_DISPLAY
    assert video.hdr.content_light == clips.HDR10_MAX_CLL
    side_data = _hdr_side_data(output)
    assert set(side_data) == {"MASTERING_DISPLAY_METADATA", "CONTENT_LIGHT_LEVEL"}
    assert side_data == _hdr_side_data(source)  # the very values, as FFmpeg reads them


def test_a_codec_that_cannot_hold_the_depth_is_refused_before_anything_is_upscaled(
    ramp: Path, tmp_path: Path, worker: WorkerProcess, tiny_model: Path
) -> None:
    root = tmp_path / "root"
    output = tmp_path / "out.mp4"
    with pytest.raises(EncodeSettingsError, match=r"libx264rgb writes at most 8 bits .* use --codec libx264"):
        _upscale(ramp, output, root, worker, tiny_model, encode=EncodeSettings.for_codec("libx264rgb"))
    with pytest.raises(EncodeSettingsError, match="this ffmpeg's libx264 cannot write yuv420p12le"):
        _upscale(
            ramp,
            output,
            root,
            worker,
            tiny_model,
            encode=EncodeSettings.for_codec("libx264", pix_fmt="yuv420p12le"),
        )
    assert not output.exists() and not list(tmp_path.glob(".*part"))
    assert not (root / "jobs").exists() or not any((root / "jobs").iterdir())


def test_an_8_bit_source_keeps_its_identity_and_8_bit_frames(tmp_path: Path) -> None:
    source = clips.video(tmp_path / "eight.mp4", frames=2)
    media = VideoMedia(probe(source), tmp_path / "out.mkv", EncodeSettings.lossless(), False)
    assert media.bit_depth == 8 and set(media.content_identity()) == {"input_sha256"}
    assert media.encode == EncodeSettings.lossless()
    assert next(decode_frames(source)).dtype == np.uint8
