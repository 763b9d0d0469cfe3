"""Prometheus metrics of the service. Their names and labels are a public interface: dashboards and alert rules use them.

The service runs as several processes (API workers and the engine) and /metrics, answered by any worker, covers
them all: the supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh folder before it starts them, each process
records into its own files there (prometheus_client's multiprocess mode), and the exposition sums them. Without
that variable (one process, as in the in-process tests) each app has its own CollectorRegistry, so several apps
in one process do not collide. Workers record the request series and the decode stage; the engine records
batches, queues, the fbank and model stages and its busy ratio.

Label values are bounded: `r` is an integer within the served range (the r a batch actually ran at, also for
r=auto requests), "auto" (the r=auto queue, and auto requests that never ran) or "invalid"; `status` is one of
STATUSES, `stage` one of STAGES; no user-supplied string ever becomes a label.

Derived quantities: samples/s per r = rate(fastast_samples_total), mean batch size per r =
rate(fastast_batch_size_sum) / rate(fastast_batch_size_count), latency percentiles via histogram_quantile.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# The *_created series double the exposition and no dashboard uses them (a process-wide switch of prometheus_client).
disable_created_metrics()

# ok: answered with scores; bad_request: the client's input was refused (4xx); rejected: shed by a full queue,
# warm-up or shutdown (429/503); timeout: deadline passed while queued (504); error: the batch failed (500);
# cancelled: the client went away while its request was queued (never computed).
STATUSES = ("ok", "bad_request", "rejected", "timeout", "error", "cancelled")
INVALID_R = "invalid"
AUTO_R = "auto"
# decode: upload bytes -> mono PCM at the model's rate (API workers); fbank: PCM -> normalized features and
# model: features -> scores, both per batch in the engine.
STAGES = ("decode", "fbank", "model")
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

BUSY_WINDOW_S = 10.0
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)
STAGE_BUCKETS = (0.0001, 0.0002, 0.0005, *LATENCY_BUCKETS)  # decoding a short clip takes well under 1 ms
# r values r=auto may choose: every small r, then coarser (the mean r is exact anyway: _sum / _count).
AUTO_R_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch (and the largest batch itself)."""
    buckets = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    return tuple(sorted(buckets | {max_batch_size}))


def multiprocess() -> bool:
    """Whether this process records into the shared multiprocess folder (set before prometheus_client loads)."""
    return bool(os.environ.get(MULTIPROC_DIR))


class ServingMetrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry(auto_describe=True)
        if not multiprocess():  # process metrics cannot be summed across processes
            ProcessCollector(registry=self.registry)
        registry = self.registry
        self.requests = Counter(
            "fastast_requests", "Classify requests by r and outcome", ["r", "status"], registry=registry
        )
        self.samples = Counter("fastast_samples", "Audio clips inferred, by r", ["r"], registry=registry)
        self.request_duration = Histogram(
            "fastast_request_duration_seconds",
            "End-to-end classify latency (upload read to response)",
            ["r"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "fastast_queue_wait_seconds",
            "Time a request waited in its r queue before its batch started",
            ["r"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "fastast_inference_duration_seconds",
            "Model time per batch",
            ["r"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fastast_batch_size",
            "Requests per batch",
            ["r"],
            buckets=batch_size_buckets(max_batch_size),
            registry=registry,
        )
        self.stage_duration = Histogram(
            "fastast_stage_duration_seconds",
            "Time per pipeline stage: decode per request (workers); fbank and model per batch (engine)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.auto_r = Histogram(
            "fastast_auto_r",
            "The r the r=auto controller chose, one observation per window of an auto request",
            buckets=AUTO_R_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "fastast_queue_depth", "Requests waiting in the queue of each r", ["r"], registry=registry, multiprocess_mode="livesum"
        )
        self.engine_busy = Gauge(
            "fastast_engine_busy_ratio",
            f"Share of the last {BUSY_WINDOW_S:g} s the engine spent computing batches",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            "fastast_model_info",
            "The served model (value 1)",
            ["model", "arch", "device", "dtype", "backend"],
            registry=registry,
            multiprocess_mode="livemax",
        )

    def set_model(self, *, model: str, arch: str, device: str, dtype: str, backend: str) -> None:
        self.model_info.labels(model=model, arch=arch, device=device, dtype=dtype, backend=backend).set(1)

    def record_request(self, r: str, status: str, seconds: float) -> None:
        self.requests.labels(r=r, status=status).inc()
        self.request_duration.labels(r=r).observe(seconds)

    def record_batch(self, r: int, size: int, seconds: float) -> None:
        label = str(r)
        self.samples.labels(r=label).inc(size)
        self.batch_size.labels(r=label).observe(size)
        self.inference_duration.labels(r=label).observe(seconds)

    def record_auto_r(self, r: int, windows: int) -> None:
        for _ in range(windows):
            self.auto_r.observe(r)

    def record_stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage=stage).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type: every process of the service in multiprocess mode."""
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
