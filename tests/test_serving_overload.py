"""Overload, deadlines, disconnects and graceful shutdown of a real `fastast serve`.

The servers here hold every batch for 1.5 s (--max-wait-ms 1500, batches far larger than the traffic), so
requests sit in the queue long enough to fill it, miss a deadline, or be in flight when SIGTERM arrives.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serverutil import metric, running_server, scrape, start_server

HOLD_MS = 1500
MAX_QUEUE = 4
WAV = {"Content-Type": "audio/wav"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ("--max-wait-ms", str(HOLD_MS), "--max-batch-size", "64", "--max-queue", str(MAX_QUEUE), "--timeout-s", "20")
    with running_server(tiny_model_dir, *args) as url:
        yield url


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def queued(url: str) -> float:
    return metric(scrape(url), "fastast_queue_depth")


def test_full_queue_answers_429_at_once_then_recovers(server, speech):
    with httpx.Client(base_url=server, timeout=30.0) as client, ThreadPoolExecutor(MAX_QUEUE) as pool:
        held = [pool.submit(client.post, "/classify", content=speech, headers=WAV) for _ in range(MAX_QUEUE)]
        wait_until(lambda: queued(server) == MAX_QUEUE)
        started = time.monotonic()
        refused = client.post("/classify", content=speech, headers=WAV)
        assert time.monotonic() - started < HOLD_MS / 1000 / 2  # at once, not after the queue moved
        assert refused.status_code == 429
        assert refused.json()["error"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
        bodies = [future.result().json() for future in held]
    assert [body["batch_size"] for body in bodies] == [MAX_QUEUE] * MAX_QUEUE
    with httpx.Client(base_url=server, timeout=30.0) as client:
        assert client.post("/classify", content=speech, headers=WAV).status_code == 200
    assert metric(scrape(server), "fastast_requests_total", status="rejected") >= 1


def test_deadline_passed_in_queue_answers_504_and_is_never_computed(server, speech):
    before = scrape(server)
    started = time.monotonic()
    response = httpx.post(
        f"{server}/classify", params={"r": 3}, content=speech, headers={**WAV, "X-Request-Timeout-Ms": "300"}, timeout=30
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error"] == "timeout"
    assert elapsed > 0.25  # answered at its deadline (the metrics below show it was never computed)
    time.sleep(HOLD_MS / 1000 + 0.3)  # past the moment its batch would have run
    after = scrape(server)
    assert metric(after, "fastast_samples_total", r="3") == metric(before, "fastast_samples_total", r="3")
    assert metric(after, "fastast_requests_total", r="3", status="timeout") - metric(
        before, "fastast_requests_total", r="3", status="timeout"
    ) == 1
    assert metric(after, "fastast_queue_depth", r="3") == 0


def test_client_that_disconnects_while_queued_is_dropped(server, speech):
    before = scrape(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/classify", params={"r": 5}, content=speech, headers=WAV, timeout=httpx.Timeout(30, read=0.4))
    time.sleep(HOLD_MS / 1000 + 0.3)
    after = scrape(server)
    assert metric(after, "fastast_samples_total", r="5") == metric(before, "fastast_samples_total", r="5")
    assert metric(after, "fastast_requests_total", r="5", status="cancelled") - metric(
        before, "fastast_requests_total", r="5", status="cancelled"
    ) == 1
    assert metric(after, "fastast_queue_depth") == 0


def test_sigterm_drains_every_accepted_request_then_exits_0(tiny_model_dir, speech):
    in_flight = 6
    with start_server(tiny_model_dir, "--max-wait-ms", str(HOLD_MS), "--max-batch-size", "64") as server:
        with httpx.Client(base_url=server.url, timeout=30.0) as client, ThreadPoolExecutor(in_flight) as pool:
            accepted = [
                pool.submit(client.post, "/classify", params={"r": r % 2}, content=speech, headers=WAV)
                for r in range(in_flight)
            ]
            wait_until(lambda: queued(server.url) == in_flight)
            server.process.terminate()  # SIGTERM
            # Still listening while it drains: not ready, and no new work taken.
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, timeout=5)
            assert httpx.get(f"{server.url}/readyz").json()["error"] == "draining"
            late = httpx.post(f"{server.url}/classify", content=speech, headers=WAV, timeout=10)
            assert late.status_code == 503 and late.json()["error"] == "draining"
            assert late.headers["connection"] == "close"  # a clean refusal, not a reset
            responses = [future.result() for future in accepted]
        assert [response.status_code for response in responses] == [200] * in_flight
        assert server.process.wait(timeout=30) == 0, server.log()[-3000:]
