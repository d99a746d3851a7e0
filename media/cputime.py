"""Where the coordinator's CPU goes: seconds of CPU per stage, for ``--stats`` and the benchmarks.

Threads add the thread time they spend on a stage (:meth:`CpuMeter.measure`), and each ffmpeg
adds its own CPU when it ends (:meth:`media.ffmpeg.FFmpegProcess.finish`, read from the
ended process before it is reaped). One meter per process (:data:`METER`): a job reports what it
grew by while it ran (:meth:`CpuMeter.snapshot`, :func:`grown`); jobs that run at once in one
process (the job service) share it.

Stages: ``decode`` (the ffmpeg decoding the input), ``extract_read`` (taking its frames from the
pipe), ``extract_write`` (writing input frame files), ``encode_read`` (reading upscaled frame files),
``encode_feed`` (handing them to the encoder), ``encode`` (the ffmpeg encoders), ``join`` (ffmpeg
joining the segments and copying the audio).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Iterator, Mapping


class CpuMeter:
    """Thread-safe totals of CPU seconds per stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Add the calling thread's CPU time inside the block to ``stage``."""
        started = time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.thread_time() - started)

    def snapshot(self) -> dict[str, float]:
        """The totals so far, with ``process`` (this process's own CPU, every thread) and
        ``children`` (the CPU of child processes reaped so far)."""
        with self._lock:
            totals = dict(self._seconds)
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        totals["process"] = own.ru_utime + own.ru_stime
        totals["children"] = children.ru_utime + children.ru_stime
        return totals


METER = CpuMeter()


def grown(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """What each total grew by between two snapshots (stages new in ``after`` count from 0)."""
    return {stage: round(after[stage] - before.get(stage, 0.0), 3) for stage in sorted(after)}


def ended_process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of the ended, not yet reaped process ``pid`` (Linux ``/proc``);
    None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "; field 3 is fields[0]
    try:
        ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    except (IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")
