"""One API worker's classify pipeline and life cycle, independent of HTTP routing. The model lives in the engine.

upload (bounded in count, size and time) -> decode to mono PCM at the model's rate (a small WAV on the event loop,
anything else in a thread pool) -> the engine (the clip cut into the model's windows, queue for r, batch, features,
model, top-k, windows aggregated) -> JSON. A request takes a place in the engine's bounded queue only once its body
is in and decoded, so slow uploaders cannot fill the queue; uploads have their own bound per worker (--max-uploads)
and their own time limit (--body-timeout-s). Every classify request is counted exactly once in
fastast_requests_total and fastast_request_duration_seconds, whatever its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from fastast.audio import load_audio, wav_rate
from fastast.errors import AudioLimitError, InvalidAudioError, InvalidWindowError
from fastast.model.card import ModelCard, pareto_optimal
from fastast.serving import protocol
from fastast.serving.engine_client import ClientGoneError, EngineClient, EngineUnavailableError
from fastast.serving.errors import ServiceError
from fastast.serving.intake import read_upload
from fastast.serving.metrics import AUTO_R, INVALID_R, ServingMetrics
from fastast.serving.params import parse_bool, parse_decimal, parse_int, parse_timeout_ms
from fastast.serving.schemas import (
    AutoSettings,
    BackendInfo,
    ClassifyResponse,
    LabelScore,
    Limits,
    ModelInfo,
    ParetoPoint,
    RRange,
    TimelineEntry,
    Timing,
)
from fastast.serving.settings import ServeSettings
from fastast.windows import Windowing, resolve_aggregate

log = logging.getLogger("fastast.serving")

DEFAULT_TOP_K = 5
# A WAV this small at the model's rate decodes in ~0.1 ms or less (fastast.audio reads 16-bit PCM with numpy), about
# what the hop to the decode threads and back costs: it decodes on the event loop. Anything to resample (8 s of
# 8 kHz took 5 ms), compressed formats and longer audio decode on the threads, so the loop never stalls on them.
INLINE_DECODE_BYTES = 256 * 1024
TIMEOUT_HEADER = "x-request-timeout-ms"
RETRY_AFTER = {"Retry-After": "1"}


def draining() -> ServiceError:
    """The refusal while shutting down; Connection: close so clients reconnect to another replica."""
    return ServiceError(503, "draining", "the server is shutting down", {**RETRY_AFTER, "Connection": "close"})


@dataclass(frozen=True)
class ClipOptions:
    """What a request asks of its answer, besides r: validated before its upload is read."""

    top_k: int
    windowing: Windowing
    aggregate: str
    timeline: bool


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
    def __init__(self, settings: ServeSettings, card: ModelCard, engine: EngineClient, metrics: ServingMetrics):
        self.settings = settings
        self.card = card
        self.engine = engine
        self.metrics = metrics
        self.default_top_k = min(DEFAULT_TOP_K, card.num_classes)
        # Checks --window-hop-s against the model's window: a bad one is a startup error.
        self.windowing = Windowing.for_input(card.input.target_length, card.input.sample_rate, settings.window_hop_s)
        self.draining = False
        self.inflight = 0
        self.uploading = 0
        self._upload_limits: set[asyncio.Timeout] = set()
        self._decode_pool: ThreadPoolExecutor | None = None

    @property
    def info(self) -> protocol.EngineInfo:
        assert self.engine.info is not None, "Service.start() connects to the engine first"
        return self.engine.info

    # ---- life cycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the engine (which warms up on its own: /readyz answers 503 until it is done)."""
        await self.engine.connect()
        self._decode_pool = ThreadPoolExecutor(max_workers=self.settings.decode_threads, thread_name_prefix="fastast-decode")

    async def stop(self) -> None:
        """Answer every accepted request, then release the engine connection and the threads."""
        self.begin_drain()
        while self.inflight:
            await asyncio.sleep(0.01)
        await self.engine.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True)

    def begin_drain(self) -> None:
        """Refuse new work (503 draining, Connection: close); uploads still in progress get --drain-timeout-s more
        at most, then 503; requests already in the engine are answered."""
        if self.draining:
            return
        log.info("draining: %d request(s) in flight, %d still uploading", self.inflight, self.uploading)
        self.draining = True
        cutoff = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        for limit in self._upload_limits:
            if limit.when() is None or limit.when() > cutoff:
                limit.reschedule(cutoff)

    @property
    def idle(self) -> bool:
        return self.inflight == 0

    def readiness(self) -> ServiceError | None:
        """None when ready to take work, else the 503 to answer."""
        state = self.engine.state
        if not self.engine.alive:
            return ServiceError(503, "engine_unavailable", "the inference engine is not running", RETRY_AFTER)
        if state.warmup_error is not None:
            return ServiceError(503, "warmup_failed", state.warmup_error)
        if self.draining:
            return draining()
        if not state.ready:
            return ServiceError(503, "not_ready", "the model is warming up", RETRY_AFTER)
        return None

    def liveness(self) -> ServiceError | None:
        """None while this worker can still become ready; a failed warm-up or a dead engine cannot."""
        if not self.engine.alive:
            return ServiceError(503, "engine_unavailable", "the inference engine is not running")
        if self.engine.state.warmup_error is not None:
            return ServiceError(503, "warmup_failed", self.engine.state.warmup_error)
        return None

    # ---- classify ----------------------------------------------------------------------------------------------

    async def classify(self, request: Request) -> ClassifyResponse:
        started = time.monotonic()
        r_label, status = INVALID_R, 500
        try:
            r = self._parse_r(request)
            r_label = AUTO_R if r is None else str(r)
            options = self._parse_options(request)
            result = await self._run(request, r, options, started, self._deadline(request, started))
            r_label, status = str(result.r), 200
        except ServiceError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.record_request(r_label, outcome(status), time.monotonic() - started)
        labels = self.card.labels
        timeline = None
        if result.timeline is not None:
            timeline = [
                TimelineEntry(
                    start_s=entry["start_s"],
                    end_s=entry["end_s"],
                    labels=[LabelScore(label=x["label"], index=x["index"], score=x["score"]) for x in entry["labels"]],
                )
                for entry in result.timeline
            ]
        return ClassifyResponse(
            model=self.card.name,
            r=result.r,
            labels=[LabelScore(label=labels[i].display_name, index=i, score=s) for i, s in result.labels],
            windows=result.windows,
            timeline=timeline,
            batch_size=result.batch_size,
            timing_ms=Timing(
                queue=1000 * result.queue_s,
                inference=1000 * result.inference_s,
                total=1000 * (time.monotonic() - started),
            ),
        )

    def _parse_r(self, request: Request) -> int | None:
        """The requested r, or None for r=auto (the engine's controller picks it per batch)."""
        raw = request.query_params.get("r")
        if raw is None and self.settings.default_r == "auto" or raw == AUTO_R:
            if not self.info.auto_r:
                raise ServiceError(
                    422,
                    "invalid_parameter",
                    "r=auto is not available for this model: its card has no r table (fastast evaluate --write-card) "
                    "and the server was started without --auto-max-r",
                )
            return None
        r = parse_int(raw, "r")
        r = self.settings.default_r if r is None else r
        info = self.info
        if info.r_values is not None and r not in info.r_values:
            served = ", ".join(map(str, info.r_values))
            raise ServiceError(422, "invalid_parameter", f"r={r} has no exported ONNX graph; exported r values: {served}")
        if not 0 <= r <= info.max_r:
            raise ServiceError(422, "invalid_parameter", f"r must be between 0 and {info.max_r}, got {r}")
        return r

    def _parse_options(self, request: Request) -> ClipOptions:
        query = request.query_params
        num_classes = self.card.num_classes
        top_k = parse_int(query.get("top_k"), "top_k")
        top_k = self.default_top_k if top_k is None else top_k
        if not 1 <= top_k <= num_classes:
            raise ServiceError(422, "invalid_parameter", f"top_k must be between 1 and {num_classes}, got {top_k}")
        hop_s = parse_decimal(query.get("hop_s"), "hop_s")
        spec = self.card.input
        try:
            windowing = self.windowing if hop_s is None else Windowing.for_input(spec.target_length, spec.sample_rate, hop_s)
            aggregate = resolve_aggregate(self.card.task, query.get("aggregate"))
        except InvalidWindowError as exc:
            raise ServiceError(422, "invalid_parameter", str(exc)) from None
        return ClipOptions(top_k, windowing, aggregate, parse_bool(query.get("timeline"), "timeline"))

    def _deadline(self, request: Request, started: float) -> float:
        """--timeout-s after arrival, or sooner when X-Request-Timeout-Ms asks for less."""
        asked = parse_timeout_ms(request.headers.get(TIMEOUT_HEADER), self.settings.timeout_s)
        return started + (self.settings.timeout_s if asked is None else asked)

    async def _run(
        self, request: Request, r: int | None, options: ClipOptions, arrived: float, deadline: float
    ) -> protocol.Result:
        refusal = self.readiness()
        if refusal is not None:
            raise refusal
        self.inflight += 1
        try:
            pcm = await self._audio(request, deadline)
            self._check_windows(options.windowing, len(pcm))
            header = protocol.ClassifyHeader(
                0, r, options.top_k, arrived, deadline, options.windowing.hop, options.aggregate, options.timeline
            )
            disconnected = asyncio.ensure_future(_disconnected(request))
            try:
                result = await self.engine.classify(pcm, header, disconnected)
            finally:
                disconnected.cancel()
        except (ClientDisconnect, ClientGoneError):
            raise ServiceError(499, "client_closed_request", "the client disconnected") from None
        except EngineUnavailableError as exc:
            raise ServiceError(503, "engine_unavailable", str(exc), RETRY_AFTER) from None
        finally:
            self.inflight -= 1
        if result.status != 200:
            retry = RETRY_AFTER if result.status in (429, 503) else None
            raise ServiceError(result.status, result.code, result.detail, retry)
        return result

    def _check_windows(self, windowing: Windowing, samples: int) -> None:
        windows = windowing.count(samples)
        if windows > self.settings.window_limit:
            seconds = samples / windowing.sample_rate
            raise ServiceError(
                413,
                "too_many_windows",
                f"{seconds:.1f} s of audio at a hop of {windowing.hop / windowing.sample_rate:g} s makes {windows} windows; "
                f"the server takes at most {self.settings.window_limit} (--max-windows); raise hop_s or send less audio",
            )

    async def _audio(self, request: Request, deadline: float) -> np.ndarray:
        """The upload, within its limits, decoded to mono PCM at the model's rate."""
        if self.uploading >= self.settings.max_uploads:
            raise ServiceError(
                429, "too_many_uploads", f"{self.uploading} uploads are already in progress on this worker; retry later", RETRY_AFTER
            )
        self.uploading += 1
        loop = asyncio.get_running_loop()
        body_due = time.monotonic() + self.settings.body_timeout_s
        limit = asyncio.timeout_at(loop.time() + min(body_due, deadline) - time.monotonic())
        self._upload_limits.add(limit)
        try:
            async with limit:
                data = await read_upload(request, self.settings.max_upload_bytes)
        except TimeoutError:
            if self.draining:
                raise draining() from None
            if body_due <= deadline:
                raise ServiceError(408, "body_timeout", f"the upload did not complete within {self.settings.body_timeout_s:g} s") from None
            raise ServiceError(504, "timeout", "the request's deadline passed before it could run") from None
        finally:
            self.uploading -= 1
            self._upload_limits.discard(limit)
        try:
            if len(data) <= INLINE_DECODE_BYTES and wav_rate(data) == self.card.input.sample_rate:
                return self._decode(data)
            return await loop.run_in_executor(self._decode_pool, self._decode, data)
        except AudioLimitError as exc:
            raise ServiceError(413, exc.code, str(exc)) from None
        except InvalidAudioError as exc:
            raise ServiceError(400, "invalid_audio", str(exc)) from None

    def _decode(self, data: bytes) -> np.ndarray:
        started = time.perf_counter()
        wave = load_audio(data, self.card.input.sample_rate, **self.settings.audio_limits)
        self.metrics.record_stage("decode", time.perf_counter() - started)
        return np.ascontiguousarray(wave)

    # ---- description ----------------------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        card, settings, info = self.card, self.settings, self.info
        return ModelInfo(
            name=card.name,
            task=card.task,
            arch=card.arch,
            input=card.input,
            labels=card.labels,
            r_table=card.r_table,
            r=RRange(min=0, max=info.max_r, default=settings.default_r),
            auto=self._auto_settings(),
            pareto=self._pareto(),
            backend=BackendInfo(name=info.backend, device=info.device, dtype=info.dtype),
            limits=Limits(
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                timeout_s=settings.timeout_s,
                max_audio_s=settings.max_audio_s,
                window_s=self.windowing.window / self.windowing.sample_rate,
                window_hop_s=self.windowing.hop / self.windowing.sample_rate,
                max_windows=settings.window_limit,
                max_upload_mb=settings.max_upload_mb,
                max_channels=settings.max_channels,
                max_sample_rate=settings.max_sample_rate,
            ),
            weights_sha256=card.weights_sha256,
        )


    def _auto_settings(self) -> AutoSettings | None:
        auto_r, settings = self.info.auto_r, self.settings
        if not auto_r:
            return None
        return AutoSettings(slo_ms=settings.slo_ms, max_drop=settings.auto_max_drop, max_r=auto_r[-1], ladder=auto_r)

    def _pareto(self) -> list[ParetoPoint]:
        rows = self.card.own_rows()
        timed = [row for row in rows if row.samples_per_s is not None]
        optimal = dict(zip((row.r for row in timed), pareto_optimal([(row.value, row.samples_per_s) for row in timed])))
        live = self.engine.state.samples_per_s
        return [
            ParetoPoint(
                r=row.r,
                metric=row.metric,
                value=row.value,
                drop=row.drop,
                samples_per_s=row.samples_per_s,
                live_samples_per_s=live.get(str(row.r)),
                pareto_optimal=optimal.get(row.r, False),
                auto=row.r in self.info.auto_r,
            )
            for row in rows
        ]


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
