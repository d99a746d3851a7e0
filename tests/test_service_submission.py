"""The submit body, decoded from its one declaration (service/submission.py): a table of bodies, each
refused naming its field, or decoded with the declared defaults. Pure: no service, no HTTP (the API
tests send such bodies through a real service)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import SubmissionError
from service.submission import PRIORITY_LIMIT, CompareBody, UpscaleBody, decode_body, output_name

UPLOAD = "0123456789abcdef" * 2


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"type": "transcode"}, "type", 'must be "upscale" (the default) or "compare"'),
        ({"type": None}, "type", "not None"),
        ({"colour": "red"}, "colour", "is not a field of an upscale job"),
        ({"frames": 3}, "frames", "is not a field of an upscale job"),
        ({"type": "compare", "codec": "ffv1"}, "codec", "is not a field of a compare job"),
        ({"type": "compare", "dedup": "yes"}, "dedup", "expected `bool`, got `str`"),
        ({"inputs": "/a.mp4"}, "inputs", "expected `array | null`, got `str`"),
        ({"inputs": []}, "inputs", "expected `array` of length >= 1"),
        ({"inputs": [""]}, "inputs", "expected `str` of length >= 1"),
        ({"inputs": ["/" + "a" * 5000]}, "inputs", "expected `str` of length <= 4096"),
        ({"upload": "../../etc/passwd"}, "upload", "matching regex"),
        ({"models": [3]}, "models", "expected `str`, got `int`"),
        ({"scales": [True]}, "scales", "expected `float`, got `bool`"),
        ({"scales": "2"}, "scales", "expected `array | null`, got `str`"),
        ({"priority": "high"}, "priority", "expected `int | null`, got `str`"),
        ({"priority": 1.5}, "priority", "got `float`"),
        ({"priority": PRIORITY_LIMIT + 1}, "priority", f"expected `int` <= {PRIORITY_LIMIT}"),
        ({"priority": -(2**63)}, "priority", f"expected `int` >= {-PRIORITY_LIMIT}"),
        ({"crf": 2**64 - 1}, "crf", f"expected `int` <= {PRIORITY_LIMIT}"),
        ({"backend": "vulkan"}, "backend", "matching regex '^(torch|ncnn)$'"),
        ({"dedup": "yes"}, "dedup", "expected `bool`, got `str`"),
        ({"dedup_level": "lax"}, "dedup_level", "matching regex '^(strict|loose)$'"),
        ({"type": "compare", "dedup_level": 2}, "dedup_level", "expected `str`, got `int`"),
        ({"codec": None}, "codec", "expected `str`, got `null`"),
        ({"type": "compare", "frames": "many"}, "frames", "expected `int | null`, got `str`"),
        ({"type": "compare", "frames": 2**64 - 1}, "frames", "expected `int` <= 100000"),
    ],
)
def test_a_bad_field_is_refused_naming_it(body: dict[str, object], field: str, says: str) -> None:
    with pytest.raises(SubmissionError) as refused:
        decode_body(json.dumps(body).encode())
    assert refused.value.field == field and refused.value.status == 400
    assert str(refused.value).startswith(f"{field}: ") and says in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    ("raw", "says"),
    [(b"{", "the request body is not valid JSON: "), (b"[1]", "the request body must be a JSON object")],
)
def test_a_body_that_is_no_object_is_refused_without_a_field(raw: bytes, says: str) -> None:
    with pytest.raises(SubmissionError) as refused:
        decode_body(raw)
    assert refused.value.field is None and str(refused.value).startswith(says)


def test_the_declared_defaults_and_types() -> None:
    upscale = decode_body(json.dumps({"inputs": ["/v/a.mp4"], "scales": [2, 1.5], "priority": None}).encode())
    assert upscale == UpscaleBody(inputs=["/v/a.mp4"], scales=[2.0, 1.5])
    assert (upscale.type, upscale.codec, upscale.backend, upscale.dedup, upscale.priority) == (
        "upscale", "libx264", "torch", False, None,
    )  # fmt: skip
    assert upscale.dedup_level == "strict"
    compare = decode_body(json.dumps({"type": "compare", "upload": UPLOAD, "frames": 8}).encode())
    assert compare == CompareBody(upload=UPLOAD, frames=8) and compare.type == "compare"


@pytest.mark.parametrize(
    ("source", "model", "scale", "codec", "name"),
    [
        (
            "/v/My Clip (1).mp4",
            "RealESRGAN_x4plus",
            2.0,
            "libx264",
            "My_Clip_1-RealESRGAN_x4plus-x2-abcdef01.mp4",
        ),
        ("/v/a.mov", "/models/net.pth", None, "ffv1", "a-net-abcdef01.mkv"),
        ("/v/...mp4", "m", 1.5, "libx265", "video-m-x1.5-abcdef01.mp4"),
    ],
)
def test_output_names(source: str, model: str, scale: float | None, codec: str, name: str) -> None:
    assert output_name(Path(source), model, scale, "abcdef0123456789", codec) == name
