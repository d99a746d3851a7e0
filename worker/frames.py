"""Frame files on the shared storage: read a batch into one array, write a batch atomically.

The frame file codec itself (PNG or raw ``.npy``, atomic writes) is the protocol's,
:mod:`manifests.frames`; this module reads and writes whole batches with it, on several threads,
with errors that name the frame and say what is wrong with it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from manifests import FrameFormat, PathOutsideRootError, frame_filename, resolve_within
from manifests.frames import decode_frame, write_frame

T = TypeVar("T")
R = TypeVar("R")


class FrameError(Exception):
    """One frame of a batch could not be read or written."""

    def __init__(self, frame: int, reason: str) -> None:
        self.frame = frame
        self.reason = reason
        super().__init__(f"frame {frame}: {reason}")


def read_batch(
    shared_root: Path,
    input_dir: Path,
    frames: Sequence[int],
    frame_format: FrameFormat,
    *,
    threads: int,
    label: str,
) -> np.ndarray:
    """Read ``frames`` into one (N, H, W, 3) array; raises :class:`FrameError` for the first bad frame."""

    def read_one(index: int) -> np.ndarray:
        name = frame_filename(index, frame_format)
        shown = f"{label}/{name}"
        try:
            path = resolve_within(shared_root, input_dir / name)
        except PathOutsideRootError as exc:
            reason = f"input frame {shown} resolves to {exc.resolved}, outside the shared root"
            raise FrameError(index, reason) from None
        try:
            data = path.read_bytes()  # one sequential read; also works on pipes and slow network storage
        except FileNotFoundError:
            raise FrameError(index, f"input frame {shown} is missing") from None
        except OSError as exc:
            raise FrameError(index, f"input frame {shown} cannot be read: {exc.strerror or exc}") from None
        try:
            return decode_frame(data, frame_format)
        except Exception as exc:
            raise FrameError(
                index, f"input frame {shown} is not a valid {frame_format.value} image: {exc}"
            ) from None

    arrays = map_threads(read_one, frames, threads)
    first = arrays[0].shape
    for index, array in zip(frames, arrays, strict=True):
        if array.shape != first:
            raise FrameError(
                index,
                f"input frame {label}/{frame_filename(index, frame_format)} is {array.shape[1]}x"
                f"{array.shape[0]}, but frame {frames[0]} of the same batch is {first[1]}x{first[0]}",
            )
    return np.stack(arrays)


def write_batch(
    output_dir: Path,
    frames: Sequence[int],
    upscaled: np.ndarray,
    frame_format: FrameFormat,
    png_compression: int,
    *,
    threads: int,
    fsync: bool,
    label: str,
) -> None:
    """Write every frame of a batch; on any failure remove the frames of this batch already written."""

    def write_one(position: int) -> None:
        index = frames[position]
        name = frame_filename(index, frame_format)
        try:
            write_frame(
                output_dir / name,
                upscaled[position],
                frame_format,
                png_compression=png_compression,
                fsync=fsync,
            )
        except OSError as exc:
            raise FrameError(
                index, f"output frame {label}/{name} cannot be written: {exc.strerror or exc}"
            ) from None

    try:
        map_threads(write_one, range(len(frames)), threads)
    except BaseException:
        remove_frames(output_dir, frames, frame_format)
        raise


def remove_frames(directory: Path, frames: Sequence[int], frame_format: FrameFormat) -> None:
    for index in frames:
        with contextlib.suppress(FileNotFoundError):
            (directory / frame_filename(index, frame_format)).unlink()


def map_threads(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[fn(item) for item in items]`` on up to ``threads`` daemon threads.

    Raises the exception of the earliest failing item. Daemon threads, so a read stuck on dead
    network storage never keeps the process from exiting.
    """
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[R | None] = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    lock = threading.Lock()
    position = 0

    def work() -> None:
        nonlocal position
        while True:
            with lock:
                if position >= len(items):
                    return
                mine = position
                position += 1
            try:
                results[mine] = fn(items[mine])
            except BaseException as exc:
                errors[mine] = exc

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(threads, len(items)))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results  # type: ignore[return-value]
