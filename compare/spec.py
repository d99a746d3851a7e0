"""What a comparison is asked to do (:class:`CompareSpec`), validated once, and its errors.

Errors::

    CompareError          the comparison cannot run: the input has too few frames, a region
                          outside the frame, no model left to compare, a report path unusable
    ValueError            a spec that is wrong in itself (raised by CompareSpec and the parsers)

Input problems (missing file, not a video, corrupt) are the coordinator's
:class:`media.errors.InputError`; a model that cannot load or run is not an error but a
skipped row of the report, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from compare.frames import BASELINES
from manifests.dedup import STRICT, dedup_level_problem
from worker.models import CATALOG, MODEL_FILE_SUFFIXES, looks_like_path

SCALES = (2, 3, 4)
DEFAULT_FRAMES = 12
DEFAULT_CROP = 192
#: Pixels left out at each edge of the degrade-then-restore frames before scoring (as SR benchmarks
#: shave a border): room for the shift search and for models' edge effects.
BORDER = 8
MIN_INPUT_SIDE = 48

_TIME = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?)$")
_REGION = re.compile(r"^(\d+)x(\d+)(?:\+(\d+)\+(\d+))?$")


class CompareError(Exception):
    """A comparison that cannot run; ``str`` is one sentence saying why."""


def parse_time(text: str) -> float:
    """Seconds from ``12.5``, ``01:30`` or ``00:01:30.5``."""
    match = _TIME.match(text.strip())
    if not match:
        raise ValueError(f"time must be seconds or [HH:]MM:SS[.fff], not {text!r}")
    hours, minutes, seconds = match.groups()
    if (minutes is not None and float(seconds) >= 60) or (hours is not None and int(minutes) >= 60):
        raise ValueError(f"time {text!r} has a minutes or seconds field of 60 or more")
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


@dataclass(frozen=True)
class Region:
    """A part of the frame to compare on: ``width`` x ``height`` at (``x``, ``y``), or, with ``x`` and
    ``y`` None, placed on the most detailed area of the run's middle frame."""

    width: int
    height: int
    x: int | None = None
    y: int | None = None

    def __post_init__(self) -> None:
        if self.width < MIN_INPUT_SIDE or self.height < MIN_INPUT_SIDE:
            raise ValueError(f"region must be at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}, not {self}")
        if (
            (self.x is None) != (self.y is None)
            or (self.x is not None and self.x < 0)
            or (self.y is not None and self.y < 0)
        ):
            raise ValueError(f"region offsets must both be given and not negative: {self}")

    @classmethod
    def parse(cls, text: str) -> Region:
        """``WxH`` (placed automatically) or ``WxH+X+Y`` (X, Y: the top-left corner)."""
        match = _REGION.match(text.strip())
        if not match:
            raise ValueError(f"region must be WxH or WxH+X+Y (e.g. 320x180+480+270), not {text!r}")
        width, height, x, y = match.groups()
        return cls(int(width), int(height), None if x is None else int(x), None if y is None else int(y))

    def __str__(self) -> str:
        place = "" if self.x is None else f"+{self.x}+{self.y}"
        return f"{self.width}x{self.height}{place}"


def check_model_name(name: str) -> None:
    """Raise ValueError for a name that is no baseline, no catalog model and no existing file."""
    if name in BASELINES or name in CATALOG:
        return
    path = Path(name).expanduser()
    if path.is_file():
        return
    if looks_like_path(name):
        raise ValueError(f"model file {name} does not exist")
    known = ", ".join([*CATALOG, *BASELINES])
    raise ValueError(
        f"unknown model {name!r}: it is neither a model name ({known}) nor an existing model file "
        f"({'/'.join(MODEL_FILE_SUFFIXES)})"
    )


@dataclass(frozen=True)
class CompareSpec:
    """One comparison: which video, which frames, which models, on which device.

    ``models`` are catalog names, model file paths, or the baselines ``bicubic`` and ``lanczos``;
    empty means :func:`compare.run.default_models`. The run of ``frames`` contiguous frames lies in
    the window ``start`` .. ``start + duration`` seconds (default: the whole video), at a position
    drawn with ``seed``. ``device``, ``precision``, ``tile`` and ``cpu_threads`` are the model
    runtime's (:class:`worker.runtime.RuntimeSettings`, which checks them when the run starts; this
    module does not import torch, so a service can build specs cheaply). ``dedup``: each scored row
    also upscales the run as ``esrfarm upscale --dedup --dedup-level DEDUP_LEVEL`` would
    (:mod:`compare.dedup`).
    """

    input: Path
    models: tuple[str, ...] = ()
    scale: int = 2
    frames: int = DEFAULT_FRAMES
    start: float | None = None
    duration: float | None = None
    region: Region | None = None
    seed: int = 0
    crop: int = DEFAULT_CROP
    max_shift: float = 1.0
    shift_step: float = 0.25
    device: str = "auto"
    precision: str | None = None
    tile: int = 0
    cpu_threads: int | None = None
    allow_download: bool = True
    vmaf_timeout_s: float = 600.0
    dedup: bool = False
    dedup_level: str = STRICT

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(str, SCALES))}, not {self.scale}")
        if self.frames < 2:
            raise ValueError(
                f"frames must be at least 2 (flicker compares consecutive frames), not {self.frames}"
            )
        if self.start is not None and self.start < 0:
            raise ValueError(f"start must not be negative, not {self.start}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be above 0, not {self.duration}")
        if self.crop < 32:
            raise ValueError(f"crop must be at least 32 pixels, not {self.crop}")
        if not 0 <= self.max_shift <= 4 or self.shift_step <= 0:
            shift = f"max_shift {self.max_shift} and step {self.shift_step}"
            raise ValueError(f"shift search needs 0 <= max_shift <= 4 and step > 0, not {shift}")
        if self.vmaf_timeout_s <= 0:
            raise ValueError(f"vmaf_timeout_s must be above 0, not {self.vmaf_timeout_s}")
        if (problem := dedup_level_problem(self.dedup, self.dedup_level)) is not None:
            raise ValueError(f"dedup_level {problem}")
        for name in self.models:
            check_model_name(name)
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"a model is named twice in {', '.join(self.models)}")


__all__ = [
    "BORDER",
    "MIN_INPUT_SIDE",
    "SCALES",
    "CompareError",
    "CompareSpec",
    "Region",
    "check_model_name",
    "parse_time",
]
