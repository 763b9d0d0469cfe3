"""Long audio against `fastast serve`: windows/s of one long clip against as many one-window requests, the
latency of the long clip, and what a long request does to short requests' latency.

    python -m loadtest.long_audio --model model_store/default --r 0,8 --out docs/loadtest/long_audio

Per r: (1) a 60 s clip, posted alone, `--repeats` times: its latency and windows/s; (2) 60 one-second clips
posted at once, `--repeats` times: the time until all are answered and windows/s; (3) short requests from
`--clients` closed-loop clients for the duration of one 600 s request, against the same clients alone: their
p50/p99. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from loadtest.frontend import clip, start
from loadtest.loadgen import percentile


def post(client: httpx.Client, url: str, body: bytes, r: str) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.post(f"{url}/classify", params={"r": r}, content=body, headers={"Content-Type": "audio/wav"})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def short_latencies(url: str, body: bytes, r: str, clients: int, stop: threading.Event) -> list[float]:
    """Closed-loop short requests from `clients` threads until `stop` is set."""
    latencies: list[float] = []

    def loop() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                latencies.append(post(client, url, body, r)[0])

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def measure(url: str, r: str, repeats: int, clients: int, work: Path) -> dict:
    long_60, short_1, long_600 = (clip(work, seconds).read_bytes() for seconds in (60, 1, 600))
    with httpx.Client(timeout=300) as client:
        post(client, url, short_1, r)  # the connection and the queue of this r exist
        single = [post(client, url, long_60, r) for _ in range(repeats)]
    windows_60 = single[0][1]["windows"]
    bursts = []
    with ThreadPoolExecutor(60) as pool, httpx.Client(timeout=300, limits=httpx.Limits(max_connections=60)) as client:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda _: post(client, url, short_1, r), range(60)))
            bursts.append(time.perf_counter() - started)
    stop = threading.Event()
    threading.Timer(5.0, stop.set).start()
    alone = short_latencies(url, short_1, r, clients, stop)
    during: list[float] = []
    stop = threading.Event()
    with httpx.Client(timeout=600) as client:
        collector = threading.Thread(target=lambda: during.extend(short_latencies(url, short_1, r, clients, stop)))
        collector.start()
        long_s, long_answer = post(client, url, long_600, r)
        stop.set()
        collector.join()
    latency_60 = statistics.median(seconds for seconds, _ in single)
    burst = statistics.median(bursts)
    return {
        "r": int(r),
        "clip_60s_windows": windows_60,
        "clip_60s_latency_s": latency_60,
        "clip_60s_windows_per_s": windows_60 / latency_60,
        "burst_60x1s_s": burst,
        "burst_60x1s_windows_per_s": 60 / burst,
        "clip_600s_windows": long_answer["windows"],
        "clip_600s_latency_s": long_s,
        "short_alone_p50_ms": 1e3 * percentile(alone, 50),
        "short_alone_p99_ms": 1e3 * percentile(alone, 99),
        "short_during_p50_ms": 1e3 * percentile(during, 50),
        "short_during_p99_ms": 1e3 * percentile(during, 99),
        "short_during_count": len(during),
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| r | 60 s clip: windows, latency | windows/s: 60 s clip | windows/s: 60 x 1 s at once | 600 s clip: windows, latency "
        "| short p50 / p99 alone | short p50 / p99 during the 600 s clip |",
        "|---:|---|---:|---:|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['r']} | {row['clip_60s_windows']}, {row['clip_60s_latency_s']:.2f} s | {row['clip_60s_windows_per_s']:.0f} "
            f"| {row['burst_60x1s_windows_per_s']:.0f} | {row['clip_600s_windows']}, {row['clip_600s_latency_s']:.1f} s "
            f"| {row['short_alone_p50_ms']:.0f} / {row['short_alone_p99_ms']:.0f} ms "
            f"| {row['short_during_p50_ms']:.0f} / {row['short_during_p99_ms']:.0f} ms ({row['short_during_count']} requests) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("model_store/default"))
    parser.add_argument("--r", default="0,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="closed-loop short-request clients")
    parser.add_argument("--serve-args", default="--workers 1")
    parser.add_argument("--out", type=Path, default=Path("docs/loadtest/long_audio"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="long_audio_"))
    process, url = start(f"{sys.executable} -m fastast serve {args.serve_args}", args.model, work / "server.log")
    try:
        rows = [measure(url, r, args.repeats, args.clients, work) for r in args.r.split(",")]
    finally:
        process.terminate()
        process.wait(30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": str(args.model), "serve_args": args.serve_args, "rows": rows}, indent=2) + "\n")
    table = format_table(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
