"""In-process workers for testing the coordinator's job logic without worker processes or torch.

:class:`FakeWorker` is a :class:`coordinator.fleet.WorkerClient`: the fleet calls its ``health``,
``process_manifest`` and ``reset`` as it would call a worker over HTTP, and it does on the shared
root what a worker does: reads the manifest, reads each batch's input frames, "upscales" them
(nearest neighbour, so the expected output of any input is easy to compute), writes the output
frames and replaces the status file after every batch, all with the protocol's own modules. Given a
segment manifest (``--transport segments``), it decodes the range from the job's source, writes
its upscaled frames to a scratch folder of its own and encodes them into the segment file with the
frames design's encoder. It can be told to misbehave the ways real workers do: fail some batches,
die, freeze, answer busy.

It is a fake at a boundary the project owns (the fleet's client protocol), as httpx's
``MockTransport`` is; it is never used for a test that claims to check the worker itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.client import WorkerBusyError, WorkerRequestError
from manifests import BatchError, Status, WorkerIdentity, WorkerState, read_manifest, write_json_atomic
from manifests.colour import YuvSpec
from manifests.frames import read_frame, write_frame
from manifests.health import Health
from manifests.layout import FrameFormat, frame_filename
from manifests.manifest import Manifest
from media.encode import EncodeSettings, settings_for_depth
from media.extract import decode_frames
from media.probe import probe
from media.segments import encode_segment
from worker.benchmarking import SimulatedUpscaler


def nearest(frame: np.ndarray, scale: int, yuv: YuvSpec | None = None) -> np.ndarray:
    """What a fake worker makes of a frame: an RGB frame's pixels, or a YUV frame's planes, repeated."""
    if yuv is not None:
        return SimulatedUpscaler("fake", 0.0).upscale_yuv(frame[None], scale, yuv)[0]
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)


@dataclass
class FakeWorker:
    url: str
    shared_root: Path
    model: str = "fake"
    scale: int = 2
    backend: str = "torch"  # what its /health names (coordinator.fleet deals a job to one backend)
    batch_delay_s: float = 0.0
    fail_batches: set[int] = field(default_factory=set)  # these batches fail on this worker
    die_after_batches: int | None = None  # then it stops answering and stops working
    freeze_after_batches: int | None = None  # then it answers /health but its status stands still
    busy_answers: int = 0  # the next N manifests are answered 409
    status_format: str | None = None  # write status files in this format instead
    transports: tuple[str, ...] = ("frames", "segments")  # what its /health names
    posts: int = 0
    resets: int = 0
    manifests: list[str] = field(default_factory=list)  # accepted manifest paths
    batches_done: int = 0
    frames_upscaled: list[int] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: bool = False
    _current: Manifest | None = None
    dead: bool = False

    # -- the client protocol ----------------------------------------------------------------------

    async def health(self) -> Health:
        if self.dead:
            raise WorkerRequestError(self.url, "health check", None, "ConnectionRefusedError")
        busy = self.busy
        current = self._current if busy else None
        return Health(
            state="processing" if busy else "idle", model=self.model, scale=float(self.scale),
            worker_id=self.url.removeprefix("fake://"), job_id=current.job_id if current else None,
            manifest_id=current.manifest_id if current else None, backend=self.backend,
            transports=tuple(self.transports),
        )  # fmt: skip

    async def process_manifest(self, manifest_path: str) -> None:
        if self.dead:
            raise WorkerRequestError(self.url, "process_manifest", None, "ConnectionRefusedError")
        self.posts += 1
        if self.busy or self.busy_answers > 0:
            self.busy_answers = max(0, self.busy_answers - 1)
            raise WorkerBusyError(self.url, "process_manifest", 409, "already processing a manifest")
        manifest = await asyncio.to_thread(read_manifest, self.shared_root / manifest_path)
        self.manifests.append(manifest_path)
        self._current, self._stop = manifest, False
        self._task = asyncio.create_task(self._process(manifest))

    async def reset(self) -> None:
        if self.dead:
            raise WorkerRequestError(self.url, "reset", None, "ConnectionRefusedError")
        self.resets += 1
        self._stop = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def kill(self) -> None:
        """Dies at once, as a SIGKILLed worker: no final status, no answers."""
        self.dead = True
        if self._task is not None:
            self._task.cancel()

    # -- what a worker does -----------------------------------------------------------------------

    async def _process(self, manifest: Manifest) -> None:
        job_dir = self.shared_root / "jobs" / manifest.job_id
        status_path = job_dir / manifest.status_file
        identity = WorkerIdentity(self.url.removeprefix("fake://"), "test", os.getpid())
        status = Status(
            state=WorkerState.PROCESSING, worker=identity, updated_at=time.time(), job_id=manifest.job_id,
            manifest_id=manifest.manifest_id, batches_total=len(manifest.batches),
            frames_total=manifest.frame_count, started_at=time.time(),
        )  # fmt: skip
        await self._publish(status_path, status)
        done: list[int] = []
        errors: list[BatchError] = []
        frames = 0
        for batch in manifest.batches:
            if self._stop or self.dead:
                break
            if self.die_after_batches is not None and self.batches_done >= self.die_after_batches:
                self.kill()
                return
            if self.freeze_after_batches is not None and self.batches_done >= self.freeze_after_batches:
                while not self._stop:  # hangs, its status standing still, until reset
                    await asyncio.sleep(0.01)
                break
            await asyncio.sleep(self.batch_delay_s)
            if batch.id in self.fail_batches:
                errors.append(BatchError(batch.id, batch.frames[0], "this worker cannot do that batch"))
            else:
                await asyncio.to_thread(self._upscale, manifest, job_dir, batch.frames)
                done.append(batch.id)
                self.frames_upscaled.extend(batch.frames)
                frames += len(batch)
                self.batches_done += 1
            status = status.evolve(
                done_batches=tuple(done), frames_done=frames, errors=tuple(errors), updated_at=time.time()
            )
            await self._publish(status_path, status)
        handled = len(done) + len(errors) == len(manifest.batches)
        if manifest.segment is not None and handled and not errors:
            await asyncio.to_thread(self._encode_segment, manifest, job_dir)
        state = (
            WorkerState.CANCELLED if not handled else WorkerState.FAILED if errors else WorkerState.COMPLETED
        )
        await self._publish(status_path, status.evolve(state=state, finished_at=time.time()))

    def _upscale(self, manifest: Manifest, job_dir: Path, frames: tuple[int, ...]) -> None:
        if manifest.segment is not None:
            self._upscale_range(manifest, job_dir, frames)
            return
        for index in frames:
            name = frame_filename(index, manifest.frame_format)
            frame = read_frame(job_dir / manifest.input_dir / name, manifest.frame_format)
            output = job_dir / manifest.output_dir / name
            upscaled = nearest(frame, self.scale, manifest.yuv)
            write_frame(output, upscaled, manifest.frame_format, png_compression=1)

    def _scratch(self, manifest: Manifest, job_dir: Path) -> Path:
        return job_dir / f"fake-{manifest.manifest_id}"

    def _upscale_range(self, manifest: Manifest, job_dir: Path, frames: tuple[int, ...]) -> None:
        """A segment manifest's batch: its frames decoded from the source, upscaled into scratch files."""
        assert manifest.segment is not None
        scratch = self._scratch(manifest, job_dir)
        scratch.mkdir(exist_ok=True)
        decoded = list(decode_frames(job_dir / manifest.segment.source))
        for index in frames:
            upscaled = nearest(decoded[index - 1], self.scale)
            write_frame(
                scratch / frame_filename(index, FrameFormat.NPY), upscaled, FrameFormat.NPY, png_compression=1
            )

    def _encode_segment(self, manifest: Manifest, job_dir: Path) -> None:
        work = manifest.segment
        assert work is not None
        scratch = self._scratch(manifest, job_dir)
        encode = work.encode
        settings = EncodeSettings(encode.codec, encode.crf, encode.preset, encode.pix_fmt, encode.extra_args)
        info = probe(job_dir / work.source)
        encode_segment(
            info, scratch, work.first_frame, work.count, job_dir / work.file,
            settings=settings_for_depth(settings, info.video.bit_depth), frame_format=FrameFormat.NPY,
        )  # fmt: skip
        shutil.rmtree(scratch)

    async def _publish(self, path: Path, status: Status) -> None:
        data = status.to_json()
        if self.status_format is not None:
            data = data.replace(b'"esrfarm.status/1"', f'"{self.status_format}"'.encode())
        await asyncio.to_thread(write_json_atomic, path, data)


def fake_farm(shared_root: Path, count: int = 2, **options: Any) -> list[FakeWorker]:
    return [FakeWorker(f"fake://w{i}", shared_root, **options) for i in range(count)]
