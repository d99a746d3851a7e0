"""``esrfarm compare --dedup``: what ``esrfarm upscale --dedup`` does to the compared run, measured.

The held frames of the run are found once, by the job's own detector
(:class:`coordinator.dedup.DuplicateFinder`), on the samples a job compares: the decoder's own
planar 4:2:0 samples where ``esrfarm upscale`` keeps YUV frames by default (a yuv420p source of 8
to 12 bits and even sides, encoded to its own pixel format, as the default codec does), else the
RGB frames the model is given (as a job with npy or png frames). The detector looks at whole frames,
``--region`` or not (a change outside the region makes a frame new for a job too). The run's first
frame is upscaled, as a chunk's first frame is: nothing before the run is looked at.

Then, for each scored row, :func:`upscale_with_dedup` upscales the run's frames that are not held
(timed as the row's own real upscale: the first frame, the warm-up, not again) and gives each held
frame its reference's upscale, as the job's encoder does; the outcome is compared with the row's
output without ``--dedup``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from compare.frames import FrameUpscaler, read_run
from compare.metrics import flicker_ratio, luma, mse, psnr_of_mse, temporal_energy
from compare.results import DedupResult, DedupRun
from coordinator.dedup import BLOCK, DuplicateFinder
from manifests.dedup import DedupLevel
from media.extract import YUV_SOURCE_FORMATS
from media.probe import MediaInfo


@dataclass(frozen=True)
class HeldFrames:
    """The detector's answer on a run: ``references[i]`` is the run frame (0-based) whose upscale
    frame ``i`` shows, or None where frame ``i`` is upscaled."""

    references: tuple[int | None, ...]
    samples: str
    seconds: float
    level: DedupLevel

    @property
    def upscaled(self) -> tuple[int, ...]:
        return tuple(i for i, reference in enumerate(self.references) if reference is None)

    def record(self, first_frame: int) -> DedupRun:
        """The report's record, in video frame numbers (``first_frame``: the run's first, 1-based)."""
        pairs = tuple(
            (first_frame + i, first_frame + r) for i, r in enumerate(self.references) if r is not None
        )
        return DedupRun(
            frames=len(self.references),
            duplicates=pairs,
            samples=self.samples,
            block=BLOCK,
            threshold=self.level.threshold,
            shift_threshold=self.level.shift_threshold,
            seconds=self.seconds,
            level=self.level.name,
            blur=self.level.blur,
        )


def find_held_frames(info: MediaInfo, run: range, rgb_frames: np.ndarray, level: DedupLevel) -> HeldFrames:
    """The held frames of ``run`` (0-based frame indexes of the video), whose whole RGB frames are
    ``rgb_frames``, at ``level``; the YUV samples, where a job would compare those, are read here."""
    video = info.video
    bits = YUV_SOURCE_FORMATS.get(video.pix_fmt or "")
    yuv = bits is not None and video.width % 2 == 0 and video.height % 2 == 0
    frames = read_run(info, run, yuv=True) if yuv else rgb_frames
    started = time.perf_counter()
    finder = DuplicateFinder(yuv=yuv, bits=bits if bits is not None and yuv else 8, level=level)
    references = tuple(finder.reference_of(i, frame) for i, frame in enumerate(frames))
    samples = str(video.pix_fmt) if yuv else "rgb24"
    return HeldFrames(references, samples, time.perf_counter() - started, level)


def upscale_with_dedup(
    upscaler: FrameUpscaler,
    frames: np.ndarray,
    held: HeldFrames,
    off: np.ndarray,
    seconds_off: float,
    bicubic_energy: float,
) -> DedupResult:
    """Upscale ``frames`` as a job with ``--dedup`` would and compare the result with ``off`` (the
    same upscaler's output of every frame, whose frames after the first took ``seconds_off``)."""
    again = [i for i in held.upscaled if i > 0]  # frame 0 is always upscaled: off's is its warm-up
    started = time.perf_counter()
    upscaled = upscaler.upscale(frames[again]) if again else off[:0]
    seconds = time.perf_counter() - started
    on = np.empty_like(off)
    on[0] = off[0]
    on[again] = upscaled
    for frame, reference in enumerate(held.references):
        if reference is not None:
            on[frame] = on[reference]
    errors = [mse(luma(a), luma(b)) for a, b in zip(on, off, strict=True)]
    psnr_frames = tuple(psnr_of_mse(error) for error in errors)
    return DedupResult(
        frames=len(frames),
        upscaled=len(held.upscaled),
        seconds_off=seconds_off,
        seconds_on=held.seconds + seconds,
        psnr_min=min(psnr_frames),
        psnr_mean=psnr_of_mse(float(np.mean(errors))),
        flicker=flicker_ratio(temporal_energy(on), bicubic_energy),
        psnr_frames=psnr_frames,
    )
