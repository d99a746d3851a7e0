"""Prometheus metrics of one worker, in a registry of its own (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("esrfarm_worker_frames", "Frames upscaled and written", registry=r)
        self.batches = Counter("esrfarm_worker_batches", "Batches done (all frames written)", registry=r)
        self.batch_failures = Counter(
            "esrfarm_worker_batch_failures", "Batches that failed", ["stage"], registry=r
        )
        self.manifests = Counter("esrfarm_worker_manifests", "Manifests finished", ["state"], registry=r)
        self.batch_seconds = Histogram(
            "esrfarm_worker_batch_seconds",
            "Time per batch (or part of a large batch) and stage (read, compute, write: run overlapped)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cpu_seconds = Counter(
            "esrfarm_worker_cpu_seconds",
            "CPU seconds (thread time of the threads doing it) per stage: read, compute, write",
            ["stage"],
            registry=r,
        )
        self.busy = Gauge("esrfarm_worker_busy", "1 while a manifest is being processed", registry=r)
        self.ready = Gauge("esrfarm_worker_model_ready", "1 once the model is loaded and warm", registry=r)
        self.gpu_memory_used = Gauge("esrfarm_worker_gpu_memory_used_bytes", "GPU memory in use", registry=r)
        self.gpu_memory_total = Gauge(
            "esrfarm_worker_gpu_memory_total_bytes", "GPU memory in all", registry=r
        )
        for stage in ("read", "compute", "write"):
            self.batch_failures.labels(stage=stage)
            self.batch_seconds.labels(stage=stage)
            self.cpu_seconds.labels(stage=stage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
