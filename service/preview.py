"""Before/after previews: frame N of a job's input and of its output side by side, as one PNG.

Frames are decoded by the coordinator's media edge (:func:`media.extract.decode_frames`, the
exact pixels the workers were given). Both halves have the output's size, so that they can be
compared: the input is enlarged to it with nearest-neighbour (its pixels as they are, only bigger),
on the left; the output on the right.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from coordinator.errors import EXPECTED_ERRORS
from media.extract import decode_frames
from service.errors import PreviewError


def decoded_frame(path: Path, frame: int) -> np.ndarray:
    """Frame ``frame`` (1 = the first) of ``path``, RGB."""
    try:
        frames = decode_frames(path)
        try:
            found = next(itertools.islice(frames, frame - 1, None), None)
        finally:
            frames.close()  # type: ignore[attr-defined]
    except EXPECTED_ERRORS as exc:
        raise PreviewError(str(exc)) from None
    if found is None:
        raise PreviewError(f"{path} has fewer than {frame} frames")
    return found


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``before`` enlarged (nearest neighbour) to ``after``'s size, beside ``after``: one image of
    twice ``after``'s width."""
    height, width = after.shape[:2]
    if before.shape[:2] != (height, width):
        before = np.asarray(Image.fromarray(before).resize((width, height), Image.Resampling.NEAREST))
    return np.concatenate([before, after], axis=1)


def render_preview(source: Path, output: Path, frame: int) -> bytes:
    """The PNG of frame ``frame`` of ``source`` beside the same frame of ``output``."""
    image = side_by_side(decoded_frame(source, frame), decoded_frame(output, frame))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
