"""POST /classify's fast lane: an ASGI middleware that hands the request straight to the Service.

The request itself is cheap in a worker (a small WAV, a few engine messages), so FastAPI's machinery around the
endpoint was a large share of its CPU: routing, dependency solving, a second validation of the response model,
the exception and exit-stack middleware. The lane skips them and serializes the response once. It answers exactly
what the FastAPI route answers, through the same Service.classify and the same error bodies; the route stays
declared for the OpenAPI schema and serves anything the lane passes on (another method or path). An unexpected
error propagates to FastAPI's outer error middleware, which answers it with the service's 500 body.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from fastast.serving.errors import ServiceError, error_response
from fastast.serving.service import Service

CLASSIFY_PATH = "/classify"
JSON_HEADERS = [(b"content-type", b"application/json")]


class ClassifyLane:
    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or get_route_path(scope) != CLASSIFY_PATH:
            await self.app(scope, receive, send)
            return
        try:
            answer = await self.service.classify(Request(scope, receive, send))
        except ServiceError as exc:
            await error_response(exc.status, exc.code, exc.detail, exc.headers)(scope, receive, send)
            return
        body = answer.model_dump_json(exclude_none=True).encode()
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
