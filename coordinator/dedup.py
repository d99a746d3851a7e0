"""Which decoded frames repeat the last upscaled one (``--dedup``): the detector and its pass.

A frame is compared with the **last frame that was upscaled** (its would-be reference), never merely
with the previous frame: a slow pan or fade, each step below the threshold, still moves the frame
away from the reference until one is upscaled again (no drift). The comparison is at full
resolution and local: the score of a pair is the largest mean absolute difference over windows of
:data:`BLOCK` x :data:`BLOCK` samples of luma (half that of each 4:2:0 chroma plane, or each RGB
channel), laid every half window, on the 8-bit scale; at ``--dedup-level loose`` the signed
difference is first averaged over 2x2 cells. A change confined to a small area (a blink, a moving
mouth, a small object) fills most of one window and scores high; compression noise on a held frame
is spread thin and scores low. The frame is a duplicate when the score is at most the level's
threshold and no plane's mean over the whole picture moved by more than its shift threshold (a fade
moves every sample a little; noise moves the mean hardly at all).

The levels are measured (:class:`manifests.dedup.DedupLevel`; ``benchmarks/dedup.py``, RESULTS.md
"Held frames (--dedup)"): on 320x180 frames of Big Buck Bunny, libx264 re-encoding leaves held
frames at most 2.8 (CRF 18) and 4.9 (CRF 28) apart in a window (3.8 after the 2x2 mean), and their
shift in any plane under 0.13; one step of a 1-pixel pan scores 5.1 or more (4.2 after the mean), a
16x16 box at 10 % 3.4 (3.3), and one step of a slow fade (about 2 levels a frame at most) shifts a
plane by 0.33 or more (a dark blue picture's chroma by 0.28). ``strict`` (3.0) errs towards
upscaling: some noisy repeats at CRF 28 are upscaled again; ``loose`` (4.0 after the mean) catches
them and cannot see a change as faint as the 10 % box.

What neither can see: a change smaller than about a quarter of a window at a few levels (a 2x2 pixel
dot changing by 40 levels scores 0.6), and a change of the whole picture by less than the threshold
per step, as long as the accumulated change stays below it.

The map is made in one pass over the decoded frames before any is extracted (the same decode as
extraction, so the same pixels), chunk by chunk: each chunk's first frame is upscaled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manifests.chunks import ChunkPlan
from manifests.dedup import DEDUP_BLOCK, DEDUP_FILE, DEDUP_LEVELS, STRICT, DedupLevel, DuplicateMap
from manifests.errors import DocumentError
from manifests.jsonio import write_json_atomic
from media.extract import decode_frames
from media.probe import MediaInfo

log = logging.getLogger(__name__)

#: The side of a luma window, in samples (chroma planes of 4:2:0 frames: half of it).
BLOCK = DEDUP_BLOCK
#: The default level (``--dedup`` without ``--dedup-level``).
DEFAULT_LEVEL = DEDUP_LEVELS[STRICT]


def _planes(frame: np.ndarray, yuv: bool) -> list[tuple[np.ndarray, int]]:
    """The planes of a frame, each with its window side: Y, U, V of a planar 4:2:0 (H * 3/2, W)
    array, or the channels of an (H, W, 3) RGB one."""
    if not yuv:
        return [(frame[..., channel], BLOCK) for channel in range(frame.shape[2])]
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    quarter = height * width // 4
    chroma = frame[height:].reshape(-1)
    return [
        (frame[:height], BLOCK),
        (chroma[:quarter].reshape(height // 2, width // 2), BLOCK // 2),
        (chroma[quarter:].reshape(height // 2, width // 2), BLOCK // 2),
    ]


def _cell_sums(plane: np.ndarray, side: int) -> np.ndarray:
    """The sums of ``plane`` (int32) over cells of ``side`` x ``side`` samples; sides that are not a
    multiple of ``side`` have their last row or column repeated, so every sample is in a cell."""
    rows, cols = plane.shape
    if rows % side or cols % side:
        plane = np.pad(plane, ((0, -rows % side), (0, -cols % side)), mode="edge")
    # strided adds: reshaping to (h, side, w, side) and summing axes 1 and 3 took 15x as long at 720p
    sums = plane[::side, ::side].copy()
    for row in range(side):
        for col in range(side):
            if row or col:
                sums += plane[row::side, col::side]
    return sums


def _window_max(diff: np.ndarray, block: int) -> float:
    """The largest mean of ``diff`` over windows of side ``block`` laid every half window, on two
    grids: one from the top left corner, one flush with the bottom and right edges (so every sample
    is in a window). A plane smaller than a window is one window (clipped to the plane)."""
    rows, cols = diff.shape
    cell = block // 2
    if rows < block or cols < block or cell < 1:
        return float(diff.mean())
    best = 0
    for top in dict.fromkeys((0, rows % cell)):
        for left in dict.fromkeys((0, cols % cell)):
            height, width = (rows - top) // cell, (cols - left) // cell
            cells = _cell_sums(diff[top : top + height * cell, left : left + width * cell], cell)
            windows = cells[:-1, :-1] + cells[1:, :-1] + cells[:-1, 1:] + cells[1:, 1:]
            best = max(best, int(windows.max()))
    return best / (block * block)


@dataclass(frozen=True)
class Difference:
    """How far apart two frames are, in 8-bit levels: ``window``, the largest window mean absolute
    difference of any plane; ``shift``, the mean signed difference over the whole picture of the plane
    where it is largest (a fade or a change of exposure moves it, compression noise hardly does)."""

    window: float
    shift: float

    def is_repeat(self, level: DedupLevel = DEFAULT_LEVEL) -> bool:
        return self.window <= level.threshold and abs(self.shift) <= level.shift_threshold


def frame_difference(
    a: np.ndarray, b: np.ndarray, *, yuv: bool, bits: int = 8, level: DedupLevel = DEFAULT_LEVEL
) -> Difference:
    """How far apart two frames of one layout are (samples of ``bits`` bits are scaled to 8), scored
    as ``level`` scores them (its ``blur``)."""
    if a.shape != b.shape:
        raise ValueError(f"frames of shapes {a.shape} and {b.shape} cannot be compared")
    worst, shifts, blur = 0.0, [], level.blur
    for (plane_a, block), (plane_b, _) in zip(_planes(a, yuv), _planes(b, yuv), strict=True):
        signed = plane_b.astype(np.int32) - plane_a.astype(np.int32)
        shifts.append(float(signed.mean()))
        # windows of the cell means: block / blur cells a side, each cell blur * blur samples
        cells = np.abs(_cell_sums(signed, blur) if blur > 1 else signed)
        worst = max(worst, _window_max(cells, max(block // blur, 1)) / (blur * blur))
    # The largest shift of any plane: a slow fade of a dark blue picture moves luma by a tenth of a
    # level a frame, but its blue-difference chroma by a quarter or more.
    shift = max(shifts, key=abs)
    unit = 1 << (bits - 8)
    return Difference(worst / unit, shift / unit)


class DuplicateFinder:
    """Frame by frame, in order: which earlier frame of the chunk (if any) each one repeats."""

    def __init__(self, *, yuv: bool, bits: int = 8, level: DedupLevel = DEFAULT_LEVEL) -> None:
        self.yuv, self.bits, self.level = yuv, bits, level
        self._reference: tuple[int, np.ndarray] | None = None
        self.differences: list[Difference] = []  # each compared frame's, for measurements

    def reference_of(self, index: int, frame: np.ndarray, *, fresh: bool = False) -> int | None:
        """The upscaled frame that frame ``index`` repeats, or None: it is to be upscaled (and
        becomes the reference). ``fresh``: a chunk starts here, nothing before it counts."""
        if self._reference is not None and not fresh:
            reference, kept = self._reference
            difference = frame_difference(kept, frame, yuv=self.yuv, bits=self.bits, level=self.level)
            self.differences.append(difference)
            if difference.is_repeat(self.level):
                return reference
        self._reference = (index, frame.copy())
        return None


def find_duplicates(
    frames: Iterable[np.ndarray],
    plan: ChunkPlan,
    *,
    yuv: bool,
    bits: int = 8,
    level: DedupLevel = DEFAULT_LEVEL,
) -> DuplicateMap:
    """The duplicate map of ``frames`` (frame 1 first) cut as ``plan`` cuts them, at ``level``."""
    finder = DuplicateFinder(yuv=yuv, bits=bits, level=level)
    duplicates: dict[int, int] = {}
    count = 0
    first_frames = {chunk.first for chunk in plan.chunks}
    for index, frame in enumerate(frames, start=1):
        count = index
        reference = finder.reference_of(index, frame, fresh=index in first_frames)
        if reference is not None:
            duplicates[index] = reference
    return DuplicateMap.of(count, plan.chunk_frames, level, duplicates)


def find_video_duplicates(
    info: MediaInfo, plan: ChunkPlan, *, yuv: bool, bits: int, level: DedupLevel = DEFAULT_LEVEL
) -> DuplicateMap:
    """Decode the video once (as extraction will: YUV or RGB samples) and make its duplicate map."""
    started = time.monotonic()
    dedup = find_duplicates(decode_frames(info, yuv=yuv), plan, yuv=yuv, bits=bits, level=level)
    if dedup.frames != info.video.frame_count:
        raise ValueError(f"{dedup.frames} frames decoded, the probe counted {info.video.frame_count}")
    log.info(
        "--dedup (%s): %d of %d frames repeat an upscaled one (found in %.1f s)",
        level.name,
        len(dedup.duplicates),
        dedup.frames,
        time.monotonic() - started,
    )
    return dedup


__all__ = [
    "BLOCK",
    "DEFAULT_LEVEL",
    "Difference",
    "DuplicateFinder",
    "find_duplicates",
    "job_duplicate_map",
]


def job_duplicate_map(
    job_dir: Path, info: MediaInfo, plan: ChunkPlan, *, yuv: bool, bits: int, level: DedupLevel
) -> DuplicateMap:
    """The job's duplicate map: the one an earlier run kept in ``job_dir`` (``dedup.json``) if it was
    made for this chunking and level, else a new one, found and written there atomically."""
    path = job_dir / DEDUP_FILE
    with contextlib.suppress(OSError, DocumentError):
        kept = DuplicateMap.from_json(path.read_bytes(), source=path)
        if kept.matches(info.video.frame_count, plan.chunk_frames, level):
            log.info("--dedup: the duplicate map of an earlier run is used (%s)", path)
            return kept
    dedup = find_video_duplicates(info, plan, yuv=yuv, bits=bits, level=level)
    write_json_atomic(path, dedup.to_json())
    return dedup
