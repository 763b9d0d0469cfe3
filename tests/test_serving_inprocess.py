"""In-process tests of the service (httpx over ASGI, the app's own lifespan, its engine on a thread of this process
behind the same sockets) where a fault is injected into the backend, plus the batcher's scheduling and the serve
command's settings."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import torch

from fastast import cli
from fastast.commands import serve as serve_command
from fastast.errors import FastASTError
from fastast.serving.app import create_app
from fastast.serving.backend import TorchBackend, load_backend, load_torch_backend
from fastast.serving.batcher import Batcher, QueueFullError
from fastast.serving.engine import warmup_batch_sizes
from fastast.serving.metrics import ServingMetrics
from fastast.serving.settings import ServeSettings

WAV = {"Content-Type": "audio/wav"}


@pytest.fixture
def backend(tiny_model_dir) -> TorchBackend:
    return load_torch_backend(tiny_model_dir, "cpu", "fp32")


@asynccontextmanager
async def serving(backend, wait_ready: bool = True, **settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ServeSettings(**settings), backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fastast", timeout=30) as client:
            if wait_ready:
                ready_by = time.monotonic() + 60  # warm-up runs every batch size (at each r=auto r too)
                while (await client.get("/readyz")).status_code != 200 and time.monotonic() < ready_by:
                    await asyncio.sleep(0.05)
            yield client


def classify(client: httpx.AsyncClient, data: bytes, **params):
    return client.post("/classify", params=params, content=data, headers=WAV)


# ---- faults --------------------------------------------------------------------------------------------------


def test_a_failing_batch_fails_only_its_requests(backend, speech, monkeypatch):
    real_run = backend.run
    failures = []

    def run_failing_once_at_r7(features, r):
        if r == 7 and not failures:
            failures.append(features.shape[0])
            raise RuntimeError("injected device fault")
        return real_run(features, r)

    async def scenario():
        async with serving(backend, max_wait_ms=100) as client:
            monkeypatch.setattr(backend, "run", run_failing_once_at_r7)
            responses = await asyncio.gather(*(classify(client, speech, r=r) for r in (7, 7, 3, 3)))
            after = [await classify(client, speech, r=r) for r in (7, 3)]
            metrics = (await client.get("/metrics")).text
        return responses, after, metrics

    responses, after, metrics = asyncio.run(scenario())
    failed = [response for response in responses if response.status_code == 500]
    windows = after[0].json()["windows"]  # rows per request: the clip is longer than the model's window
    assert len(failed) * windows == failures[0] >= windows  # exactly the requests with rows in the failed batch
    assert all(response.json()["error"] == "inference_failed" for response in failed)
    assert all(response.status_code == 200 for response in responses[2:])  # the other r was not affected
    assert [response.status_code for response in after] == [200, 200]  # and the server keeps serving
    assert f'fastast_requests_total{{r="7",status="error"}} {float(len(failed))}' in metrics


def test_not_ready_until_warmed_up_for_every_batch_bucket(backend, speech, monkeypatch):
    gate = threading.Event()
    calls: list[tuple[int, int]] = []
    real_run = backend.run

    def gated_run(features, r):
        gate.wait(30)
        calls.append((features.shape[0], r))
        return real_run(features, r)

    monkeypatch.setattr(backend, "run", gated_run)

    async def scenario():
        async with serving(backend, wait_ready=False, max_batch_size=8, default_r=5) as client:
            try:
                warming = [await client.get(path) for path in ("/readyz", "/healthz")]
                refused = await classify(client, speech)
            finally:
                gate.set()
            for _ in range(500):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            return warming, refused, await client.get("/readyz"), await classify(client, speech)

    (readyz, healthz), refused, ready, served = asyncio.run(scenario())
    assert readyz.status_code == 503 and readyz.json()["error"] == "not_ready"
    assert healthz.status_code == 200
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert ready.status_code == 200 and served.status_code == 200
    assert calls[:4] == [(1, 5), (2, 5), (4, 5), (8, 5)]  # one forward per batch-size bucket at the default r
    assert warmup_batch_sizes(32) == [1, 2, 4, 8, 16, 32] and warmup_batch_sizes(6) == [1, 2, 4, 6]


def test_failed_warm_up_is_reported_by_health_and_readiness(backend, speech, monkeypatch):
    def broken(features, r):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(backend, "run", broken)

    async def scenario():
        async with serving(backend, wait_ready=False) as client:
            for _ in range(500):
                if (await client.get("/healthz")).status_code == 503:
                    break
                await asyncio.sleep(0.01)
            return await client.get("/healthz"), await client.get("/readyz"), await classify(client, speech)

    healthz, readyz, refused = asyncio.run(scenario())
    for response in (healthz, readyz, refused):
        assert response.status_code == 503 and response.json()["error"] == "warmup_failed"
        assert "out of memory" in response.json()["detail"]


def test_server_wide_timeout_answers_504(backend, speech):
    async def scenario():
        async with serving(backend, timeout_s=0.3, max_wait_ms=5000) as client:
            started = time.monotonic()
            response = await classify(client, speech)
            return response, time.monotonic() - started

    response, elapsed = asyncio.run(scenario())
    assert response.status_code == 504 and response.json() == {
        "error": "timeout",
        "detail": "the request's deadline passed before it could run",
    }
    assert elapsed < 3


def test_framework_validation_errors_are_reshaped(backend):
    app = create_app(ServeSettings(), backend)

    @app.get("/probe")
    async def probe(n: int) -> int:
        return n

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fastast") as client:
            return await client.get("/probe", params={"n": "seven"})

    response = asyncio.run(scenario())
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_parameter" and body["detail"].startswith("n: ") and "seven" in body["detail"]


def test_torch_compile_warms_graphs_for_the_default_r_and_answers_as_eager(tmp_path, speech):
    """--torch-compile: the warm-up compiles the default r (batch size 1, and one graph for every other size) before
    ready; answers equal the eager model's, at the compiled r and at an r that stays eager."""
    from torch._dynamo.utils import counters

    from conftest import make_model_dir

    model_dir = make_model_dir(tmp_path / "micro", dim=16, depth=1, heads=1)
    torch._dynamo.reset()
    counters.clear()

    async def answers(compiled: bool):
        backend = load_torch_backend(model_dir, "cpu", "fp32", compiled=compiled)
        async with serving(backend, default_r=2, max_batch_size=4) as client:
            graphs = counters["stats"]["unique_graphs"]
            responses = [await classify(client, speech, **params) for params in ({}, {"r": 0}, {"r": 2, "top_k": 35})]
        return graphs, responses

    eager_graphs, eager = asyncio.run(answers(False))
    compiled_graphs, compiled = asyncio.run(answers(True))
    assert eager_graphs == 0 and compiled_graphs == 2  # r=2 at batch size 1, and at any other size
    for ours, reference in zip(compiled, eager):
        assert ours.status_code == reference.status_code == 200
        ours, reference = ours.json(), reference.json()
        assert ours["r"] == reference["r"] and [x["index"] for x in ours["labels"]] == [x["index"] for x in reference["labels"]]
        for x, y in zip(ours["labels"], reference["labels"]):
            assert abs(x["score"] - y["score"]) < 1e-5


