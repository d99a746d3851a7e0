"""The segment transport on the worker: decode a range of the source, upscale it, encode one segment.

::

    source video --decode_range (ffmpeg; the reader thread)--> parts of frames
      --upscale (the compute thread: the frames path's calls)--> queue of upscaled parts
      --encode_segment_frames (ffmpeg, fed by the encoder thread)--> .<segment>.<pid>.<token>.part
      --> checked (one packet per frame) and renamed to the segment when the last frame is in

:class:`SegmentRun` is a :class:`~worker.processing.ManifestRun` whose three I/O steps are replaced
(reading a part, writing a part, discarding what was not claimed); the pipeline, the per-batch claims
and the status file are the frames transport's. A batch is claimed once its frames are in the
encoder, except the last, claimed only once the segment has its final name: a ``completed`` status
means the segment is on disk. The first failed batch ends the run ``failed`` (a segment cannot be
made without every frame); a failure or stop kills the decoder and the encoder, and leaves neither
the temporary file nor a segment at the final name.

Decoded frames reach the model in the layout the manifest's ``frame_format`` names (I420 planes for
``yuv``, uint8/uint16 RGB for ``npy``), exactly what the frames transport's extraction would have
written (:func:`media.extract.decode_range`); the upscaled frames are encoded with the job's settings
(:class:`manifests.segment.SegmentEncode`) and the source's timestamps and colour tags.

Files: the source and the segment's directory are reached through the descriptors opened at submit
(``/proc/<pid>/fd/<n>``), never through their paths again: the source file is opened once, without
following a symlink, and ffmpeg reads that open file; the segment is written and renamed in the
directory opened then. The source is probed once per job and file (:class:`ProbeCache`), not once
per range.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import os
import queue
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from manifests import FrameFormat, Manifest
from manifests.segment import SegmentEncode, SegmentWork
from media.encode import EncodeSettings, settings_for_depth
from media.errors import MediaError
from media.extract import YUV_SOURCE_FORMATS, decode_range
from media.ffmpeg import ProcessGroup, process_group
from media.probe import MediaInfo, probe
from media.segments import SEGMENT_SUFFIX, encode_segment_frames
from worker.frames import FrameError, ReadCancelled
from worker.processing import ManifestRun

log = logging.getLogger(__name__)

_SOURCE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_END = object()  # the encoder's queue: the last frame is in
_ABORT = object()  # the encoder's queue: give up the segment
ProbeKey = tuple[str, str, int, int, int, int]
#: Decoded frames the decoder thread may hold ahead of the reads.
DECODED_AHEAD = 4


def _give(box: queue.Queue[Any], item: Any, cancel: threading.Event) -> bool:
    """Put ``item`` in ``box`` as soon as there is room; False (not put) once ``cancel`` is set."""
    while not cancel.is_set():
        try:
            box.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _take(box: queue.Queue[Any], cancel: threading.Event) -> Any:
    """The next item of ``box``; raises :class:`ReadCancelled` once ``cancel`` is set."""
    while not cancel.is_set():
        try:
            return box.get(timeout=0.1)
        except queue.Empty:
            continue
    raise ReadCancelled("the manifest is being stopped")


class SegmentAbandonedError(Exception):
    """The segment was given up (a stop or a failure) before its last frame."""


def segment_settings(encode: SegmentEncode, bit_depth: int = 8) -> EncodeSettings:
    """The job's encoder settings for a source of ``bit_depth`` bits per sample (the coordinator's
    choice of pixel format: :func:`media.encode.settings_for_depth`). Raises
    :class:`media.errors.EncodeSettingsError`."""
    settings = EncodeSettings(
        codec=encode.codec, crf=encode.crf, preset=encode.preset, pix_fmt=encode.pix_fmt,
        extra_args=encode.extra_args,
    )  # fmt: skip
    return settings_for_depth(settings, bit_depth)


def check_segment_manifest(manifest: Manifest) -> None:
    """Raise ValueError (a sentence for a 400) unless this worker can run ``manifest``'s segment: it
    writes an MP4 segment (so a manifest cannot make it replace any other kind of file), not its own
    source, and its encoder settings are valid and its ffmpeg has the encoder. Blocking (asks ffmpeg
    once)."""
    segment = manifest.segment
    assert segment is not None
    if not segment.file.endswith(SEGMENT_SUFFIX):
        raise ValueError(
            f"manifest field 'segment.file' must name a {SEGMENT_SUFFIX} file, not {segment.file!r}"
        )
    if os.path.normpath(segment.file) == os.path.normpath(segment.source):
        raise ValueError("manifest field 'segment.file' names the source itself")
    try:
        segment_settings(segment.encode).check_available()
    except MediaError as exc:
        raise ValueError(f"manifest field 'segment.encode': {exc}") from None


class ProbeCache:
    """Probes of source files, by job, path and file identity (device, inode, size, modification
    time): a worker given several ranges of one source probes it once. Keeps the last ``keep``."""

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._entries: OrderedDict[ProbeKey, MediaInfo] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: ProbeKey, path: Path, prober: Callable[[Path], MediaInfo] = probe) -> MediaInfo:
        """The probe of the file ``key`` names, read at ``path`` (probed now if not known)."""
        with self._lock:
            info = self._entries.get(key)
            if info is not None:
                self._entries.move_to_end(key)
                return dataclasses.replace(info, path=path)
        info = prober(path)
        log.info("probed %s of job %s: %d frames", key[1], key[0], info.video.frame_count)
        with self._lock:
            self._entries[key] = info
            while len(self._entries) > self._keep:
                self._entries.popitem(last=False)
        return info


class SegmentRun(ManifestRun):
    """One segment manifest: ``dirs.input`` is the source's directory, ``dirs.output`` the segment's."""

    stops_at_first_failure = True

    def __init__(
        self, *args: Any, source_name: str, segment_name: str, probes: ProbeCache, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        assert self.manifest.segment is not None
        self.segment: SegmentWork = self.manifest.segment
        self._source_name = source_name
        self._segment_name = segment_name
        self._probes = probes
        self._group = ProcessGroup()  # the decoder and the encoder: killed at once on a stop
        self._paths: dict[str, str] = {}  # the /proc paths ffmpeg is given -> the names messages show
        self._source_fd: int | None = None
        self._started = False
        self._decoded: queue.Queue[Any] = queue.Queue(maxsize=DECODED_AHEAD)  # frames, then _END or an error
        self._next_frame = self.segment.first_frame
        self._size = (0, 0)  # the source's (height, width), once probed
        self._parts: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._encoded: concurrent.futures.Future[None] | None = None
        self._label_in = self.segment.source
        self._label_out = self.segment.file

    # -- reading: the decoder --------------------------------------------------------------------

    def _read_part(self, frames: tuple[int, ...]) -> np.ndarray:
        if frames[0] != self._next_frame:
            raise FrameError(frames[0], f"frames are decoded in order; the next is {self._next_frame}")
        if not self._started:
            self._start(frames[0])
        height, width = self._limits.output_size(*self._size)
        count = max(1, min(len(frames), self._budget_pixels // (height * width)))
        arrays = []
        for index in frames[:count]:
            item = _take(self._decoded, self._cancel_reads)
            if isinstance(item, BaseException):
                raise FrameError(index, self._shown(item)) from None
            if item is _END:
                raise FrameError(index, f"the decoder of {self.segment.source} ended before frame {index}")
            arrays.append(item)
        self._next_frame += count
        return np.stack(arrays)

    def _start(self, first: int) -> None:
        """Open and probe the source, check it against the manifest, start the encoder and the decoder."""
        info = self._open_source(first)
        video, manifest, shown = info.video, self.manifest, self.segment.source
        self._size = (video.height, video.width)
        try:
            self._limits.check(f"{shown} (frame {first})", video.width, video.height)
        except ValueError as exc:
            raise FrameError(first, str(exc)) from None
        if self.segment.last_frame > video.frame_count:
            reason = f"the source {shown} has {video.frame_count} frames, not frame {self.segment.last_frame}"
            raise FrameError(first, reason)
        if manifest.bit_depth != video.frame_bit_depth:
            reason = (
                f"the manifest hands {manifest.bit_depth}-bit frames to the model, but the source {shown} "
                f"is decoded to {video.frame_bit_depth}-bit frames"
            )
            raise FrameError(first, reason)
        yuv = manifest.frame_format is FrameFormat.YUV
        if yuv and (manifest.yuv is None or YUV_SOURCE_FORMATS.get(video.pix_fmt or "") != manifest.yuv.bits):
            bits = manifest.yuv.bits if manifest.yuv is not None else None
            reason = f"the manifest's {bits}-bit YUV frames do not fit the source {shown} ({video.pix_fmt})"
            raise FrameError(first, reason)
        try:
            settings = segment_settings(self.segment.encode, video.bit_depth)
        except MediaError as exc:
            raise FrameError(first, f"segment.encode: {exc}") from None
        self._started = True
        self._start_encoder(info, settings)
        self._in_thread("segment-decoder", self._decode, info, yuv)

    def _decode(self, info: MediaInfo, yuv: bool) -> None:
        """The decoder thread: the range's frames into ``_decoded``, then ``_END`` or the error. A
        thread of its own for the whole range: ffmpeg dies with the thread that started it."""
        try:
            with contextlib.closing(
                decode_range(info, self.segment.first_frame, self.segment.count, yuv=yuv)
            ) as frames:
                for frame in frames:
                    if not _give(self._decoded, frame, self._cancel_reads):
                        return
            _give(self._decoded, _END, self._cancel_reads)
        except Exception as exc:  # the read waiting for the next frame fails with it
            _give(self._decoded, exc, self._cancel_reads)

    def _in_thread(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` on a daemon thread of its own that holds the run's directories, with every
        ffmpeg it starts in the run's process group."""
        self.dirs.acquire()

        def target() -> None:
            try:
                with process_group(self._group):
                    fn(*args)
            finally:
                self.dirs.release()

        threading.Thread(target=target, daemon=True, name=name).start()

    def _open_source(self, first: int) -> MediaInfo:
        shown = self.segment.source
        try:
            fd = os.open(self._source_name, _SOURCE_FLAGS, dir_fd=self.dirs.input.fileno())
        except FileNotFoundError:
            raise FrameError(first, f"the source {shown} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                reason = f"the source {shown} is a symbolic link; a source is read only from a regular file"
                raise FrameError(first, reason) from None
            raise FrameError(first, f"the source {shown} cannot be opened: {exc.strerror or exc}") from None
        self._source_fd = fd
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise FrameError(first, f"the source {shown} is not a regular file")
        os.set_blocking(fd, True)
        path = self._proc_path(fd, None, shown)
        key = (self.manifest.job_id, shown, found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)
        try:
            return self._probes.get(key, path)
        except MediaError as exc:
            raise FrameError(first, self._shown(exc)) from None

    def _proc_path(self, fd: int, name: str | None, shown: str) -> Path:
        """The path of the open file ``fd`` (or of ``name`` in the open directory ``fd``) that another
        process, ffmpeg, can open: what the run opened, whatever its path names now."""
        path = f"/proc/{os.getpid()}/fd/{fd}" + (f"/{name}" if name is not None else "")
        self._paths[path] = shown
        return Path(path)

    def _shown(self, exc: BaseException) -> str:
        """``exc``'s message, naming files as the manifest does rather than by their /proc paths."""
        message = str(exc)
        for path, shown in sorted(self._paths.items(), key=lambda item: -len(item[0])):
            message = message.replace(path, shown)
        return message

    # -- writing: the encoder --------------------------------------------------------------------

    def _start_encoder(self, info: MediaInfo, settings: EncodeSettings) -> None:
        target = self._proc_path(self.dirs.output.fileno(), self._segment_name, self.segment.file)
        self._paths[str(target.parent)] = str(Path(self.segment.file).parent)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._encoded = done

        def encode() -> None:
            try:
                encode_segment_frames(
                    info, self._upscaled_frames(), self.segment.first_frame, self.segment.count, target,
                    settings=settings, frame_format=self.manifest.frame_format,
                    encoder_threads=self.segment.encode.threads, where=Path(self.segment.source),
                )  # fmt: skip
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._in_thread("segment-encoder", encode)

    def _upscaled_frames(self) -> Iterator[np.ndarray]:
        while True:
            item = self._parts.get()
            if item is _END:
                return
            if item is _ABORT:
                raise SegmentAbandonedError("the segment was given up before its last frame")
            yield from item

    def _write_part(self, part: tuple[int, ...], upscaled: np.ndarray, final: bool) -> None:
        try:
            self._hand_over(upscaled)
            if final:
                self._hand_over(_END)
                assert self._encoded is not None
                self._encoded.result()  # the segment is renamed into place: the last batch is done
        except Exception as exc:
            raise FrameError(part[0], f"encoding the segment failed: {self._shown(exc)}") from None

    def _hand_over(self, item: Any) -> None:
        """Put ``item`` in the encoder's queue, unless the encoder has ended (its error is raised)."""
        encoded = self._encoded
        assert encoded is not None
        while True:
            if encoded.done():
                encoded.result()
                raise MediaError("the encoder ended before the last frame")
            try:
                self._parts.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    async def _discard_unclaimed(self) -> None:
        await asyncio.shield(self._io(self._close, len(self._done) == len(self.manifest.batches)))

    def _close(self, completed: bool) -> None:
        """End the decoder and the encoder; unless ``completed``, give up the segment (its temporary
        file is removed by the encoder, and a segment it renamed into place is removed too)."""
        if not completed:
            self._cancel_reads.set()  # the decoder thread stops handing frames over
            with contextlib.suppress(queue.Empty):
                while True:
                    self._parts.get_nowait()
            with contextlib.suppress(queue.Full):
                self._parts.put_nowait(_ABORT)  # an encoder waiting for frames gives up
            self._group.kill_all()  # a decoder or encoder at work stops
        encoded = self._encoded
        if encoded is not None:
            with contextlib.suppress(BaseException):
                encoded.result()
            if not completed and encoded.exception() is None:
                with contextlib.suppress(FileNotFoundError):
                    self.dirs.output.unlink(self._segment_name)
                log.info("%s: removed segment %s (the run did not complete)", self._name, self.segment.file)
        if self._source_fd is not None:
            os.close(self._source_fd)
            self._source_fd = None
