"""Audio longer than the model's window, served: windows as batch rows, one answer per clip, the timeline, the
limits, fairness between a long request and short ones, and the deadline over a long request's windows. Real
`fastast serve` processes on loopback ports."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from fastast.cli import main
from serverutil import metric, scrape, start_server, wav_bytes
from tests.conftest import tone
from tests.test_timeline_real import DEFAULT, TOP_K, WORDS, compose

WAV = {"Content-Type": "audio/wav"}
LONG_S = 590  # under the default --max-audio-s of 600


def post(url: str, body: bytes, timeout: float = 120.0, headers: dict | None = None, **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", params=params, content=body, headers={**WAV, **(headers or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    with start_server(tiny_model_dir, "--max-batch-size", "8", "--max-wait-ms", "5") as server:
        yield server


def test_served_timeline_and_clip_answer_equal_predicts(tmp_path, capsys):
    path = compose(tmp_path / "words-on-noise.wav")
    k = TOP_K
    assert main(["predict", "--model", str(DEFAULT), "--timeline", "--json", "--top-k", str(k), str(path)]) == 0
    [offline] = json.loads(capsys.readouterr().out)["results"]
    with start_server(DEFAULT) as server:
        response = post(server.url, path.read_bytes(), timeline="true", top_k=str(k))
        samples = metric(scrape(server.url), "fastast_samples_total", r="0")
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["windows"] == offline["windows"] == len(served["timeline"]) == 30
    assert samples == 30  # fastast_samples_total counts windows
    for window, expected in zip(served["timeline"], offline["timeline"]):
        assert (window["start_s"], window["end_s"]) == (expected["start_s"], expected["end_s"])
        assert [x["index"] for x in window["labels"]] == [x["index"] for x in expected["labels"]]
        assert [x["score"] for x in window["labels"]] == pytest.approx([x["score"] for x in expected["labels"]], abs=1e-4)
    assert [x["index"] for x in served["labels"]] == [x["index"] for x in offline["top"]]
    assert [x["score"] for x in served["labels"]] == pytest.approx([x["score"] for x in offline["top"]], abs=1e-4)
    # Every word is among the clip's top labels, found where it was placed (as the offline test checks in full).
    assert {word for _, word, _ in WORDS} <= {x["label"] for x in served["labels"]}


def test_short_audio_is_one_window_and_bad_window_options_are_refused(tiny_model_dir):
    one_second = wav_bytes(tone(1.0))
    five_seconds = wav_bytes(tone(5.0))
    with start_server(tiny_model_dir, "--max-windows", "4", "--max-queue", "64") as server:
        short = post(server.url, one_second)
        single_timeline = post(server.url, one_second, timeline="1")
        refused = {
            name: post(server.url, one_second, **params)
            for name, params in {
                "hop_zero": {"hop_s": "0"},
                "hop_over_window": {"hop_s": "2"},
                "hop_text": {"hop_s": "half"},
                "max_on_single_label": {"aggregate": "max"},
                "unknown_aggregate": {"aggregate": "median"},
                "timeline_text": {"timeline": "maybe"},
            }.items()
        }
        too_long = post(server.url, five_seconds)  # 7 windows at the default hop
        coarser = post(server.url, five_seconds, hop_s="1.29")  # 4 windows
        tiny_hop = post(server.url, five_seconds, hop_s="0.0001")  # 2 samples: 29,641 windows, counted not listed
        models = httpx.get(f"{server.url}/models", timeout=10).json()["models"][0]["limits"]
    assert short.status_code == 200 and short.json()["windows"] == 1 and "timeline" not in short.json()
    [entry] = single_timeline.json()["timeline"]
    assert (entry["start_s"], entry["end_s"]) == (0.0, 1.0)
    assert [x["index"] for x in entry["labels"]] == [x["index"] for x in single_timeline.json()["labels"]]
    for name, response in refused.items():
        assert response.status_code == 422 and response.json()["error"] == "invalid_parameter", name
    assert "single-label" in refused["max_on_single_label"].json()["detail"]
    assert too_long.status_code == 413 and too_long.json()["error"] == "too_many_windows"
    assert "7 windows" in too_long.json()["detail"] and "--max-windows" in too_long.json()["detail"]
    assert coarser.status_code == 200 and coarser.json()["windows"] == 4
    assert tiny_hop.status_code == 413 and "29641 windows" in tiny_hop.json()["detail"]
    assert (models["window_s"], models["window_hop_s"], models["max_windows"]) == (1.295, 0.6475, 4)


def test_short_requests_keep_their_latency_while_a_ten_minute_request_runs(tiny_server):
    long_body = wav_bytes(tone(LONG_S, sample_rate=8000), sample_rate=8000)  # resampled to 16 kHz by the worker
    short = wav_bytes(tone(1.0))
    alone = [post(tiny_server.url, short).elapsed.total_seconds() for _ in range(3)]
    outcome: dict = {}

    def long_request() -> None:
        started = time.monotonic()
        outcome["response"] = post(tiny_server.url, long_body)
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=long_request)
    thread.start()
    while metric(scrape(tiny_server.url), "fastast_samples_total", r="0") < 50:  # its windows are being computed
        time.sleep(0.02)
    during = []
    while thread.is_alive() and len(during) < 20:
        response = post(tiny_server.url, short)
        assert response.status_code == 200
        during.append(response.elapsed.total_seconds())
    thread.join()
    long = outcome["response"]
    assert long.status_code == 200 and long.json()["windows"] == 1 + int(np.ceil((LONG_S * 16000 - 20720) / 10360))
    assert len(during) >= 3  # they overlapped the long request
    # Each short request rode in the next batch beside one row of the long one, not behind its whole backlog.
    assert max(during) < outcome["seconds"] / 4, (during, outcome["seconds"], alone)


def test_a_long_requests_deadline_drops_its_windows_not_yet_computed(tiny_server):
    before = metric(scrape(tiny_server.url), "fastast_samples_total", r="3")
    body = wav_bytes(tone(LONG_S, sample_rate=8000), sample_rate=8000)
    response = post(tiny_server.url, body, headers={"X-Request-Timeout-Ms": "300"}, r="3")
    assert response.status_code == 504 and response.json()["error"] == "timeout"
    time.sleep(0.5)  # a batch under way at the deadline finishes
    computed = metric(scrape(tiny_server.url), "fastast_samples_total", r="3") - before
    assert computed < 900  # most of its ~900 windows were never computed
    assert post(tiny_server.url, wav_bytes(tone(1.0)), r="3").status_code == 200  # and the server is fine
