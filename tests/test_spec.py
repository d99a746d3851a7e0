"""JobSpec and FarmSettings: each field's limit, declared beside it, holds for a spec built in code
and for one read back from JSON (the job service's store), and the error names the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import SpecError
from coordinator.spec import FarmSettings, JobSpec
from manifests.layout import FrameFormat
from media.encode import EncodeSettings


def test_a_spec_round_trips_through_json_values() -> None:
    spec = JobSpec(
        Path("/in/a.mp4"), Path("/out/a.mkv"), scale=2.0, tile=256, precision="fp16",
        frame_format=FrameFormat.NPY, encode=EncodeSettings("libx265", crf=22, extra_args=("-x", "y")),
        dedup=True, dedup_level="loose",
    )  # fmt: skip
    values = spec.to_dict()
    assert values["input"] == "/in/a.mp4" and values["frame_format"] == "npy"
    assert values["encode"]["extra_args"] == ["-x", "y"]
    assert JobSpec.from_dict(values) == spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
        ({"batch_size": 4097}, "batch_size must be at most 4096, not 4097"),
        ({"scale": 17.0}, "scale must be at most 16.0, not 17.0"),
        ({"tile": -1}, "tile must be at least 0, not -1"),
        ({"png_compression": 10}, "png_compression must be at most 9, not 10"),
        ({"max_disk": 0}, "max_disk must be at least 1, not 0"),
        ({"encoders": 0}, "encoders must be at least 1, not 0"),
        ({"precision": "fp8"}, "precision must be one of bf16, fp16, fp32, not 'fp8'"),
        ({"frame_format": "jpg"}, "frame_format must be one of png, npy, yuv, not 'jpg'"),
        ({"backend": "vulkan"}, "backend must be one of torch, ncnn, not 'vulkan'"),
        (
            {"backend": "ncnn", "precision": "bf16"},
            "precision must be fp16 or fp32 on the ncnn backend, not bf16",
        ),
        ({"model": ""}, "model must not be empty"),
        ({"dedup": True, "dedup_level": "lax"}, "dedup_level must be one of strict, loose, not 'lax'"),
        ({"dedup_level": "loose"}, "dedup_level is for --dedup: say --dedup as well"),
    ],
)
def test_a_bad_spec_field_is_named_built_or_read(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as built:
        JobSpec(Path("/in/a.mp4"), Path("/out/a.mkv"), **changes)
    assert str(built.value) == message
    with pytest.raises(SpecError) as read:
        JobSpec.from_dict({"input": "/in/a.mp4", "output": "/out/a.mkv", **changes})
    assert str(read.value) == message


@pytest.mark.parametrize(
    ("values", "field", "problem"),
    [
        ({"output": "/o"}, "input", "is missing"),
        ({"input": "", "output": "/o"}, "input", "must be a path, not ''"),
        ({"input": "/i", "output": "/o", "overwrite": "on"}, "overwrite", "must be true or false, not 'on'"),
        ({"input": "/i", "output": "/o", "colour": 1}, "job", "has unknown field(s): colour"),
        ({"input": "/i", "output": "/o", "encode": {"crf": "x"}}, "encode.crf", "must be an integer or null"),
    ],
)
def test_a_stored_spec_that_cannot_be_read_names_the_field(
    values: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(values)
    assert info.value.field == field and info.value.problem.startswith(problem)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"poll_interval_s": 0}, "poll_interval_s must be above 0.0, not 0"),
        ({"stale_after_s": float("nan")}, "stale_after_s must be above 0.0, not nan"),
        ({"local_workers": 0}, "local_workers must be at least 1, not 0"),
        ({"ray_workers": 2}, "ray_workers needs ray_address"),
        ({"workers": ("ftp://h",), "shared_root": Path("/r")}, "workers must be http:// or https:// URLs"),
        ({"workers": ("http://h:1",)}, "shared_root must be given with workers"),
    ],
)
def test_a_bad_farm_setting_is_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        FarmSettings(**changes)


def test_farm_settings_keep_the_token_out_of_repr() -> None:
    farm = FarmSettings(workers=(" http://h:1/ ", ""), shared_root=Path("/r"), token="s3cret")
    assert farm.workers == ("http://h:1",)
    assert "s3cret" not in repr(farm) and farm.token == "s3cret"
