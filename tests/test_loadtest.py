"""The load-test tools against a real `fastast serve`: the multi-process load generator, the r sweep and the Locust
file."""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.auto_ramp import summarize
from loadtest.frontend import upload
from loadtest.loadgen import percentile, run_load
from loadtest.openloop import Outcome, poisson_times, run_open_loop
from serverutil import running_server, start_server

REPO = Path(__file__).resolve().parent.parent


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 95) == 7.0


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    with running_server(tiny_model_dir, "--max-batch-size", "8", "--max-wait-ms", "10") as url:
        yield url


def test_loadgen_counts_requests_statuses_and_the_server_trees_cpu(tiny_model_dir, speech_wav):
    with start_server(tiny_model_dir, "--workers", "2", "--max-wait-ms", "10") as server:
        ok = run_load(f"{server.url}/classify?r=2", speech_wav.read_bytes(), processes=2, connections=4, duration=2,
                      warmup=0.5, server_pid=server.process.pid)  # fmt: skip
        refused = run_load(f"{server.url}/classify?r=x", b"", processes=1, connections=2, duration=1, warmup=0)
    assert ok["ok"] == ok["requests"] > 0 and ok["status"] == {"200": ok["ok"]}
    assert ok["req_per_s"] == ok["ok"] / 2 and 0 < ok["p50_ms"] <= ok["p99_ms"]
    # The CPU of the whole tree (supervisor, engine, workers): more than the supervisor alone could spend idling.
    assert ok["server_cpu_s"] > 0.05 and ok["server_cpu_ms_per_request"] > 0 and ok["loadgen_cpu_s"] > 0
    assert refused["ok"] == 0 and set(refused["status"]) == {"422"}


def test_frontend_multipart_upload_is_a_form_the_server_reads(server_url, speech_wav):
    """loadtest.frontend --multipart (for peers that take only forms) posts a form fastast serve accepts."""
    wav = speech_wav.read_bytes()
    assert upload(wav, multipart=False) == (wav, "audio/wav")
    body, content_type = upload(wav, multipart=True)
    assert content_type.startswith("multipart/form-data; boundary=") and wav in body
    report = run_load(f"{server_url}/classify?r=0", body, content_type=content_type, processes=1, connections=2,
                      duration=1, warmup=0)  # fmt: skip
    assert report["ok"] == report["requests"] > 0


def test_open_loop_sends_every_poisson_arrival_and_reads_the_r_used(tiny_model_dir, speech_wav):
    times = poisson_times(40, 1.5, seed=3)
    assert 30 <= len(times) <= 90 and times == sorted(times) and times == poisson_times(40, 1.5, seed=3)
    with start_server(tiny_model_dir, "--default-r", "auto", "--auto-max-r", "4") as server:
        outcomes = asyncio.run(run_open_loop(f"{server.url}/classify", speech_wav.read_bytes(), 40, 1.5, seed=3))
        refused = asyncio.run(run_open_loop(f"{server.url}/classify?r=x", b"", 20, 0.5, seed=1))
    assert len(outcomes) == len(times) and [o.status for o in outcomes] == [200] * len(times)
    assert all(o.r in range(5) and o.latency_s > 0 for o in outcomes)
    assert [o.sent_s for o in outcomes] == sorted(o.sent_s for o in outcomes)
    assert {o.status for o in refused} == {422} and {o.r for o in refused} == {None}


def test_auto_ramp_summary_counts_goodput_sheds_and_expected_accuracy():
    outcomes = [Outcome(0.1, 0.05, 200, 0), Outcome(0.2, 0.15, 200, 8), Outcome(0.3, 0.3, 200, 8),
                Outcome(0.4, 0.0, 429, None), Outcome(0.5, 0.0, 0, None)]  # fmt: skip
    row = summarize(outcomes, seconds=2.0, slo_s=0.2, accuracy={0: 0.9, 8: 0.84})
    assert row["offered_per_s"] == 2.5 and row["ok"] == 3 and row["goodput_per_s"] == 1.0
    assert (row["rejected_429"], row["other_errors"]) == (1, 1)
    assert row["mean_r"] == pytest.approx(16 / 3) and row["expected_accuracy"] == pytest.approx((0.9 + 2 * 0.84) / 3)
    assert row["p50_ms"] == pytest.approx(150) and row["p99_ms"] == pytest.approx(300)


def test_sweep_writes_table_csv_and_plot(server_url, tmp_path):
    out = tmp_path / "sweep"
    subprocess.run(
        [sys.executable, "-m", "loadtest.sweep", "--url", server_url, "--r", "0,20", "--concurrency", "1,8",
         "--duration", "2", "--warmup", "0.5", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(row["r"]), int(row["concurrency"])) for row in rows] == [(0, 1), (20, 1), (0, 8), (20, 8)]
    for row in rows:
        assert int(row["errors"]) == 0
        assert float(row["samples_per_s"]) > 0
        assert float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"])
    single = [row for row in rows if row["concurrency"] == "1"]
    assert all(float(row["mean_batch_size"]) == 1.0 for row in single)
    # Eight closed-loop clients keep several requests queued, so the batcher must form batches > 1.
    assert any(float(row["mean_batch_size"]) > 1.0 for row in rows if row["concurrency"] == "8")
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| r | concurrency | S/s |") and len(table.splitlines()) == 6
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_locustfile_reports_one_row_per_r(server_url, tmp_path):
    prefix = tmp_path / "locust"
    subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
         "-u", "4", "-r", "4", "-t", "4s", "--host", server_url, "--csv", str(prefix), "--only-summary"],
        check=True, capture_output=True, timeout=120, env={"LOADTEST_R_MIX": "0:1,10:1,30:1", "PATH": "/usr/bin:/bin"},
    )
    with open(f"{prefix}_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for r in (0, 10, 30):
        row = rows[f"/classify r={r}"]
        assert int(row["Request Count"]) > 0
        assert int(row["Failure Count"]) == 0