def test_torch_compile_is_refused_for_onnxruntime(tiny_model_dir):
    with pytest.raises(FastASTError, match="--torch-compile applies to the torch backend"):
        load_backend(ServeSettings(model=tiny_model_dir, backend="onnxruntime", torch_compile=True))


# ---- the batcher ----------------------------------------------------------------------------------------------


def run_batcher(scenario, run_batch=None, **options):
    """Run `scenario(batcher, batches)`; the batcher's run_batch records (r, batch size) and echoes the items."""
    batches: list[tuple[int, int]] = []

    def recording(r, items):
        batches.append((r, len(items)))
        return items

    async def main():
        batcher = Batcher(run_batch or recording, ServingMetrics(8), **options)
        batcher.start()
        try:
            return await scenario(batcher, batches)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_scheduler_serves_oldest_head_first_one_r_per_batch():
    gate = threading.Event()
    batches: list[tuple[int, int]] = []

    def gated(r, items):
        gate.wait(30)
        batches.append((r, len(items)))
        return items

    async def scenario(batcher: Batcher, _):
        deadline = time.monotonic() + 30
        first = batcher.submit(["A"], 1, deadline)
        while batcher.queued:  # wait until the first batch holds the inference thread
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        jobs = []
        for item, r in zip("BCDEF", (2, 1, 2, 1, 1)):  # queue 2: B, D; queue 1: C, E, F; queue 2's head is older
            jobs.append(batcher.submit([item], r, deadline))
            await asyncio.sleep(0.002)
        gate.set()
        return [await job.future for job in [first, *jobs]]

    results = run_batcher(scenario, gated, max_batch_size=2, max_wait_s=0.0, max_queue=16)
    assert batches == [(1, 1), (2, 2), (1, 2), (1, 1)]
    assert [result.batch_size for result in results] == [1, 2, 2, 2, 2, 1]
    assert [result.outputs for result in results] == [[x] for x in "ABCDEF"]  # every request gets its own output back


