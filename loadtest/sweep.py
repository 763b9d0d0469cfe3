"""Drive a running `fastast serve` at saturation for each r and tabulate S/s and latency against r.

    python -m loadtest.sweep --url http://127.0.0.1:8000 --r 0,10,20,30,40 --concurrency 32 --duration 20

Closed-loop clients (each posts the next request as soon as the last one answers) keep the batcher full.
Writes OUT.csv and OUT.md (r, concurrency, S/s, p50/p95/p99 latency, mean batch size, errors) and OUT.png
(S/s and p99 against r, one line per concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from loadtest.audio import speech_bytes
from loadtest.loadgen import percentile


@dataclass
class SweepRow:
    r: int
    concurrency: int
    samples_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float
    ok: int
    errors: int


async def run_level(url: str, audio: bytes, r: int, concurrency: int, duration: float, warmup: float) -> SweepRow:
    """Saturate the server at one (r, concurrency) for `duration` seconds after `warmup` seconds."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    counts = {"ok": 0, "errors": 0}
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    headers = {"Content-Type": "audio/wav"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while (sent := time.perf_counter()) < stop_at:
            try:
                response = await client.post(f"{url}/classify", params={"r": r}, content=audio, headers=headers)
                ok = response.status_code == 200
                body = response.json() if ok else None
            except httpx.HTTPError:
                ok, body = False, None
            done = time.perf_counter()
            if sent < measure_from or done > stop_at:
                continue
            if ok:
                counts["ok"] += 1
                latencies.append((done - sent) * 1000)
                batch_sizes.append(body["batch_size"])
            else:
                counts["errors"] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return SweepRow(
        r=r,
        concurrency=concurrency,
        samples_per_s=counts["ok"] / duration,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        mean_batch_size=statistics.fmean(batch_sizes) if batch_sizes else 0.0,
        ok=counts["ok"],
        errors=counts["errors"],
    )


def write_outputs(rows: list[SweepRow], out: Path) -> list[Path]:
    """OUT.csv, OUT.md and OUT.png; returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out.with_suffix(".csv"), out.with_suffix(".md"), out.with_suffix(".png")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    lines = [
        "| r | concurrency | S/s | p50 ms | p95 ms | p99 ms | mean batch | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {x.r} | {x.concurrency} | {x.samples_per_s:.1f} | {x.p50_ms:.0f} | {x.p95_ms:.0f} | {x.p99_ms:.0f} "
        f"| {x.mean_batch_size:.1f} | {x.errors} |"
        for x in rows
    ]
    md_path.write_text("\n".join(lines) + "\n")
    plot(rows, png_path)
    return [csv_path, md_path, png_path]


def plot(rows: list[SweepRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_sps, ax_p99) = plt.subplots(1, 2, figsize=(10, 4))
    for concurrency in sorted({x.concurrency for x in rows}):
        level = sorted((x for x in rows if x.concurrency == concurrency), key=lambda x: x.r)
        rs = [x.r for x in level]
        ax_sps.plot(rs, [x.samples_per_s for x in level], marker="o", label=f"concurrency {concurrency}")
        ax_p99.plot(rs, [x.p99_ms for x in level], marker="o", label=f"concurrency {concurrency}")
    ax_sps.set(xlabel="r (tokens merged per block)", ylabel="samples/s", title="Throughput vs r")
    ax_p99.set(xlabel="r (tokens merged per block)", ylabel="p99 latency (ms)", title="p99 latency vs r")
    for ax in (ax_sps, ax_p99):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--r", type=int_list, default=[0, 10, 20, 30, 40], help="comma-separated r values")
    parser.add_argument("--concurrency", type=int_list, default=[32], help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per (r, concurrency)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--audio", help="audio file to post (default: espeak-ng speech)")
    parser.add_argument("--out", type=Path, default=Path("docs/loadtest/sweep"), help="output path without suffix")
    args = parser.parse_args(argv)

    audio = speech_bytes(args.audio)
    rows = []
    for concurrency in args.concurrency:
        for r in args.r:
            row = asyncio.run(run_level(args.url, audio, r, concurrency, args.duration, args.warmup))
            print(
                f"r={row.r:<3} c={row.concurrency:<3} {row.samples_per_s:8.1f} S/s  p50 {row.p50_ms:7.0f} ms  "
                f"p99 {row.p99_ms:7.0f} ms  batch {row.mean_batch_size:5.1f}  errors {row.errors}",
                flush=True,
            )
            rows.append(row)
    for path in write_outputs(rows, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
