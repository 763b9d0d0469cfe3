"""Record a load ramp: open-loop requests at a rising, then falling rate against a running `fastast serve`.

    python -m loadtest.ramp --url http://127.0.0.1:8000 --shape 0:2,90:40,120:40,150:5 --out docs/loadtest/ramp.csv

Open loop: each request leaves at its scheduled time whether or not earlier ones have answered, so the offered
load follows the shape even when the server falls behind (closed-loop clients would slow down with it). Arrivals
are Poisson with a piecewise-linear rate (`--shape`, seconds:requests-per-second points). The CSV has one row per
request: when it actually left (seconds from the start), its latency and its HTTP status (0: no answer).
`loadtest.autoscale` replays the per-second counts of such a recording against the scaling rule.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import time
from pathlib import Path

import httpx

from loadtest.audio import speech_bytes

MAX_IN_FLIGHT = 512  # bound on open requests; a send beyond it is recorded as status 0, never queued


def parse_shape(text: str) -> list[tuple[float, float]]:
    """'0:2,90:40' -> [(0.0, 2.0), (90.0, 40.0)]; times strictly increasing, rates >= 0."""
    points = [(float(t), float(rate)) for t, rate in (item.split(":") for item in text.split(",") if item.strip())]
    if len(points) < 2 or any(b[0] <= a[0] for a, b in zip(points, points[1:])) or any(r < 0 for _, r in points):
        raise ValueError(f"shape needs >= 2 points with increasing times and rates >= 0: {text!r}")
    return points


def rate_at(shape: list[tuple[float, float]], t: float) -> float:
    """The piecewise-linear rate at time t (0 outside the shape)."""
    for (t0, r0), (t1, r1) in zip(shape, shape[1:]):
        if t0 <= t <= t1:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return 0.0


def schedule(shape: list[tuple[float, float]], seed: int = 0) -> list[float]:
    """Poisson arrival times under the shape's rate, by thinning a process at the peak rate."""
    rng = random.Random(seed)
    peak = max(rate for _, rate in shape)
    t, end, times = shape[0][0], shape[-1][0], []
    while peak > 0:
        t += rng.expovariate(peak)
        if t >= end:
            break
        if rng.random() * peak < rate_at(shape, t):
            times.append(t)
    return times


async def record(url: str, audio: bytes, times: list[float]) -> list[tuple[float, float, int]]:
    """(sent_s, latency_ms, status) per scheduled request, sent open-loop at `times` seconds from now."""
    rows: list[tuple[float, float, int]] = []
    in_flight = 0
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        start = time.perf_counter()

        async def one(sent: float) -> None:
            nonlocal in_flight
            in_flight += 1
            try:
                response = await client.post(f"{url}/classify", content=audio, headers={"Content-Type": "audio/wav"})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            finally:
                in_flight -= 1
            rows.append((sent, (time.perf_counter() - start - sent) * 1000, status))

        tasks = []
        for due in times:
            await asyncio.sleep(max(0.0, due - (time.perf_counter() - start)))
            sent = time.perf_counter() - start
            if in_flight >= MAX_IN_FLIGHT:
                rows.append((sent, 0.0, 0))
                continue
            tasks.append(asyncio.create_task(one(sent)))
        await asyncio.gather(*tasks)
    return sorted(rows)


def write_csv(rows: list[tuple[float, float, int]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sent_s", "latency_ms", "status"])
        writer.writerows((f"{sent:.4f}", f"{latency:.1f}", status) for sent, latency, status in rows)


def read_sent_times(path: Path) -> list[float]:
    """The send times of a recording, in seconds from its start."""
    with path.open() as f:
        return [float(row["sent_s"]) for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ramp", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--shape", type=parse_shape, default=parse_shape("0:2,90:40,120:40,150:5"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--audio", help="audio file to post (default: espeak-ng speech)")
    parser.add_argument("--out", type=Path, default=Path("docs/loadtest/ramp.csv"))
    args = parser.parse_args(argv)

    times = schedule(args.shape, args.seed)
    rows = asyncio.run(record(args.url, speech_bytes(args.audio), times))
    write_csv(rows, args.out)
    ok = sum(1 for _, _, status in rows if status == 200)
    print(f"wrote {args.out}: {len(rows)} requests over {args.shape[-1][0]:.0f} s, {ok} answered 200")


if __name__ == "__main__":
    main()
