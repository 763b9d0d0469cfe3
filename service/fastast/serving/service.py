"""The classify pipeline and the service's life cycle, independent of HTTP routing.

upload (size-limited) -> decode + features in a thread pool -> the batcher's queue for r -> scores -> top-k.
Every classify request is counted exactly once in fastast_requests_total and fastast_request_duration_seconds,
whatever its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from starlette.requests import ClientDisconnect
import torch
from torch import Tensor

from fastast.audio import load_audio
from fastast.errors import AudioLimitError, FastASTError, InvalidAudioError, InvalidRError
from fastast.serving.backend import Backend
from fastast.serving.batcher import (
    BatchFailedError,
    BatchResult,
    Batcher,
    ClientGoneError,
    DeadlineExceededError,
    QueueFullError,
)
from fastast.serving.errors import ServiceError
from fastast.serving.intake import read_upload
from fastast.serving.metrics import INVALID_R, ServingMetrics
from fastast.serving.params import parse_int, parse_timeout_ms
from fastast.serving.schemas import (
    BackendInfo,
    ClassifyResponse,
    LabelScore,
    Limits,
    ModelInfo,
    RRange,
    Timing,
)
from fastast.serving.settings import ServeSettings

log = logging.getLogger("fastast.serving")

DEFAULT_TOP_K = 5
TIMEOUT_HEADER = "x-request-timeout-ms"
RETRY_AFTER = {"Retry-After": "1"}


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, which is included even when it is no power of two."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return [*sizes, max_batch_size]


def outcome(status: int) -> str:
    """The `status` label of fastast_requests_total for an HTTP status."""
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "rejected"
    if status == 504:
        return "timeout"
    if status == 499:
        return "cancelled"
    return "error" if status >= 500 else "bad_request"


class Service:
    def __init__(self, settings: ServeSettings, backend: Backend):
        self.settings = settings
        self.backend = backend
        self.max_r = backend.max_r if settings.max_r is None else settings.max_r
        if self.max_r > backend.max_r:
            raise FastASTError(f"--max-r {self.max_r} exceeds the model's limit of {backend.max_r} (half its patch tokens)")
        if settings.default_r > self.max_r:
            raise FastASTError(f"--default-r {settings.default_r} exceeds --max-r {self.max_r}")
        backend.check_r(settings.default_r)
        card = backend.card
        self.default_top_k = min(DEFAULT_TOP_K, card.num_classes)
        self.metrics = ServingMetrics(settings.max_batch_size)
        self.metrics.set_model(
            model=card.name, arch=arch_label(card.arch), device=backend.device, dtype=backend.dtype, backend=backend.name
        )
        self.ready = False
        self.draining = False
        self.warmup_error: str | None = None
        self.inflight = 0
        self.batcher: Batcher | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._warmup: asyncio.Task | None = None

    # ---- life cycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher and warm the model up in the background (/readyz answers 503 until it is done)."""
        settings = self.settings
        threads = settings.decode_threads or min(8, usable_cpus())
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastast-decode")
        self.batcher = Batcher(
            self.backend,
            self.metrics,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
        )
        self.batcher.start()
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up(), name="fastast-warmup")

    async def stop(self) -> None:
        """Finish every accepted request, then release the threads."""
        self.draining = True
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        while self.inflight:
            await asyncio.sleep(0.01)
        if self.batcher is not None:
            await self.batcher.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True)

    def begin_drain(self) -> None:
        """Stop admitting work (/readyz and new classify requests answer 503); accepted requests still finish."""
        if not self.draining:
            log.info("draining: %d request(s) in flight", self.inflight)
        self.draining = True

    @property
    def idle(self) -> bool:
        return self.inflight == 0

    async def _warm_up(self) -> None:
        assert self.batcher is not None
        time_steps, mel = self.backend.input_shape
        started = time.monotonic()
        try:
            for size in warmup_batch_sizes(self.settings.max_batch_size):
                features = torch.zeros(size, time_steps, mel)
                await self.batcher.call(lambda f=features: self.backend.run(f, self.settings.default_r))
        except Exception as exc:
            log.exception("warm-up failed")
            self.warmup_error = f"warm-up failed: {type(exc).__name__}: {exc}"
            return
        self.ready = True
        log.info(
            "ready: %s on %s (%s), warmed up for batch sizes up to %d in %.1f s",
            self.backend.card.name,
            self.backend.device,
            self.backend.dtype,
            self.settings.max_batch_size,
            time.monotonic() - started,
        )

    def readiness(self) -> ServiceError | None:
        """None when ready to take work, else the 503 to answer."""
        if self.warmup_error is not None:
            return ServiceError(503, "warmup_failed", self.warmup_error)
        if self.draining:
            return ServiceError(503, "draining", "the server is shutting down", {**RETRY_AFTER, "Connection": "close"})
        if not self.ready:
            return ServiceError(503, "not_ready", "the model is warming up", RETRY_AFTER)
        return None

    # ---- classify ----------------------------------------------------------------------------------------------

    async def classify(self, request: Request) -> ClassifyResponse:
        started = time.monotonic()
        r_label, status = INVALID_R, 500
        try:
            r = self._parse_r(request)
            r_label = str(r)
            top_k = self._parse_top_k(request)
            result = await self._run(request, r, self._deadline(request, started))
            status = 200
        except ServiceError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.record_request(r_label, outcome(status), time.monotonic() - started)
        top = result.scores.topk(top_k)
        labels = self.backend.card.labels
        return ClassifyResponse(
            model=self.backend.card.name,
            r=r,
            labels=[
                LabelScore(label=labels[i].display_name, index=i, score=s)
                for s, i in zip(top.values.tolist(), top.indices.tolist())
            ],
            batch_size=result.batch_size,
            timing_ms=Timing(
                queue=1000 * result.queue_s,
                inference=1000 * result.inference_s,
                total=1000 * (time.monotonic() - started),
            ),
        )

    def _parse_r(self, request: Request) -> int:
        r = parse_int(request.query_params.get("r"), "r")
        r = self.settings.default_r if r is None else r
        try:
            self.backend.check_r(r)
        except InvalidRError as exc:
            raise ServiceError(422, "invalid_parameter", str(exc)) from None
        if not 0 <= r <= self.max_r:
            raise ServiceError(422, "invalid_parameter", f"r must be between 0 and {self.max_r}, got {r}")
        return r

    def _parse_top_k(self, request: Request) -> int:
        num_classes = self.backend.card.num_classes
        top_k = parse_int(request.query_params.get("top_k"), "top_k")
        top_k = self.default_top_k if top_k is None else top_k
        if not 1 <= top_k <= num_classes:
            raise ServiceError(422, "invalid_parameter", f"top_k must be between 1 and {num_classes}, got {top_k}")
        return top_k

    def _deadline(self, request: Request, started: float) -> float:
        """--timeout-s after arrival, or sooner when X-Request-Timeout-Ms asks for less."""
        asked = parse_timeout_ms(request.headers.get(TIMEOUT_HEADER), self.settings.timeout_s)
        return started + (self.settings.timeout_s if asked is None else asked)

    async def _run(self, request: Request, r: int, deadline: float) -> BatchResult:
        refusal = self.readiness()
        if refusal is not None:
            raise refusal
        assert self.batcher is not None
        try:
            ticket = self.batcher.admit()
        except QueueFullError as exc:
            raise ServiceError(429, "queue_full", f"server overloaded: {exc}; retry later", RETRY_AFTER) from None
        self.inflight += 1
        try:
            features = await asyncio.wait_for(self._features(request), timeout=max(0.0, deadline - time.monotonic()))
            job = self.batcher.submit(ticket, features, r, deadline)
            disconnected = asyncio.ensure_future(_disconnected(request))
            try:
                return await self.batcher.wait(job, disconnected)
            finally:
                disconnected.cancel()
        except (asyncio.TimeoutError, DeadlineExceededError):
            raise ServiceError(504, "timeout", "the request's deadline passed before it could run") from None
        except (ClientDisconnect, ClientGoneError):
            raise ServiceError(499, "client_closed_request", "the client disconnected") from None
        except BatchFailedError as exc:
            raise ServiceError(500, "inference_failed", str(exc)) from None
        finally:
            ticket.release()
            self.inflight -= 1

    async def _features(self, request: Request) -> Tensor:
        data = await read_upload(request, self.settings.max_upload_bytes)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._decode_pool, self._decode, data)
        except AudioLimitError as exc:
            raise ServiceError(413, exc.code, str(exc)) from None
        except InvalidAudioError as exc:
            raise ServiceError(400, "invalid_audio", str(exc)) from None

    def _decode(self, data: bytes) -> Tensor:
        wave = load_audio(data, self.backend.card.input.sample_rate, **self.settings.audio_limits)
        return self.backend.featurize(wave)

    # ---- description ----------------------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        card, settings = self.backend.card, self.settings
        return ModelInfo(
            name=card.name,
            task=card.task,
            arch=card.arch,
            input=card.input,
            labels=card.labels,
            r_table=card.r_table,
            r=RRange(min=0, max=self.max_r, default=settings.default_r),
            backend=BackendInfo(name=self.backend.name, device=self.backend.device, dtype=self.backend.dtype),
            limits=Limits(
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                timeout_s=settings.timeout_s,
                max_audio_s=settings.max_audio_s,
                max_upload_mb=settings.max_upload_mb,
                max_channels=settings.max_channels,
                max_sample_rate=settings.max_sample_rate,
            ),
            weights_sha256=card.weights_sha256,
        )


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def arch_label(arch: dict) -> str:
    """A short architecture name for the model_info metric, e.g. 'ast-768x12'."""
    kind = str(arch.get("type", "unknown"))
    return f"{kind}-{arch['dim']}x{arch['depth']}" if "dim" in arch and "depth" in arch else kind


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
