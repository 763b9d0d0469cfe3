"""A cheap, multi-process, closed-loop HTTP load generator that reports its own CPU and the server's.

    python -m loadtest.loadgen --url 'http://127.0.0.1:8000/classify?r=8' --audio clip.wav \
        --processes 4 --connections 64 --duration 10 --server-pid 1234

Why not wrk or locust: wrk is absent on the GPU host (no registry there), and httpx/locust spend more CPU per
request than the server under test, so on a small host they measure themselves. Each process here keeps its
share of the connections busy with keep-alive POSTs written as raw HTTP/1.1 over asyncio streams (uvloop when
installed), which costs a few tens of microseconds per request.

Prints one JSON object: requests/s, latency percentiles, status counts, the generator's CPU seconds, and
(with --server-pid) the CPU seconds of the server's whole process tree during the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def build_request(url: str, body: bytes, content_type: str) -> tuple[str, int, bytes]:
    """(host, port, the full request bytes) for POSTing body to url, keep-alive."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"loadgen: only http://host:port/path URLs, got {url!r}")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return parts.hostname, parts.port or 80, head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, whether the server keeps the connection open, body)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split(b" ", 2)[1])
    length, keep_alive = None, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
    if length is None:
        raise ConnectionError("response without Content-Length")
    return status, keep_alive, await reader.readexactly(length)


async def _client(host: str, port: int, request: bytes, start: float, stop: float, out: dict) -> None:
    """One connection posting back to back until `stop`; records requests that end after `start`."""
    reader = writer = None
    while time.monotonic() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            sent = time.monotonic()
            writer.write(request)
            status, keep_alive, _ = await read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError):
            out["status"]["conn_error"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
            continue
        done = time.monotonic()
        if done >= start:
            out["status"][str(status)] += 1
            out["latencies"].append(done - sent)
        if not keep_alive:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def _worker(args: tuple) -> dict:
    host, port, request, connections, start, stop = args
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out: dict = {"status": Counter(), "latencies": []}

    async def main() -> None:
        await asyncio.gather(*(_client(host, port, request, start, stop, out) for _ in range(connections)))

    cpu = time.process_time()
    asyncio.run(main())
    out["cpu_s"] = time.process_time() - cpu
    return out


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and all its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        cpu[child] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += cpu.get(current, 0.0)
        stack.extend(children.get(current, []))
    return total


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def run_load(
    url: str,
    body: bytes,
    *,
    processes: int,
    connections: int,
    duration: float,
    warmup: float,
    content_type: str = "audio/wav",
    server_pid: int | None = None,
) -> dict:
    """Drive url closed-loop; the measured window is the `duration` seconds after `warmup`."""
    host, port, request = build_request(url, body, content_type)
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    start = time.monotonic() + 0.5 + warmup  # 0.5 s for the processes to start
    stop = start + duration
    with mp.get_context("fork").Pool(processes) as pool:
        pending = pool.map_async(_worker, [(host, port, request, n, start, stop) for n in shares])
        time.sleep(max(0.0, start - time.monotonic()))
        server_cpu = tree_cpu_seconds(server_pid) if server_pid else None
        time.sleep(max(0.0, stop - time.monotonic()))
        if server_pid:
            server_cpu = tree_cpu_seconds(server_pid) - server_cpu
        results = pending.get(timeout=duration + warmup + 60)
    status: Counter = sum((r["status"] for r in results), Counter())
    latencies = [x for r in results for x in r["latencies"]]
    ok = status.get("200", 0)
    report = {
        "url": url,
        "processes": processes,
        "connections": connections,
        "duration_s": duration,
        "requests": sum(status.values()),
        "ok": ok,
        "req_per_s": ok / duration,
        "status": dict(status),
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "loadgen_cpu_s": sum(r["cpu_s"] for r in results),
    }
    if server_cpu is not None:
        report["server_cpu_s"] = server_cpu
        report["server_cpu_ms_per_request"] = 1e3 * server_cpu / max(1, ok)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="http://host:port/classify?r=...")
    parser.add_argument("--audio", required=True, type=Path, help="the file posted as the raw body")
    parser.add_argument("--content-type", default="audio/wav")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--server-pid", type=int, help="also report this process tree's CPU")
    args = parser.parse_args(argv)
    report = run_load(
        args.url,
        args.audio.read_bytes(),
        processes=args.processes,
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup,
        content_type=args.content_type,
        server_pid=args.server_pid,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
