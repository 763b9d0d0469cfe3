"""The FastAPI app: thin routes over fastast.serving.service.Service.

`create_app(settings)` loads the model (errors surface before the server listens); the lifespan starts the
batcher and the warm-up, and on shutdown finishes every accepted request before the threads stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

import fastast
from fastast.serving.backend import Backend, load_backend
from fastast.serving.errors import ErrorResponse, error_response, install_error_handlers
from fastast.serving.intake import FILE_FIELD
from fastast.serving.schemas import ClassifyResponse, ModelsResponse, Status
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
            "schema": {"type": "integer", "minimum": 0},
            "description": "ToMe tokens merged in every block: higher is faster and less accurate. "
            "Allowed range and default: GET /models.",
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
    summary="Classify one audio clip at a chosen r",
    openapi_extra=CLASSIFY_OPENAPI,
    responses={
        400: _error("not audio, corrupt or truncated audio, NaN/Inf samples, an empty body, malformed multipart"),
        413: _error(
            "upload larger than --max-upload-mb (payload_too_large), audio longer than --max-audio-s (audio_too_long), "
            "more channels than --max-channels or a sample rate above --max-sample-rate (audio_too_large)"
        ),
        415: _error("a Content-Type other than multipart/form-data, audio/* or application/octet-stream"),
        422: _error("r or top_k not a number of ASCII digits, X-Request-Timeout-Ms not a number, or out of range"),
        429: _error("the queue is full (--max-queue); retry after the given seconds", retry_after=True),
        500: _error("the batch this request ran in failed (inference_failed)"),
        503: _error("warming up (not_ready) or shutting down (draining)", retry_after=True),
        504: _error("the deadline passed while the request was queued; it was not computed"),
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


@router.get("/healthz", response_model=Status, summary="Liveness", responses={503: _error("warm-up failed")})
async def healthz(request: Request) -> Response | Status:
    service = service_of(request)
    if service.warmup_error is not None:
        return error_response(503, "warmup_failed", service.warmup_error)
    return Status(status="alive")


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: the model is loaded and warmed up, and the server is not draining",
    responses={503: _error("warming up, warm-up failed, or draining", retry_after=True)},
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


def create_app(settings: ServeSettings | None = None, backend: Backend | None = None) -> FastAPI:
    """The app for one model. Without `backend`, loads settings.model with settings.backend on settings.device."""
    settings = settings or ServeSettings()
    if backend is None:
        backend = load_backend(settings)
    service = Service(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

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
    return app
