"""Still images: the coordinator's edge for ``esrfarm upscale photo.png out.png`` and for folders.

An image job is a job whose frames are images instead of a video's: each image becomes one frame
file on shared storage (workers already read and write images), is upscaled like any frame, and
is written back in the output's format. This module owns reading and writing those images
(Pillow): which files of a folder are images, their sizes, the RGB frame an image gives (EXIF
orientation applied), and the output image (alpha upscaled beside the RGB, the format by suffix).

- ``photo.png -> out.png`` (or ``.jpg``, ``.webp``, ...): one image;
- ``photos/ -> upscaled/``: every image in the folder (not its sub-folders), in name order, each
  written to ``upscaled/`` under its own name (and format). The output folder may exist; a file in
  it is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from manifests.atomic import atomic_write
from media.errors import InputError, OutputPathError
from media.probe import CONTAINER_FORMATS

#: Image suffixes esrfarm reads and writes, and Pillow's format for each.
IMAGE_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF",
}  # fmt: skip
#: The most pixels of one input image (a decompression bomb is refused before it is decoded).
MAX_IMAGE_PIXELS = 16384 * 16384


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_FORMATS


def is_image_job(source: Path, output: Path) -> bool:
    """An image job: a folder in, or an image file out."""
    return source.is_dir() or is_image_path(output)


@dataclass(frozen=True)
class SourceImage:
    path: Path
    width: int  # after EXIF orientation
    height: int
    has_alpha: bool


@dataclass(frozen=True)
class ImageSet:
    """The images of one job, in frame order (frame i is ``images[i - 1]``), and where each goes."""

    source: Path
    output: Path
    images: tuple[SourceImage, ...]
    folder: bool

    @property
    def frame_count(self) -> int:
        return len(self.images)

    def target(self, frame: int) -> Path:
        """Where frame ``frame``'s upscaled image is written."""
        image = self.images[frame - 1]
        return self.output / image.path.name if self.folder else self.output

    def max_size(self) -> tuple[int, int]:
        return max(i.width for i in self.images), max(i.height for i in self.images)

    def content_sha256(self) -> str:  # read in a thread: it reads every image
        """What the upscaled frames depend on: every image's name and bytes."""
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(image.path.name.encode() + b"\0")
            with image.path.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
        return digest.hexdigest()


def probe_images(source: Path, output: Path, *, overwrite: bool) -> ImageSet:
    """The images of ``source`` (a file or a folder) and a check of ``output``; raises
    :class:`InputError` / :class:`OutputPathError` with one sentence."""
    if not source.exists():
        raise InputError(source, "does not exist")
    folder = source.is_dir()
    if folder and output.suffix.lower() in CONTAINER_FORMATS:
        raise InputError(
            source,
            "is a directory, not a video file "
            f"(a folder of images goes to an output folder, not {output.name})",
        )
    if folder and is_image_path(output) and not output.is_dir():
        raise OutputPathError(
            output,
            f"is an image file name, but the input {source} is a folder: its images go to a folder "
            f"(give a folder name, e.g. {output.with_suffix('')})",
        )
    if not folder and not is_image_path(source) and not _opens_as_image(source):
        raise OutputPathError(
            output,
            f"is an image file name, but the input {source.name} is not an image: a video is written "
            "to a video file (.mp4, .mkv, .mov, .webm)",
        )
    if folder:
        paths = sorted(p for p in source.iterdir() if p.is_file() and is_image_path(p))
        if not paths:
            raise InputError(source, f"holds no images ({', '.join(sorted(set(IMAGE_FORMATS)))})")
        _check_output_folder(source, output, [p.name for p in paths], overwrite)
    else:
        paths = [source]
        _check_output_image(source, output, overwrite)
    return ImageSet(source, output, tuple(_read_header(p) for p in paths), folder)


def _opens_as_image(path: Path) -> bool:
    """Whether Pillow recognises ``path`` (an image under a suffix esrfarm does not list)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError):
        return False


def _read_header(path: Path) -> SourceImage:
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(
                    path, f"is {width}x{height} pixels, more than esrfarm upscales ({MAX_IMAGE_PIXELS})"
                )
            if getattr(image, "n_frames", 1) > 1:
                raise InputError(path, "is an animated image: upscale it as a video (give a video output)")
            orientation = image.getexif().get(0x0112, 1)
            if orientation in {5, 6, 7, 8}:  # rotated by 90 or 270 degrees
                width, height = height, width
            has_alpha = image.mode in {"RGBA", "LA", "PA"} or (
                image.mode == "P" and "transparency" in image.info
            )
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(path, f"is not an image esrfarm can read ({exc})") from None
    return SourceImage(path, width, height, has_alpha)


def _check_output_image(source: Path, output: Path, overwrite: bool) -> None:
    if not is_image_path(output):
        raise OutputPathError(output, f"is not an image file name; esrfarm writes {', '.join(IMAGE_FORMATS)}")
    if output.exists() and os.path.samefile(output, source):
        raise OutputPathError(output, "is the input file; choose another output path")
    if output.is_dir():
        raise OutputPathError(output, "is a directory; give a file name")
    if output.exists() and not overwrite:
        raise OutputPathError(output, "already exists (pass --overwrite to replace it)")
    _check_writable(output, output.parent)


def _check_output_folder(source: Path, output: Path, names: list[str], overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputPathError(output, "is a file; the images of a folder go to a folder")
    if output.exists() and os.path.samefile(output, source):
        raise OutputPathError(output, "is the input folder; choose another output folder")
    existing = [n for n in names if (output / n).exists()]
    if existing and not overwrite:
        raise OutputPathError(
            output,
            f"already holds {existing[0]} ({len(existing)} of the images; pass --overwrite to replace them)",
        )
    _check_writable(output, output if output.is_dir() else output.parent)


def _check_writable(output: Path, directory: Path) -> None:
    if not directory.is_dir():
        raise OutputPathError(output, f"cannot be written: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputPathError(output, f"cannot be written: directory {directory} does not accept new files")


def read_rgb(image: SourceImage) -> np.ndarray:
    """The (H, W, 3) uint8 RGB frame of an image, EXIF orientation applied, alpha left out."""
    with Image.open(image.path) as opened:
        upright = ImageOps.exif_transpose(opened)
        return np.asarray(upright.convert("RGB"), dtype=np.uint8)


def write_image(image: SourceImage, upscaled: np.ndarray, target: Path) -> None:
    """Write the upscaled RGB frame to ``target`` atomically, in the format of its suffix. An input
    with transparency keeps it: its alpha is resized (Lanczos) to the output size and attached."""
    result = Image.fromarray(upscaled, mode="RGB")
    fmt = IMAGE_FORMATS[target.suffix.lower()]
    if image.has_alpha and fmt in {"PNG", "WEBP", "TIFF"}:
        with Image.open(image.path) as opened:
            alpha = ImageOps.exif_transpose(opened).convert("RGBA").getchannel("A")
        result.putalpha(alpha.resize(result.size, Image.Resampling.LANCZOS))
    # JPEG at quality 95 without chroma subsampling; WebP lossless (its lossy mode always halves chroma).
    per_format: dict[str, dict[str, object]] = {
        "JPEG": {"quality": 95, "subsampling": 0},
        "WEBP": {"lossless": True},
    }
    options = per_format.get(fmt, {})
    with atomic_write(target) as handle:
        result.save(handle, format=fmt, **options)
