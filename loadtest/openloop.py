"""Open-loop Poisson load at a fixed rate, with raw keep-alive HTTP/1.1, recording each request's outcome.

Open loop: each request leaves at its scheduled time whether or not earlier ones have answered, so an overloaded
server faces the offered rate instead of slowing its clients down (closed-loop clients hide overload). Requests
reuse idle keep-alive connections (a fresh one when the server closed the idle one meanwhile) and open new ones
when none is idle, up to `max_in_flight` open requests; an arrival beyond that is recorded as status 0 (the
client could not send it), never delayed.

loadtest.ramp does the same with httpx over a rate shape; this one is for rates of hundreds to thousands of
requests per second on a small host, where httpx would spend more CPU than the server under test
(loadtest.loadgen explains the raw-socket client).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from loadtest.loadgen import build_request, read_response

MAX_IN_FLIGHT = 1024


@dataclass(frozen=True)
class Outcome:
    sent_s: float  # when the request left, from the start of the run
    latency_s: float
    status: int  # 0: not sent (too many open requests) or the connection failed
    r: int | None  # the r a 200 response ran at


def poisson_times(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process of `rate` per second over `duration`."""
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def run_open_loop(
    url: str, body: bytes, rate: float, duration: float, *, seed: int = 0, content_type: str = "audio/wav",
    max_in_flight: int = MAX_IN_FLIGHT,
) -> list[Outcome]:
    """Send Poisson arrivals at `rate` per second for `duration` seconds; one Outcome per arrival, by send time."""
    host, port, request = build_request(url, body, content_type)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    outcomes: list[Outcome] = []
    in_flight = 0
    start = time.monotonic()

    async def exchange(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> tuple[int, bool, bytes]:
        connection[1].write(request)
        return await read_response(connection[0])

    async def one(sent: float) -> None:
        nonlocal in_flight
        in_flight += 1
        connection = None
        status, r = 0, None
        try:
            if idle:
                connection = idle.pop()
                try:
                    status, keep_alive, answer = await exchange(connection)
                except (ConnectionError, asyncio.IncompleteReadError):  # the server closed it while it was idle
                    connection[1].close()
                    connection = None
            if connection is None:
                connection = await asyncio.open_connection(host, port)
                status, keep_alive, answer = await exchange(connection)
            if status == 200:
                r = json.loads(answer)["r"]
            if keep_alive:
                idle.append(connection)
            else:
                connection[1].close()
        except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError):
            if connection is not None:
                connection[1].close()
        finally:
            in_flight -= 1
        outcomes.append(Outcome(sent, time.monotonic() - start - sent, status, r))

    tasks = []
    for due in poisson_times(rate, duration, seed):
        await asyncio.sleep(max(0.0, due - (time.monotonic() - start)))
        sent = time.monotonic() - start
        if in_flight >= max_in_flight:
            outcomes.append(Outcome(sent, 0.0, 0, None))
            continue
        tasks.append(asyncio.create_task(one(sent)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return sorted(outcomes, key=lambda outcome: outcome.sent_s)
