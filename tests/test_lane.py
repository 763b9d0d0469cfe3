"""POST /classify's fast lane answers exactly what the FastAPI route answers: the same app is driven over ASGI with
and without the lane, its engine on a thread behind the real sockets, for a success and for every kind of refusal."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from fastast.serving import app as app_module
from fastast.serving.app import create_app
from fastast.serving.backend import load_torch_backend
from fastast.serving.lane import ClassifyLane
from fastast.serving.settings import ServeSettings

TIMING = "timing_ms"


def without_lane(app):
    """The app's own middleware stack and routes with the lane left out: /classify reaches the FastAPI route."""
    lanes = [middleware for middleware in app.user_middleware if middleware.cls is ClassifyLane]
    assert lanes, "create_app installs the lane"
    saved = app.user_middleware
    app.user_middleware = [middleware for middleware in saved if middleware.cls is not ClassifyLane]
    try:
        stack = app.build_middleware_stack()
    finally:
        app.user_middleware = saved

    async def route_only(scope, receive, send):
        scope["app"] = app
        await stack(scope, receive, send)

    return route_only


def multipart(data: bytes) -> dict:
    return {"files": {"file": ("clip.wav", data, "audio/wav")}}


@pytest.fixture(scope="module")
def answers(tiny_model_dir, speech_wav):
    """Per case: the responses (lane, route) and how often each path entered the FastAPI route's handler."""
    speech = speech_wav.read_bytes()
    silence = io.BytesIO()
    sf.write(silence, np.zeros(8000, dtype=np.float32), 8000, format="WAV", subtype="PCM_16")
    wav = {"headers": {"Content-Type": "audio/wav"}}
    cases = {
        "ok": ({"r": 2, "top_k": 3}, {"content": speech, **wav}),
        "ok, resampled, multipart": ({"r": 0}, multipart(silence.getvalue())),
        "r not a number": ({"r": "abc"}, {"content": speech, **wav}),
        "r too large": ({"r": 10_000}, {"content": speech, **wav}),
        "top_k zero": ({"top_k": 0}, {"content": speech, **wav}),
        "not audio": ({}, {"content": b"definitely not audio", **wav}),
        "empty body": ({}, {"content": b"", **wav}),
        "wrong content type": ({}, {"content": speech, "headers": {"Content-Type": "text/plain"}}),
        "multipart without file": ({}, {"data": {"name": "x"}, "files": {"other": ("a.wav", speech, "audio/wav")}}),
    }
    app = create_app(ServeSettings(max_batch_size=4), load_torch_backend(tiny_model_dir, "cpu", "fp32"))

    async def scenario():
        async with app.router.lifespan_context(app):
            clients = [
                httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://fastast", timeout=30)
                for asgi in (app, without_lane(app))
            ]
            ready_by = time.monotonic() + 60
            while (await clients[0].get("/readyz")).status_code != 200 and time.monotonic() < ready_by:
                await asyncio.sleep(0.05)
            results = {}
            real_service_of = app_module.service_of
            for name, (params, body) in cases.items():
                responses, handled = [], []
                for client in clients:
                    calls = []
                    app_module.service_of = lambda request: calls.append(1) or real_service_of(request)
                    try:
                        responses.append(await client.post("/classify", params=params, **body))
                    finally:
                        app_module.service_of = real_service_of
                    handled.append(len(calls))
                results[name] = (responses, handled)
            for client in clients:
                await client.aclose()
            return results

    return asyncio.run(scenario())


CASES = [
    "ok",
    "ok, resampled, multipart",
    "r not a number",
    "r too large",
    "top_k zero",
    "not audio",
    "empty body",
    "wrong content type",
    "multipart without file",
]


@pytest.mark.parametrize("case", CASES)
def test_the_lane_answers_as_the_route_does(answers, case):
    (lane, route), (lane_handled, route_handled) = answers[case]
    assert (lane_handled, route_handled) == (0, 1)  # the lane never enters the route; the lane-free stack does
    assert lane.status_code == route.status_code
    assert lane.headers["content-type"] == route.headers["content-type"] == "application/json"
    assert int(lane.headers["content-length"]) == len(lane.content)
    assert lane.headers.get("retry-after") == route.headers.get("retry-after")
    lane_body, route_body = lane.json(), route.json()
    if lane.status_code == 200:
        assert set(lane_body[TIMING]) == set(route_body[TIMING])
        lane_body.pop(TIMING), route_body.pop(TIMING)
        assert lane_body["labels"][0]["score"] > 0
    assert lane_body == route_body


def test_the_cases_cover_success_and_each_refusal_status(answers):
    statuses = {answers[case][0][0].status_code for case in CASES}
    assert statuses == {200, 400, 415, 422}
