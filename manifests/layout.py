"""Where things live on the shared storage.

::

    <shared_root>/jobs/<job_id>/
        job.json
        input/00000001.png ...      frames extracted by the coordinator
        output/00000001.png ...     the same names, upscaled, written by the workers
        manifests/<manifest_id>.json
        status/<manifest_id>.json   one per manifest, owned by the worker processing it
        segments/

Every path inside a manifest is relative to its job directory. A worker resolves each one
(symlinks followed) and refuses any that lands outside the shared root.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from manifests.errors import PathOutsideRootError

JOBS_DIR = "jobs"
FRAME_DIGITS = 8
DEFAULT_FIRST_FRAME = 1  # ffmpeg's image2 muxer numbers frames from 1 unless told otherwise
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class FrameFormat(enum.StrEnum):
    """How frames are stored: PNG (compact, slow), raw ``.npy`` (H, W, 3) RGB arrays (fast, large),
    or raw planar YUV 4:2:0 (``.yuv``: the decoder's own samples, half the bytes of RGB; the worker
    converts to RGB and back on its device). See :mod:`manifests.frames`."""

    PNG = "png"
    NPY = "npy"
    YUV = "yuv"

    @property
    def suffix(self) -> str:
        return f".{self.value}"

    @property
    def is_rgb(self) -> bool:
        """Whether a frame of this format is an (H, W, 3) RGB array (PNG, npy), not planar YUV."""
        return self is not FrameFormat.YUV


#: The sample depths a frame file holds: 8 (uint8) or 16 (uint16, for sources above 8 bits).
BIT_DEPTHS = (8, 16)
HIGH_BIT_DEPTH = 16


def frame_formats_for_depth(bit_depth: int) -> tuple[FrameFormat, ...]:
    """The frame formats that can hold samples of ``bit_depth`` bits (16: ``.npy`` and ``.yuv``)."""
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"frames hold 8 or 16 bits per sample, not {bit_depth}")
    return (FrameFormat.NPY, FrameFormat.YUV) if bit_depth == HIGH_BIT_DEPTH else tuple(FrameFormat)


def is_safe_name(name: str) -> bool:
    """A job or manifest id usable as one path component: letters, digits, ``.``, ``_``, ``-``."""
    return bool(_NAME_RE.match(name)) and name not in {".", ".."}


def frame_filename(index: int, frame_format: FrameFormat = FrameFormat.PNG) -> str:
    """``frame_filename(1) == "00000001.png"``: the name of frame ``index`` in input/ and output/."""
    if index < 0:
        raise ValueError(f"frame index must be >= 0, not {index}")
    return f"{index:0{FRAME_DIGITS}d}{frame_format.suffix}"


@dataclass(frozen=True)
class JobLayout:
    """The paths of one job directory under a shared root."""

    shared_root: Path
    job_id: str

    def __post_init__(self) -> None:
        if not is_safe_name(self.job_id):
            raise ValueError(
                f"job id {self.job_id!r} is not a safe directory name (letters, digits, '.', '_', '-')"
            )

    @property
    def job_dir(self) -> Path:
        return self.shared_root / JOBS_DIR / self.job_id

    @property
    def job_file(self) -> Path:
        return self.job_dir / "job.json"

    @property
    def input_dir(self) -> Path:
        return self.job_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.job_dir / "output"

    @property
    def manifests_dir(self) -> Path:
        return self.job_dir / "manifests"

    @property
    def status_dir(self) -> Path:
        return self.job_dir / "status"

    @property
    def segments_dir(self) -> Path:
        return self.job_dir / "segments"

    def manifest_path(self, manifest_id: str) -> Path:
        return self.manifests_dir / f"{manifest_id}.json"

    def status_path(self, manifest_id: str) -> Path:
        return self.status_dir / f"{manifest_id}.json"

    def create(self) -> None:
        """Make the job directory and its sub-directories (idempotent)."""
        for directory in (
            self.input_dir,
            self.output_dir,
            self.manifests_dir,
            self.status_dir,
            self.segments_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)


def resolve_within(root: str | Path, path: str | Path) -> Path:
    """Resolve ``path`` (symlinks followed; a relative path is taken from the working directory).

    Raises :class:`PathOutsideRootError` unless the result is ``root`` or lies under it. The path
    need not exist: the existing part is resolved and the rest appended.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and os.path.commonpath([real_root, real]) != real_root:
        raise PathOutsideRootError(path, real_root, real)
    return Path(real)
