"""Frame files on the shared storage: read a batch into one array, write a batch atomically.

The frame file codec itself (PNG or raw ``.npy``, atomic writes) is the protocol's,
:mod:`manifests.frames`; this module reads and writes whole batches with it, on several threads,
with errors that name the frame and say what is wrong with it.

Frames are read and written by name in directories opened once per manifest
(:class:`manifests.atomic.Directory`): never through a symbolic link, never blocking on a device;
a named pipe is read to its end, but a stop request abandons the read within 100 ms. What one
read may hold is bounded: each frame by :class:`FrameLimits` (pixels of its upscaled output, file
size), and one call by a budget of output pixels: :func:`read_batch` reads as many of the batch's
frames as fit in it (at least one), and the caller reads the rest in further parts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from manifests import FrameFormat, frame_filename
from manifests.atomic import Directory
from manifests.errors import (
    FileTooLargeError,
    FrameFileError,
    FrameTooLargeError,
    SymlinkRefusedError,
    UnsafeFileError,
)
from manifests.frames import decode_frame, frame_size, write_frame
from worker.errors import WorkerError

T = TypeVar("T")
R = TypeVar("R")
CpuReport = Callable[[float], None]
"""Told the CPU seconds a thread spent on frame I/O (from that thread; must be thread-safe)."""

#: Bytes a frame file may hold per pixel of the frame it is checked against (raw 16-bit RGB is 6;
#: PNG stays under raw size plus its headers).
FILE_BYTES_PER_PIXEL = 8
FILE_BYTES_SLACK = 1 << 20


class FrameError(WorkerError):
    """One frame of a batch could not be read or written."""

    def __init__(self, frame: int, reason: str) -> None:
        self.frame = frame
        self.reason = reason
        super().__init__(f"frame {frame}: {reason}")


class ReadCancelled(Exception):
    """A read abandoned because the manifest is being stopped."""


@dataclass(frozen=True)
class FrameLimits:
    """What one input frame may be: its output at ``scale`` at most ``max_output_pixels``."""

    scale: float
    max_output_pixels: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return round(height * self.scale), round(width * self.scale)

    @property
    def max_input_pixels(self) -> int:
        """Checked from the header, before decoding: no frame above the output bound, nor one that
        could not upscale within it (the exact output check follows the decoding)."""
        limit = self.max_output_pixels
        return min(limit, int(limit / self.scale**2) + 2 * int(limit**0.5 / self.scale) + 1)

    @property
    def max_file_bytes(self) -> int:
        return self.max_input_pixels * FILE_BYTES_PER_PIXEL + FILE_BYTES_SLACK

    def check(self, shown: str, width: int, height: int) -> None:
        """Raise a :class:`FrameError`-ready reason (ValueError) for a frame whose output is out of bounds."""
        out_h, out_w = self.output_size(height, width)
        if width * height > self.max_output_pixels:
            raise ValueError(
                f"input frame {shown} is {width}x{height} ({_megapixels(width * height)}), more than this "
                f"worker's limit of {_megapixels(self.max_output_pixels)} per frame (--max-output-pixels)"
            )
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"input frame {shown} is {width}x{height}: at x{self.scale:g} its output would be empty"
            )
        if out_h * out_w > self.max_output_pixels:
            raise ValueError(
                f"input frame {shown} is {width}x{height}: upscaled x{self.scale:g} it would be "
                f"{out_w}x{out_h} ({_megapixels(out_w * out_h)}), more than this worker's limit of "
                f"{_megapixels(self.max_output_pixels)} per output frame (--max-output-pixels)"
            )


def read_batch(
    input_dir: Directory,
    frames: Sequence[int],
    frame_format: FrameFormat,
    *,
    threads: int,
    label: str,
    limits: FrameLimits,
    budget_pixels: int | None = None,
    cancel: threading.Event | None = None,
    bit_depth: int = 8,
    on_cpu: CpuReport | None = None,
) -> np.ndarray:
    """Read the first frames of ``frames`` into one (N, H, W, 3) array (a YUV job: (N, H * 3 / 2,
    W); uint8, or uint16 for ``bit_depth`` 16): all of them, or as many as fit in ``budget_pixels``
    output pixels (at least one). Raises :class:`FrameError` for the first bad frame (reading stops
    there) and :class:`ReadCancelled` once ``cancel`` is set. ``on_cpu`` is told the CPU time each
    reading thread spent."""

    def read_one(index: int) -> np.ndarray:
        shown = f"{label}/{frame_filename(index, frame_format)}"
        data = _read_frame_file(input_dir, index, frame_format, shown, limits, cancel)
        return _decode_frame(data, index, frame_format, shown, limits, bit_depth)

    if cancel is not None and cancel.is_set():
        raise ReadCancelled("the manifest is being stopped")
    with _counting(on_cpu):
        first = read_one(frames[0])
    count = len(frames)
    if budget_pixels is not None:
        first_w, first_h = frame_size(first, frame_format)
        out_h, out_w = limits.output_size(first_h, first_w)
        count = max(1, min(count, budget_pixels // (out_h * out_w)))
    arrays = [first, *map_threads(read_one, frames[1:count], threads, stop=cancel, on_cpu=on_cpu)]
    for index, array in zip(frames, arrays, strict=False):
        if array.shape != first.shape:
            name = f"{label}/{frame_filename(index, frame_format)}"
            (width, height), (first_w, first_h) = (
                frame_size(array, frame_format),
                frame_size(first, frame_format),
            )
            raise FrameError(
                index,
                f"input frame {name} is {width}x{height}, but frame {frames[0]} of "
                f"the same batch is {first_w}x{first_h}",
            )
    return np.stack(arrays)


def _read_frame_file(
    input_dir: Directory,
    index: int,
    frame_format: FrameFormat,
    shown: str,
    limits: FrameLimits,
    cancel: threading.Event | None,
) -> bytes:
    """The bytes of input frame ``index`` (``shown`` is its name in messages); :class:`FrameError`
    says why it cannot be read, :class:`ReadCancelled` that ``cancel`` was set meanwhile."""
    try:
        return input_dir.read_bytes(
            frame_filename(index, frame_format),
            max_bytes=limits.max_file_bytes,
            pipes=True,
            cancelled=cancel.is_set if cancel is not None else None,
        )
    except FileNotFoundError:
        raise FrameError(index, f"input frame {shown} is missing") from None
    except InterruptedError:
        raise ReadCancelled(f"reading {shown} was abandoned") from None
    except FileTooLargeError as exc:
        reason = f"input frame {shown} holds {exc.size} bytes, more than a frame may ({exc.limit})"
        raise FrameError(index, reason) from None
    except SymlinkRefusedError:
        reason = (
            f"input frame {shown} is a symbolic link; frames are read only from regular files, never "
            "through a link (one could lead outside the shared root)"
        )
        raise FrameError(index, reason) from None
    except UnsafeFileError as exc:
        raise FrameError(index, f"input frame {shown} {exc.problem}") from None
    except OSError as exc:
        raise FrameError(index, f"input frame {shown} cannot be read: {exc.strerror or exc}") from None


def _decode_frame(
    data: bytes, index: int, frame_format: FrameFormat, shown: str, limits: FrameLimits, bit_depth: int
) -> np.ndarray:
    """Input frame ``index`` decoded and checked against ``limits``; :class:`FrameError` if it cannot be."""
    try:
        array = decode_frame(
            data, frame_format, name=shown, max_pixels=limits.max_input_pixels, bit_depth=bit_depth
        )
        limits.check(shown, *frame_size(array, frame_format))
    except FrameTooLargeError as exc:
        try:
            limits.check(shown, exc.width, exc.height)
        except ValueError as too_large:
            raise FrameError(index, str(too_large)) from None
        raise FrameError(index, f"input {exc}") from None
    except FrameFileError as exc:
        raise FrameError(index, f"input {exc}") from None
    except ValueError as exc:
        raise FrameError(index, str(exc)) from None
    return array


def write_batch(
    output_dir: Directory,
    frames: Sequence[int],
    upscaled: np.ndarray,
    frame_format: FrameFormat,
    png_compression: int,
    *,
    threads: int,
    fsync: bool,
    label: str,
    on_cpu: CpuReport | None = None,
) -> None:
    """Write every frame of a batch; on any failure remove the frames of this batch already written.

    ``fsync``: the frames are durable when this returns (one file-system sync for the whole batch,
    after its last frame: the batch is claimed only after that).

    Refuses to write into ``output_dir`` once its path names another directory than the one opened
    (it was renamed, removed or replaced by a symlink after the manifest was accepted).
    """
    if output_dir.replaced():
        raise FrameError(
            frames[0],
            f"the output directory {label} was replaced (renamed, removed or made a symlink) after the "
            "manifest was accepted; nothing is written for it any more",
        )

    def write_one(position: int) -> None:
        index = frames[position]
        name = frame_filename(index, frame_format)
        try:
            write_frame(
                name,
                upscaled[position],
                frame_format,
                png_compression=png_compression,
                fsync=False,
                directory=output_dir,
            )
        except OSError as exc:
            raise FrameError(
                index, f"output frame {label}/{name} cannot be written: {exc.strerror or exc}"
            ) from None

    try:
        map_threads(write_one, range(len(frames)), threads, on_cpu=on_cpu)
        if fsync:  # durable as a batch: one call, not an fsync (file and directory) per frame
            with _counting(on_cpu):
                output_dir.sync_file_system()
    except BaseException:
        remove_frames(output_dir, frames, frame_format)
        raise


def remove_frames(directory: Directory, frames: Sequence[int], frame_format: FrameFormat) -> None:
    for index in frames:
        directory.unlink(frame_filename(index, frame_format))


def map_threads(
    fn: Callable[[T], R],
    items: Sequence[T],
    threads: int,
    *,
    stop: threading.Event | None = None,
    on_cpu: CpuReport | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on up to ``threads`` daemon threads; ``on_cpu(seconds)``, if
    given, is told the CPU time each thread spent on its items.

    No item is started once one has failed or ``stop`` is set; raises the exception of the earliest
    failing item, else :class:`ReadCancelled` when ``stop`` left items undone. Daemon threads, so a
    read stuck on dead network storage never keeps the process from exiting.
    """
    items = list(items)
    results: list[R | None] = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    lock = threading.Lock()
    position = 0
    failed = False

    def work() -> None:
        with _counting(on_cpu):
            take()

    def take() -> None:
        nonlocal position, failed
        while True:
            with lock:
                if position >= len(items) or failed or (stop is not None and stop.is_set()):
                    return
                mine = position
                position += 1
            try:
                results[mine] = fn(items[mine])
            except BaseException as exc:
                errors[mine] = exc
                failed = True

    if threads <= 1 or len(items) <= 1:
        work()
    else:
        workers = [
            threading.Thread(target=work, daemon=True, name="io-frames")
            for _ in range(min(threads, len(items)))
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    for error in errors:
        if error is not None:
            raise error
    if position < len(items):
        raise ReadCancelled("stopped before every frame was read")
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _counting(on_cpu: CpuReport | None) -> Iterator[None]:
    """Tell ``on_cpu`` (if any) the calling thread's CPU time inside the block."""
    started = time.thread_time()
    try:
        yield
    finally:
        if on_cpu is not None:
            on_cpu(time.thread_time() - started)


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"
