"""The FastAPI app of an API worker: thin routes over fastast.serving.service.Service.

In `fastast serve` every worker process runs this app against the engine process the supervisor started
(`create_app(settings, engine=EngineEndpoint(...))`). Given a backend instead, or neither, the app runs its own
engine on a thread of this process, over the same sockets and messages: the in-process tests and tools use that.
Either way the lifespan connects to the engine, and on shutdown answers every accepted request first.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

import fastast
from fastast.model.card import ModelCard
from fastast.serving.errors import ErrorResponse, error_response, install_error_handlers
from fastast.serving.intake import FILE_FIELD
from fastast.serving.schemas import ClassifyResponse, ModelsResponse, Status
from fastast.serving.engine_client import EngineClient
from fastast.serving.lane import ClassifyLane
from fastast.serving.metrics import ServingMetrics
from fastast.serving.service import DEFAULT_TOP_K, Service
from fastast.serving.settings import ServeSettings

router = APIRouter()


def _error(description: str, retry_after: bool = False) -> dict:
    doc: dict = {"model": ErrorResponse, "description": description}
    if retry_after:
        doc["headers"] = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    return doc


_BINARY = {"schema": {"type": "string", "format": "binary"}}

CLASSIFY_OPENAPI = {
    "parameters": [
        {
            "name": "r",
            "in": "query",
            "required": False,
            "schema": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "enum": ["auto"]}]},
            "description": "ToMe tokens merged in every block: higher is faster and less accurate; or auto, to let "
            "the server choose per batch to hold --slo-ms. Allowed range and default: GET /models.",
        },
        {
            "name": "hop_s",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "audio longer than the model's window is cut into windows this many seconds apart "
            "(default: the server's --window-hop-s, half a window; at most one window: GET /models limits)",
        },
        {
            "name": "aggregate",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["mean", "max"]},
            "description": "how the windows' scores make the clip's: multi-label models mean or max (default max), "
            "single-label models always the mean of the probabilities",
        },
        {
            "name": "timeline",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": "also answer each window's start, end and top_k labels",
        },
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K},
            "description": "how many labels to return (at most the number of classes)",
        },
        {
            "name": "X-Request-Timeout-Ms",
            "in": "header",
            "required": False,
            "schema": {"type": "number", "minimum": 1},
            "description": "a deadline in ms, from 1 up to the server's --timeout-s (GET /models: limits.timeout_s); "
            "a request still queued then gets 504",
        },
    ],
    "requestBody": {
        "required": True,
        "description": "Audio in any format libsndfile reads (WAV, FLAC, OGG, MP3), any sample rate and channel count.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                    "required": [FILE_FIELD],
                }
            },
            "audio/*": _BINARY,
            "application/octet-stream": _BINARY,
        },
    },
}


def service_of(request: Request) -> Service:
    return request.app.state.service


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    summary="Classify one audio clip at a chosen r",
    openapi_extra=CLASSIFY_OPENAPI,
    responses={
        400: _error("not audio, corrupt or truncated audio, NaN/Inf samples, an empty body, malformed multipart"),
        413: _error(
            "upload larger than --max-upload-mb (payload_too_large), audio longer than --max-audio-s (audio_too_long), "
            "more channels than --max-channels or a sample rate above --max-sample-rate (audio_too_large), "
            "more windows than --max-windows (too_many_windows)"
        ),
        415: _error("a Content-Type other than multipart/form-data, audio/* or application/octet-stream"),
        422: _error(
            "r, top_k, hop_s, aggregate, timeline or X-Request-Timeout-Ms malformed or out of range; r=auto on a "
            "server that cannot choose r"
        ),
        408: _error("the upload did not complete within --body-timeout-s (body_timeout)"),
        429: _error(
            "the queue is full (queue_full, --max-queue) or this worker has --max-uploads uploads in progress "
            "(too_many_uploads); retry after the given seconds",
            retry_after=True,
        ),
        500: _error("the batch this request ran in failed (inference_failed)"),
        503: _error(
            "warming up (not_ready), shutting down (draining, also for an upload cut off by the drain), or the "
            "inference engine stopped (engine_unavailable)",
            retry_after=True,
        ),
        504: _error("the deadline passed while the request (or windows of it) was queued; they were not computed"),
    },
)
async def classify(request: Request) -> ClassifyResponse:
    """Scores per label for one clip; requests at the same r are batched together.

    Send the audio as multipart field `file`, or as the raw body with Content-Type audio/* or
    application/octet-stream.
    """
    return await service_of(request).classify(request)


@router.get("/models", response_model=ModelsResponse, summary="The served model, its labels and the allowed r")
async def models(request: Request) -> ModelsResponse:
    return ModelsResponse(models=[service_of(request).model_info()])


@router.get("/healthz", response_model=Status, summary="Liveness", responses={503: _error("warm-up failed or the engine stopped")})
async def healthz(request: Request) -> Response | Status:
    failure = service_of(request).liveness()
    if failure is not None:
        return error_response(failure.status, failure.code, failure.detail)
    return Status(status="alive")


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: the model is loaded and warmed up, and the server is not draining",
    responses={503: _error("warming up, warm-up failed, draining, or the engine stopped", retry_after=True)},
)
async def readyz(request: Request) -> Response | Status:
    refusal = service_of(request).readiness()
    if refusal is not None:
        return error_response(refusal.status, refusal.code, refusal.detail, refusal.headers)
    return Status(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "fastast_* series and process metrics"}},
)
async def metrics(request: Request) -> Response:
    body, content_type = service_of(request).metrics.exposition()
    return Response(body, media_type=content_type)


@dataclass(frozen=True)
class EngineEndpoint:
    """A running engine: where workers reach it, and the card of the model it loaded."""

    address: str
    card: ModelCard


def create_app(settings: ServeSettings | None = None, backend=None, *, engine: EngineEndpoint | None = None) -> FastAPI:
    """The app for one model: against a running `engine`, or with its own engine thread on `backend` (without one,
    settings.model is loaded with settings.backend on settings.device)."""
    settings = settings or ServeSettings()
    metrics = ServingMetrics(settings.max_batch_size)
    if engine is not None:
        service = Service(settings, engine.card, EngineClient(engine.address), metrics)
        lifespan = _serving(service)
    else:
        lifespan, service = _with_engine_thread(settings, backend, metrics)

    app = FastAPIOffline(  # /docs and /redoc load their JS and CSS from this server: they work air-gapped
        title="FastAST Serve",
        version=fastast.__version__,
        description="Audio classification with the Audio Spectrogram Transformer and Token Merging: "
        "every request picks its speed/accuracy trade-off r; requests at the same r are batched.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(ClassifyLane, service=service)
    return app


def _serving(service: Service):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    return lifespan


def _with_engine_thread(settings: ServeSettings, backend, metrics: ServingMetrics):
    """An engine for this app alone, on a thread, sharing the app's metrics; errors in its settings raise here."""
    from fastast.serving.backend import load_backend
    from fastast.serving.engine import Engine, EngineThread

    engine = Engine(settings, backend or load_backend(settings), metrics)
    folder = Path(tempfile.mkdtemp(prefix="fastast-"))
    thread = EngineThread(engine, f"ipc://{folder}/engine")
    service = Service(settings, engine.backend.card, EngineClient(thread.address), metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread.start()
        try:
            async with _serving(service)(app):
                yield
        finally:
            thread.stop()
            shutil.rmtree(folder, ignore_errors=True)

    return lifespan, service
