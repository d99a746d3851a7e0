"""What a job does that depends on what it upscales: a video, or still images.

The job engine (:mod:`coordinator.job` and its frames runner, :mod:`coordinator.frame_runner`) is
the same for both: frames go to shared storage, are upscaled by the workers chunk by chunk, and each
upscaled chunk is turned into its output part; the parts are put together at the end. A
:class:`JobMedia` says, for one kind of input, how frames are extracted, what one chunk's output
part is and whether it is already done, and how the parts become the output:

=================  =====================================  ==========================================
step               :class:`VideoMedia`                    :class:`ImageMedia`
=================  =====================================  ==========================================
extract            decode the video once (ffmpeg)         read each image (Pillow), one frame each
a chunk's part     a video-only segment (``segments/``)   its images, written in the output's format
                                                          under ``segments/<chunk>/``
finish             join the segments, mux audio etc.      move the images into place
=================  =====================================  ==========================================
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coordinator.images import ImageSet, read_rgb, write_image
from manifests.atomic import atomic_write, leftover_temp_files
from manifests.chunks import Chunk, frame_file_bytes
from manifests.colour import YuvSpec
from manifests.frames import read_frame, write_frame
from manifests.layout import FrameFormat, JobLayout, frame_filename, frame_formats_for_depth
from media.encode import PART_SUFFIX, EncodeSettings, check_encode, settings_for_depth
from media.errors import OutputPathError
from media.extract import YUV_SOURCE_FORMATS, FrameDone, FrameGate, extract_frames
from media.probe import MediaInfo
from media.segments import SEGMENT_SUFFIX, encode_segment, join_segments, segment_is_complete

log = logging.getLogger(__name__)


class JobMedia(Protocol):
    @property
    def frame_count(self) -> int: ...

    @property
    def name(self) -> Path:
        """The input, as the job id's readable part names it."""

    @property
    def bit_depth(self) -> int:
        """Bits per sample of its frames on shared storage: 8, or 16 (uint16 ``.npy``)."""

    def content_identity(self) -> dict[str, object]:
        """What of the input decides the upscaled frames (hashes its content: call it in a thread)."""

    def batch_size(self, asked: int) -> int:
        """Frames per batch, given what the job asks for."""

    def frame_layout(self, asked: FrameFormat | None, scale: float) -> tuple[FrameFormat, YuvSpec | None]:
        """The frame format of the job's files (``asked``, None: the fastest that holds the job's
        frames) and, for YUV frames, the conversion the workers apply. Raises ValueError for a
        format that cannot hold them."""

    def frame_bytes(self, scale: float, frame_format: FrameFormat) -> tuple[int, int]:
        """Upper bounds of one input and one output frame file, for the disk budget."""

    def output_size(self, frame: int, scale: float) -> tuple[int, int]:
        """(width, height) of upscaled frame ``frame``."""

    def check_output(self, scale: float | None) -> None:
        """Refuse up front what the output cannot take (an encoder, a size); None: not known yet."""

    def remove_leftovers(self) -> None:
        """Temporary files an earlier, killed run left beside the output."""

    def extract(
        self,
        input_dir: Path,
        frame_format: FrameFormat,
        png_compression: int,
        gate: FrameGate,
        on_frame: FrameDone,
    ) -> None:
        """Write every frame the gate lets through to ``input_dir``."""

    def part_done(self, layout: JobLayout, chunk: Chunk) -> bool:
        """Whether chunk ``chunk``'s output part is on disk, whole (an earlier run's)."""

    def make_part(
        self, layout: JobLayout, chunk: Chunk, frame_format: FrameFormat, sources: Sequence[int] | None = None
    ) -> None:
        """Turn the chunk's upscaled frames into its output part; ``sources`` (one per frame) name the
        upscaled frame each is made of (``--dedup``; videos only), default: its own."""

    def finish(self, layout: JobLayout, chunks: tuple[Chunk, ...]) -> None:
        """Put the parts together into the output (nothing under the output's name before)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def segment_path(layout: JobLayout, chunk: Chunk) -> Path:
    return layout.segments_dir / f"{chunk.index:06d}{SEGMENT_SUFFIX}"


@dataclass
class VideoMedia:
    """A video. A source of more than 8 bits per sample has 16-bit frames and is encoded at its own
    depth unless the settings name a pixel format (:func:`~media.encode.settings_for_depth`,
    which refuses a codec that cannot hold it)."""

    info: MediaInfo
    output: Path
    encode: EncodeSettings
    overwrite: bool
    precision: str | None = None  # the job's --precision, None: the workers' default

    def __post_init__(self) -> None:
        video = self.info.video
        self.encode = settings_for_depth(self.encode, video.bit_depth)
        if video.high_depth and self.precision == "bf16":
            log.warning(
                "bf16 keeps 8 significant bits: the %d-bit samples are rounded to about 8 bits inside "
                "the model; --precision fp16 keeps 10 bits exactly, fp32 every bit",
                video.bit_depth,
            )
        elif video.bit_depth > 10 and self.precision in {None, "fp16"}:
            log.warning(
                "fp16 (the default on a GPU) keeps 11 significant bits: %d-bit codes in the upper half "
                "of the range may move by one step inside the model; --precision fp32 keeps every code",
                video.bit_depth,
            )
        hdr = video.hdr
        if hdr.dynamic:
            log.warning(
                "%s carries %s dynamic HDR metadata; it is dropped: it describes the source's frames "
                "scene by scene and would be wrong for the upscaled ones (the HDR10 base layer, its "
                "colour tags and static metadata are kept)",
                self.info.path,
                " and ".join(hdr.dynamic),
            )
        if (hdr.mastering or hdr.content_light) and not self.encode.carries_hdr10:
            log.warning(
                "%s has HDR10 mastering display / content light metadata, which %s cannot write; the "
                "output carries only the colour tags (use --codec libx264, libx265 or libsvtav1 to keep it)",
                self.info.path,
                self.encode.codec,
            )

    @property
    def frame_count(self) -> int:
        return self.info.frame_count

    @property
    def name(self) -> Path:
        return self.info.path

    @property
    def bit_depth(self) -> int:
        return self.info.video.frame_bit_depth

    def content_identity(self) -> dict[str, object]:
        # The depth only when 16: an 8-bit job's identity (and so its job id) is what it always was,
        # and a job directory of 8-bit frames made before 16-bit frames existed is never resumed
        # as this one.
        depth = {"frame_bit_depth": 16} if self.bit_depth == 16 else {}
        return {"input_sha256": file_sha256(self.info.path), **depth}

    def batch_size(self, asked: int) -> int:
        return asked

    def frame_layout(self, asked: FrameFormat | None, scale: float) -> tuple[FrameFormat, YuvSpec | None]:
        video = self.info.video
        yuv = self._yuv_spec(scale)
        if asked is None:
            return (FrameFormat.YUV, yuv) if yuv is not None else (FrameFormat.NPY, None)
        if asked is FrameFormat.YUV:
            if yuv is None:
                raise ValueError(
                    f"--frame-format yuv needs a planar 4:2:0 source (yuv420p, 10 or 12 bits), even frame "
                    f"sides and an output of the source's pixel format; this job has {video.pix_fmt} "
                    f"{video.width}x{video.height} to {self.encode.effective_pix_fmt} "
                    f"{'x'.join(map(str, self.output_size(1, scale)))} (use npy or png)"
                )
            return asked, yuv
        if asked not in frame_formats_for_depth(self.bit_depth):
            log.info(
                "the source has more than 8 bits per sample: its frames are stored as 16-bit npy "
                "(Pillow cannot write 16-bit RGB PNG)"
            )
            return FrameFormat.NPY, None
        return asked, None

    def _yuv_spec(self, scale: float) -> YuvSpec | None:
        """The conversion for YUV frames, or None where the job cannot keep its frames in YUV: a
        source that is not planar 4:2:0, an odd frame side (in or out), or an output that is not
        in the source's own pixel format (an RGB codec, another chroma layout or depth)."""
        video = self.info.video
        bits = YUV_SOURCE_FORMATS.get(video.pix_fmt or "")
        out_w, out_h = self.output_size(1, scale)
        if bits is None or self.encode.is_rgb or self.encode.effective_pix_fmt != video.pix_fmt:
            return None
        if any(side % 2 for side in (video.width, video.height, out_w, out_h)):
            return None
        conversion = video.conversion
        return YuvSpec(conversion.scale_matrix, conversion.range, bits)

    def frame_bytes(self, scale: float, frame_format: FrameFormat) -> tuple[int, int]:
        width, height = self.info.video.width, self.info.video.height
        out_w, out_h = self.output_size(1, scale)
        depth = self.bit_depth
        return (
            frame_file_bytes(width, height, frame_format, depth),
            frame_file_bytes(out_w, out_h, frame_format, depth),
        )

    def output_size(self, frame: int, scale: float) -> tuple[int, int]:
        return round(self.info.video.width * scale), round(self.info.video.height * scale)

    def check_output(self, scale: float | None) -> None:
        size = self.output_size(1, scale) if scale is not None else None
        check_encode(self.info, self.output, self.encode, overwrite=self.overwrite, size=size)

    def remove_leftovers(self) -> None:
        for leftover in leftover_temp_files(self.output, PART_SUFFIX, dead_writers_only=True):
            log.info("removing %s, left by an earlier run that was killed", leftover)
            leftover.unlink(missing_ok=True)

    def extract(
        self,
        input_dir: Path,
        frame_format: FrameFormat,
        png_compression: int,
        gate: FrameGate,
        on_frame: FrameDone,
    ) -> None:
        extract_frames(
            self.info, input_dir, frame_format=frame_format, png_compression=png_compression, gate=gate,
            on_frame=on_frame,
        )  # fmt: skip

    def part_done(self, layout: JobLayout, chunk: Chunk) -> bool:
        return segment_is_complete(segment_path(layout, chunk), chunk.count)

    def make_part(
        self, layout: JobLayout, chunk: Chunk, frame_format: FrameFormat, sources: Sequence[int] | None = None
    ) -> None:
        encode_segment(
            self.info, layout.output_dir, chunk.first, chunk.count, segment_path(layout, chunk),
            settings=self.encode, frame_format=frame_format, sources=sources,
        )  # fmt: skip

    def finish(self, layout: JobLayout, chunks: tuple[Chunk, ...]) -> None:
        segments = [segment_path(layout, chunk) for chunk in chunks]
        join_segments(self.info, segments, self.output, settings=self.encode, overwrite=self.overwrite)


