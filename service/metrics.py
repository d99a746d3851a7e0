"""The service's Prometheus metrics (``GET /metrics``): queue length, jobs by state, job duration,
frames upscaled. Each app has a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, float("inf"))


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_length = Gauge("esrfarm_service_queue_length", "Jobs waiting to run", registry=r)
        self.jobs = Gauge("esrfarm_service_jobs", "Jobs in the store by state", ["state"], registry=r)
        self.job_duration = Histogram(
            "esrfarm_service_job_duration_seconds",
            "Time from a job's start to its output, for jobs that finished",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.frames = Counter("esrfarm_service_frames_upscaled", "Frames of finished jobs", registry=r)
        self.jobs_ended = Counter(
            "esrfarm_service_jobs_ended", "Jobs that ended, by state", ["state"], registry=r
        )

    def set_counts(self, counts: dict[str, int]) -> None:
        for state, count in counts.items():
            self.jobs.labels(state).set(count)
        self.queue_length.set(counts.get("queued", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
