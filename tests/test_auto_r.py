"""r=auto: the ladder from the card, the cost model and controller, the batcher's auto queue, and the HTTP surface
(an app with its engine on a thread, through the same sockets as in production)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from fastast.errors import FastASTError
from fastast.model.card import ModelCard, RTableRow, mark_pareto, pareto_optimal
from fastast.serving.app import create_app
from fastast.serving.auto_r import DOWN_DWELL_S, AutoR, CostModel, auto_ladder
from fastast.serving.backend import load_torch_backend
from fastast.serving.batcher import Batcher
from fastast.serving.metrics import ServingMetrics
from fastast.serving.settings import ServeSettings
from serverutil import wav_bytes
from tests.conftest import make_model_dir, tone
from tests.test_serving_inprocess import classify, serving

# (r, accuracy, samples/s): r=2 is dominated by r=4 (slower and less accurate); r=12 drops 3 points.
TABLE = [(0, 0.90, 100.0), (2, 0.893, 110.0), (4, 0.897, 130.0), (8, 0.892, 170.0), (12, 0.87, 230.0)]


def rows(table=TABLE, variant="Inf") -> list[RTableRow]:
    base = table[0][1]
    return [RTableRow(r=r, metric="accuracy", value=v, drop=round(base - v, 6), samples_per_s=s, variant=variant) for r, v, s in table]


@pytest.fixture(scope="module")
def carded_model_dir(tmp_path_factory) -> Path:
    """The tiny test model with an r table in its card (the card's own weights, so r=auto can use it)."""
    directory = make_model_dir(tmp_path_factory.mktemp("store") / "carded")
    card = ModelCard.load(directory / "card.json")
    card.model_copy(update={"r_table": rows()}).save(directory / "card.json")
    return directory


def card_with(table_rows: list[RTableRow]) -> ModelCard:
    return ModelCard(name="m", arch={"type": "other"}, labels=[], r_table=table_rows)


# ---- the ladder and the Pareto front -------------------------------------------------------------------------


def test_pareto_front_drops_only_dominated_points():
    assert pareto_optimal([(0.9, 100), (0.893, 110), (0.897, 130), (0.8, 120)]) == [True, False, True, False]
    assert pareto_optimal([(0.9, 100), (0.9, 100)]) == [True, True]  # equal points do not dominate each other


def test_mark_pareto_compares_within_each_variant_only():
    marked = mark_pareto([*rows(), *rows([(0, 0.95, 90.0), (4, 0.94, 95.0)], variant="Train+Inf")])
    assert [(row.variant, row.r, row.pareto) for row in marked] == [
        ("Inf", 0, True), ("Inf", 2, False), ("Inf", 4, True), ("Inf", 8, True), ("Inf", 12, True),
        ("Train+Inf", 0, True), ("Train+Inf", 4, True),
    ]


def test_ladder_follows_the_cards_drops_and_pareto_front():
    card = card_with(rows())
    assert auto_ladder(card, max_r=72, max_drop_points=1.0, auto_max_r=None) == [0, 4, 8]  # r=2 dominated, r=12 too lossy
    assert auto_ladder(card, max_r=72, max_drop_points=5.0, auto_max_r=None) == [0, 4, 8, 12]
    assert auto_ladder(card, max_r=6, max_drop_points=5.0, auto_max_r=None) == [0, 4]  # capped by --max-r
    assert auto_ladder(card, max_r=72, max_drop_points=1.0, auto_max_r=10) == [0, 4, 8, 10]  # --auto-max-r wins


def test_ladder_ignores_rows_measured_on_other_weights_and_needs_a_table_or_a_maximum():
    sibling = [row.model_copy(update={"weights_sha256": "f" * 64}) for row in rows()]
    assert auto_ladder(card_with(sibling), max_r=72, max_drop_points=1.0, auto_max_r=None) == []
    assert auto_ladder(card_with([]), max_r=72, max_drop_points=1.0, auto_max_r=None) == []
    assert auto_ladder(card_with([]), max_r=72, max_drop_points=1.0, auto_max_r=14) == [0, 2, 4, 6, 8, 10, 12, 14]


# ---- the controller ------------------------------------------------------------------------------------------


def linear_costs(ladder: list[int], max_batch: int, per_item: dict[int, float], fixed: float = 0.002) -> CostModel:
    costs = CostModel(ladder, max_batch)
    for r in ladder:
        costs.fit(r, [1, max_batch], [fixed + per_item[r], fixed + per_item[r] * max_batch])
    return costs


PER_ITEM = {0: 0.010, 4: 0.006, 8: 0.003}  # seconds per clip: r=8 carries 3.3x the load of r=0


def test_controller_picks_the_smallest_r_that_drains_the_backlog_within_budget():
    auto = AutoR([0, 4, 8], linear_costs([0, 4, 8], 8, PER_ITEM), slo_s=0.2)  # plans for 150 ms
    now = 100.0
    assert auto.choose([now], now) == 0  # one request: r=0 answers it in 12 ms
    # 16 requests just arrived: at r=0 two batches of 82 ms end at 164 ms > 150; at r=4 two of 50 ms end at 100 ms.
    assert auto.choose([now] * 16, now) == 4
    # 24 that have waited 40 ms already: r=4 ends at 40 + 150 = 190 ms; r=8 at 40 + 78 = 118 ms.
    assert auto.choose([now - 0.04] * 24, now) == 8
    # More than even r=8 can drain in time: the highest r (the bounded queue sheds the rest).
    assert auto.choose([now - 0.1] * 64, now) == 8


def test_controller_steps_down_one_level_at_a_time_and_only_with_room_to_spare():
    auto = AutoR([0, 4, 8], linear_costs([0, 4, 8], 8, PER_ITEM), slo_s=0.2)
    now = 100.0
    assert auto.choose([now - 0.04] * 24, now) == 8
    # 12 requests at once: r=0 would meet the budget (2 batches end at 82 + 42 = 124 ms < 150), but r holds for
    # DOWN_DWELL_S after a change, then falls only where half the budget is met (124 ms > 75 ms at r=0; 76 ms
    # at r=4 either): it stays at 8.
    assert auto.choose([now + 0.1] * 12, now + 0.1) == 8
    assert auto.choose([now + 1] * 12, now + 1) == 8
    # A light backlog: one step per DOWN_DWELL_S, 8 -> 4 -> 0, never straight to 0.
    assert [auto.choose([t] * 4, t) for t in (now + 2, now + 2.1, now + 2.6)] == [4, 4, 0]


def test_controller_raises_r_when_the_arrival_rate_exceeds_r0_capacity():
    auto = AutoR([0, 4, 8], linear_costs([0, 4, 8], 8, PER_ITEM), slo_s=10.0)  # a budget no backlog here reaches
    now = 100.0
    for i in range(150):  # 150 requests/s; r=0 carries 8 / 82 ms = 98/s, r=4 8 / 50 ms = 160/s
        auto.arrived(now - 1 + i / 150)
    assert auto.choose([now], now) == 4


def test_cost_model_interpolates_warm_up_and_follows_observed_batches():
    costs = CostModel([0], 8)
    costs.fit(0, [1, 2, 4, 8], [0.01, 0.02, 0.04, 0.08])
    assert costs.seconds(0, 3) == pytest.approx(0.03) and costs.samples_per_s(0) == pytest.approx(100)
    for _ in range(40):
        costs.observe(0, 8, 0.16)  # the host got twice as slow
    assert costs.seconds(0, 8) == pytest.approx(0.16, rel=0.01)
    costs.observe(5, 8, 1.0)  # an r off the ladder is ignored


# ---- the batcher's auto queue -------------------------------------------------------------------------------


def test_auto_queue_runs_a_burst_at_a_higher_r_and_a_lone_request_at_r0():
    ladder = [0, 4, 8]
    batches: list[tuple[int, int]] = []

    def sleeping(r, items):  # a model whose batch time is the cost model's
        time.sleep(0.002 + PER_ITEM[r] * len(items))
        batches.append((r, len(items)))
        return items

    async def scenario():
        metrics = ServingMetrics(8)
        auto = AutoR(ladder, linear_costs(ladder, 8, PER_ITEM), slo_s=0.2)
        batcher = Batcher(sleeping, metrics, max_batch_size=8, max_wait_s=0.005, max_queue=64, auto=auto)
        batcher.start()
        try:
            deadline = time.monotonic() + 30
            burst = [batcher.submit([i], None, deadline) for i in range(24)]
            burst_results = [await job.future for job in burst]
            lone = []
            for _ in range(2):  # r steps down one ladder level per DOWN_DWELL_S once the burst has gone
                await asyncio.sleep(DOWN_DWELL_S + 0.1)
                lone.append(await batcher.submit(["lone"], None, deadline).future)
            fixed = await batcher.submit(["fixed"], 4, deadline).future
        finally:
            await batcher.close()
        return burst_results, lone, fixed, metrics

    burst, lone, fixed, metrics = asyncio.run(scenario())
    assert {result.r for result in burst} == {8}  # 24 at r=0 would take 3 x 82 = 246 ms > 150 ms planned
    assert [result.outputs for result in burst] == [[i] for i in range(24)]
    assert [(result.r, result.outputs) for result in lone] == [(4, ["lone"]), (0, ["lone"])] and fixed.r == 4
    assert batches[-3:] == [(4, 1), (0, 1), (4, 1)]
    assert metrics.auto_r._sum.get() == 8 * 24 + 4  # one observation per auto request, at the r it ran at
    assert [r for r, _ in batches].count(8) == 3


# ---- HTTP -----------------------------------------------------------------------------------------------------


@pytest.fixture
def carded_backend(carded_model_dir):
    return load_torch_backend(carded_model_dir, "cpu", "fp32")


def test_auto_requests_report_the_r_they_ran_at(carded_backend):
    speech = wav_bytes(tone(1.0))  # one window: the controller plans for requests of one window

    async def scenario(**settings):
        async with serving(carded_backend, max_batch_size=4, **settings) as client:
            answers = await asyncio.gather(*(classify(client, speech, r="auto") for _ in range(6)))
            return answers, (await client.get("/metrics")).text

    relaxed, metrics = asyncio.run(scenario(slo_ms=60_000))
    assert [answer.status_code for answer in relaxed] == [200] * 6
    used = Counter(answer.json()["r"] for answer in relaxed)
    assert set(used) <= {0, 4, 8}  # the ladder (which r at this load is the controller's tests' business)
    for r, count in used.items():  # every request is labelled with the r it ran at
        assert f'fastast_requests_total{{r="{r}",status="ok"}} {float(count)}' in metrics
    assert {answer.json()["windows"] for answer in relaxed} == {1}
    assert "fastast_auto_r_count 6.0" in metrics  # one observation per window (the unit of batching and metrics)
    # A target no batch can meet: every auto request runs at the ladder's top, and is labelled with it.
    strict, metrics = asyncio.run(scenario(slo_ms=0.001, default_r="auto"))
    assert {answer.json()["r"] for answer in strict} == {8}
    assert 'fastast_requests_total{r="8",status="ok"} 6.0' in metrics


def test_models_shows_the_pareto_front_and_auto_settings(carded_backend):
    async def scenario():
        async with serving(carded_backend, max_batch_size=4, auto_max_drop=5.0, slo_ms=150) as client:
            return (await client.get("/models")).json()["models"][0]

    info = asyncio.run(scenario())
    assert info["auto"] == {"slo_ms": 150.0, "max_drop": 5.0, "max_r": 12, "ladder": [0, 4, 8, 12]}
    assert [(p["r"], p["pareto_optimal"], p["auto"]) for p in info["pareto"]] == [
        (0, True, True), (2, False, False), (4, True, True), (8, True, True), (12, True, True)
    ]
    live = {p["r"]: p["live_samples_per_s"] for p in info["pareto"]}
    assert live[2] is None and all(live[r] > 0 for r in (0, 4, 8, 12))  # measured at warm-up for every auto r


def test_auto_needs_an_r_table_or_a_maximum(tiny_model_dir, speech_wav):
    backend = load_torch_backend(tiny_model_dir, "cpu", "fp32")
    with pytest.raises(FastASTError, match="--default-r auto needs"):
        create_app(ServeSettings(default_r="auto"), backend)
    with pytest.raises(FastASTError, match="--auto-max-r 80 exceeds --max-r 72"):
        create_app(ServeSettings(auto_max_r=80), backend)

    async def scenario(**settings):
        async with serving(backend, max_batch_size=4, **settings) as client:
            return await classify(client, speech_wav.read_bytes(), r="auto")

    refused = asyncio.run(scenario())
    assert refused.status_code == 422 and "r=auto is not available" in refused.json()["detail"]
    allowed = asyncio.run(scenario(auto_max_r=6))
    assert allowed.status_code == 200 and allowed.json()["r"] in range(7)
