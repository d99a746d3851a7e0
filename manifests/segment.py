"""The segment transport (``--transport segments``): one worker's share is a contiguous range of
source frames that it decodes from the source video on the shared root, upscales, and encodes
into one segment file. Only compressed video crosses the shared storage.

A segment job's manifest is a frames manifest (:mod:`manifests.manifest`) with a ``segment``
record; its ``batches`` are contiguous and cover exactly the range, in order, so the status file
reports progress per batch as for frames (``done_batches``). Example of the record::

    "segment": {
      "source": "input/source.mkv",       # the source video, relative to the job directory
      "first_frame": 241, "count": 240,   # frames 241..480 (1-based, display order)
      "file": "segments/r00002.mp4",      # written under a temporary name, renamed when complete
      "encode": {"codec": "libx265", "crf": 20, "preset": "medium", "pix_fmt": null,
                 "params": [["-x265-params", "aq-mode=3"]], "threads": null}
    }

``encode`` is the job's encoder settings (what :class:`media.encode.EncodeSettings` takes), so
every segment of a job is encoded alike and the segments join without re-encoding. A manifest
can ask a worker to run an encoder, so it may not pass ffmpeg arguments verbatim: ``params`` holds
only an encoder's own parameter string (``-x264-params``, ``-x265-params``, ``-svtav1-params``),
whose value may not start with ``-``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from manifests.layout import FRAME_DIGITS

#: The ways a job's frames travel between the coordinator and the workers.
FRAMES_TRANSPORT = "frames"
SEGMENTS_TRANSPORT = "segments"
TRANSPORTS = (FRAMES_TRANSPORT, SEGMENTS_TRANSPORT)

#: Encoder parameter options a segment manifest may carry (each takes one ``key=value:...`` string).
ENCODER_PARAM_OPTIONS = ("-x264-params", "-x265-params", "-svtav1-params")
MAX_SEGMENT_FRAMES = 1 << 20
_MAX_FRAME_INDEX = 10**FRAME_DIGITS - 1  # as for frame files (manifests.manifest.MAX_FRAME_INDEX)
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:+-]+$")]
_Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
_Param = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^[^-\x00][^\x00]*$")]


class SegmentEncode(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The job's encoder settings for every segment (checked again by ``EncodeSettings``)."""

    codec: _Name
    crf: Annotated[int, msgspec.Meta(ge=0, le=63)] | None = None
    preset: _Name | None = None
    pix_fmt: _Name | None = None
    params: tuple[tuple[str, _Param], ...] = ()
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] | None = None

    def __post_init__(self) -> None:
        for option, _value in self.params:
            if option not in ENCODER_PARAM_OPTIONS:
                raise ValueError(
                    f"params: {option!r} is not one of {', '.join(ENCODER_PARAM_OPTIONS)} "
                    "(a segment manifest passes no other ffmpeg option)"
                )

    @property
    def extra_args(self) -> tuple[str, ...]:
        """``params`` as ffmpeg arguments (``EncodeSettings.extra_args``)."""
        return tuple(arg for pair in self.params for arg in pair)


class SegmentWork(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One contiguous range of source frames, to decode, upscale and encode into ``file``."""

    source: _Path
    first_frame: Annotated[int, msgspec.Meta(ge=1, le=_MAX_FRAME_INDEX)]
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEGMENT_FRAMES)]
    file: _Path
    encode: SegmentEncode

    @property
    def last_frame(self) -> int:
        return self.first_frame + self.count - 1

    @property
    def frames(self) -> range:
        return range(self.first_frame, self.first_frame + self.count)