@dataclass
class ImageMedia:
    images: ImageSet
    overwrite: bool

    @property
    def frame_count(self) -> int:
        return self.images.frame_count

    @property
    def name(self) -> Path:
        return self.images.source

    @property
    def bit_depth(self) -> int:
        return 8  # images are read as 8-bit RGB

    def content_identity(self) -> dict[str, object]:
        return {"images_sha256": self.images.content_sha256()}

    def batch_size(self, asked: int) -> int:
        return 1  # images of different sizes cannot share a batch

    def frame_layout(self, asked: FrameFormat | None, scale: float) -> tuple[FrameFormat, YuvSpec | None]:
        if asked is FrameFormat.YUV:
            raise ValueError("images are upscaled as RGB: --frame-format yuv is for videos (use png or npy)")
        return asked or FrameFormat.PNG, None

    def frame_bytes(self, scale: float, frame_format: FrameFormat) -> tuple[int, int]:
        width, height = self.images.max_size()
        out_w, out_h = round(width * scale), round(height * scale)
        return frame_file_bytes(width, height, frame_format), frame_file_bytes(out_w, out_h, frame_format)

    def output_size(self, frame: int, scale: float) -> tuple[int, int]:
        image = self.images.images[frame - 1]
        return round(image.width * scale), round(image.height * scale)

    def check_output(self, scale: float | None) -> None:
        pass  # checked by probe_images; any size can be written

    def remove_leftovers(self) -> None:
        for frame in range(1, self.frame_count + 1):
            for leftover in leftover_temp_files(self.images.target(frame), dead_writers_only=True):
                leftover.unlink(missing_ok=True)

    def extract(
        self,
        input_dir: Path,
        frame_format: FrameFormat,
        png_compression: int,
        gate: FrameGate,
        on_frame: FrameDone,
    ) -> None:
        for frame, image in enumerate(self.images.images, start=1):
            if gate(frame):
                path = input_dir / frame_filename(frame, frame_format)
                write_frame(path, read_rgb(image), frame_format, png_compression=png_compression)
            on_frame(frame)

    def _part_file(self, layout: JobLayout, frame: int) -> Path:
        """The staged output image of ``frame``: its number (names may repeat across chunks) and suffix."""
        return layout.segments_dir / "images" / f"{frame:08d}{self.images.target(frame).suffix.lower()}"

    def part_done(self, layout: JobLayout, chunk: Chunk) -> bool:
        return all(self._part_file(layout, frame).is_file() for frame in chunk.frames)

    def make_part(
        self, layout: JobLayout, chunk: Chunk, frame_format: FrameFormat, sources: Sequence[int] | None = None
    ) -> None:
        if sources is not None:
            raise ValueError("images are upscaled one by one: no image reuses another's output")
        (layout.segments_dir / "images").mkdir(exist_ok=True)
        for frame in chunk.frames:
            upscaled = read_frame(layout.output_dir / frame_filename(frame, frame_format), frame_format)
            write_image(self.images.images[frame - 1], upscaled, self._part_file(layout, frame))

    def finish(self, layout: JobLayout, chunks: tuple[Chunk, ...]) -> None:
        if self.images.folder:
            self.images.output.mkdir(exist_ok=True)
        for frame in range(1, self.frame_count + 1):
            target = self.images.target(frame)
            if target.exists() and not self.overwrite:
                raise OutputPathError(target, "appeared while the job ran; it is left as it is")
            staged = self._part_file(layout, frame)
            try:
                os.replace(staged, target)  # the same file system: atomic, and the image is whole already
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with open(staged, "rb") as source, atomic_write(target) as copy:
                    shutil.copyfileobj(source, copy)