def test_batch_flushes_when_full_or_when_its_head_has_waited():
    async def scenario(batcher: Batcher, _):
        deadline = time.monotonic() + 30
        started = time.monotonic()
        full = [batcher.submit([i], 4, deadline) for i in range(3)]
        full_results = [await job.future for job in full]
        full_s = time.monotonic() - started
        started = time.monotonic()
        lone = await batcher.submit([3], 4, deadline).future
        return full_results, full_s, lone, time.monotonic() - started

    full, full_s, lone, lone_s = run_batcher(scenario, max_batch_size=3, max_wait_s=0.5, max_queue=16)
    assert [result.batch_size for result in full] == [3, 3, 3] and full_s < 0.5  # full: no waiting
    assert lone.batch_size == 1 and 0.5 <= lone_s < 5 and lone.queue_s >= 0.5


def test_admission_is_bounded_and_deadlines_and_cancels_free_places():
    async def scenario(batcher: Batcher, batches):
        deadline = time.monotonic() + 30
        waiting = [batcher.submit([i], 1, deadline) for i in range(2)]
        try:
            batcher.submit([2], 1, deadline)
        except QueueFullError as exc:
            refused = exc
        batcher.cancel(waiting[0], RuntimeError("client gone"))
        short = batcher.submit([3], 1, time.monotonic() + 0.05)  # takes the freed place, then expires while queued
        outcomes = await asyncio.gather(waiting[0].future, short.future, return_exceptions=True)
        queued_after_expiry = batcher.queued
        late = batcher.submit([4], 1, time.monotonic() - 1)  # already past its deadline: never queued
        return refused, outcomes, queued_after_expiry, await asyncio.gather(late.future, return_exceptions=True), batches

    refused, outcomes, queued, late, batches = run_batcher(scenario, max_batch_size=4, max_wait_s=1.0, max_queue=2)
    assert "max_queue 2" in str(refused)
    assert [type(o).__name__ for o in outcomes] == ["RuntimeError", "DeadlineExceededError"]
    assert queued == 1 and type(late[0]).__name__ == "DeadlineExceededError"
    assert batches == [(1, 1)]  # only the request that stayed was computed (when the queue closed)


def test_a_long_requests_rows_interleave_with_short_requests_round_robin():
    gate = threading.Event()
    batches: list[list] = []

    def gated(r, items):
        gate.wait(30)
        batches.append(list(items))
        return [f"out-{item}" for item in items]

    async def scenario(batcher: Batcher, _):
        deadline = time.monotonic() + 30
        first = batcher.submit(["A"], 0, deadline)
        while batcher.queued:  # the first batch holds the inference thread
            await asyncio.sleep(0.005)
        long = batcher.submit([f"L{i}" for i in range(10)], 0, deadline)
        shorts = [batcher.submit([f"S{i}"], 0, deadline) for i in range(3)]
        queued = batcher.queued
        gate.set()
        return queued, await first.future, await long.future, [await job.future for job in shorts]

    queued, _, long, shorts = run_batcher(scenario, gated, max_batch_size=4, max_wait_s=0.0, max_queue=16)
    assert queued == 13  # the queue counts rows
    # One row per request per round: the short requests go into the next batch beside the long one's first row.
    assert batches == [["A"], ["L0", "S0", "S1", "S2"], ["L1", "L2", "L3", "L4"], ["L5", "L6", "L7", "L8"], ["L9"]]
    assert long.outputs == [f"out-L{i}" for i in range(10)] and long.batch_size == 4
    assert [short.outputs for short in shorts] == [[f"out-S{i}"] for i in range(3)]


def test_one_request_takes_at_most_its_share_of_a_batch():
    async def scenario(batcher: Batcher, batches):
        deadline = time.monotonic() + 30
        long = batcher.submit([f"L{i}" for i in range(5)], 0, deadline)
        short = batcher.submit(["S"], 0, deadline)
        return await long.future, await short.future, batches

    long, short, batches = run_batcher(scenario, max_batch_size=4, max_wait_s=0.0, max_queue=16, request_share=0.5)
    # Two rows of the long request per batch at most: the batches stay short, so a short request waits less.
    assert batches == [(0, 3), (0, 2), (0, 1)]  # L0 S L1 | L2 L3 | L4
    assert long.outputs == [f"L{i}" for i in range(5)] and short.outputs == ["S"]


def test_cancelling_a_long_request_drops_its_rows_still_waiting():
    gate = threading.Event()
    batches: list[list] = []

    def gated(r, items):
        gate.wait(30)
        batches.append(list(items))
        return items

    async def scenario(batcher: Batcher, _):
        deadline = time.monotonic() + 30
        long = batcher.submit([f"L{i}" for i in range(10)], 0, deadline)
        while batcher.queued == 10:  # its first batch has started
            await asyncio.sleep(0.005)
        try:
            batcher.submit(list(range(5)), 0, deadline)  # 6 rows wait, 5 more would exceed max_queue 10
        except QueueFullError as exc:
            refused = exc
        cancelled = batcher.cancel(long, RuntimeError("client gone"))
        gate.set()
        outcome = await asyncio.gather(long.future, return_exceptions=True)
        return refused, cancelled, outcome, batcher.queued

    refused, cancelled, outcome, queued = run_batcher(scenario, gated, max_batch_size=4, max_wait_s=0.0, max_queue=10)
    assert "6 rows are already waiting and this request has 5" in str(refused)
    assert cancelled and type(outcome[0]).__name__ == "RuntimeError" and queued == 0
    assert batches == [["L0", "L1", "L2", "L3"]]  # the batch under way finished; the other six rows never ran


# ---- settings and the command ------------------------------------------------------------------------------------


def test_every_setting_has_a_flag_with_its_default_in_the_help():
    assert list(serve_command.OPTIONS) == list(ServeSettings.model_fields)
    for name, field in ServeSettings.model_fields.items():
        if field.default is not None:
            assert str(field.default) in serve_command.OPTIONS[name][1], name


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("FASTAST_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("FASTAST_PORT", "9001")
    parser = cli.build_parser()
    from_env = serve_command.settings_from_args(parser.parse_args(["serve"]))
    assert (from_env.max_batch_size, from_env.port, from_env.max_wait_ms) == (7, 9001, 5.0)
    flagged = serve_command.settings_from_args(parser.parse_args(["serve", "--max-batch-size", "9", "--max-r", "3"]))
    assert (flagged.max_batch_size, flagged.port, flagged.max_r) == (9, 9001, 3)


@pytest.mark.parametrize(
    "env,args,word", [({"FASTAST_DEVICE": "tpu"}, [], "device"), ({}, ["--max-batch-size", "0"], "max_batch_size")]
)
def test_invalid_settings_are_one_line_errors(monkeypatch, env, args, word):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(FastASTError, match=word):
        serve_command.settings_from_args(cli.build_parser().parse_args(["serve", *args]))


def test_r_limits_are_checked_against_the_model(backend):
    with pytest.raises(FastASTError, match="exceeds the model's limit of 72"):
        create_app(ServeSettings(max_r=73), backend)
    with pytest.raises(FastASTError, match="--default-r 9 exceeds --max-r 8"):
        create_app(ServeSettings(max_r=8, default_r=9), backend)


def test_serve_without_a_model_exits_2(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastast serve: error:") and "missing" in err and "\n" not in err
