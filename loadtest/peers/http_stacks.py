"""What the HTTP layer alone costs per request: trivial apps that read a posted body and answer ~200 bytes of JSON,
under uvicorn (uvloop + httptools, as fastast's workers run) and Granian (Rust HTTP; ASGI and its own RSGI), as
a raw ASGI app and as a FastAPI route with a response model. No decode, no engine: the CPU per request measured
here is the floor that a Python worker pays before it does any work of its own.

    /tmp/peers-venv/bin/pip install granian    # 2.8.9 measured; not a dependency of fastast
    python -m loadtest.peers.http_stacks --python /tmp/peers-venv/bin/python --audio clip_1s.wav --rounds 3
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import time
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import BaseModel

from loadtest.frontend import free_port
from loadtest.loadgen import run_load

ANSWER = json.dumps({"model": "m", "r": 0, "labels": [{"label": "yes", "index": 1, "score": 0.9}] * 5}).encode()
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def raw(scope, receive, send) -> None:
    """The least an ASGI app can do: drain the body, answer."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


async def rsgi(scope, protocol) -> None:
    """Granian's own interface: the body in one await, the answer in one call."""
    await protocol()
    protocol.response_bytes(200, [("content-type", "application/json")], ANSWER)


class Label(BaseModel):
    label: str
    index: int
    score: float


class Answer(BaseModel):
    model: str
    r: int
    labels: list[Label]


fastapi_app = FastAPI()


@fastapi_app.post("/classify", response_model=Answer)
async def classify(request: Request) -> Answer:
    body = await request.body()
    return Answer(model="m", r=len(body) % 2, labels=[Label(label="yes", index=1, score=0.9)] * 5)


STACKS = {  # name: (server, app attribute)
    "uvicorn raw ASGI": ("uvicorn", "raw"),
    "Granian raw ASGI": ("granian", "raw"),
    "Granian RSGI": ("granian", "rsgi"),
    "uvicorn FastAPI": ("uvicorn", "fastapi_app"),
    "Granian FastAPI": ("granian", "fastapi_app"),
}


def command(python: str, server: str, app: str, port: int) -> list[str]:
    """One process, one event loop, no access log, for every stack."""
    target = f"loadtest.peers.http_stacks:{app}"
    if server == "uvicorn":
        return [python, "-m", "uvicorn", target, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning"]  # fmt: skip
    interface = "rsgi" if app == "rsgi" else "asgi"
    return [python, "-m", "granian", target, "--interface", interface, "--port", str(port), "--workers", "1",
            "--runtime-threads", "1", "--no-log"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="an interpreter with uvicorn, granian and fastapi")
    parser.add_argument("--audio", type=Path, required=True, help="the body to post")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    servers = {}
    for name, (server, app) in STACKS.items():
        port = free_port()
        process = subprocess.Popen(command(args.python, server, app, port), cwd=root, stdout=subprocess.DEVNULL)
        servers[name] = (process, port)
    time.sleep(6)  # every server is up well within this on a loaded 2-core machine
    body, names, runs = args.audio.read_bytes(), list(STACKS), []
    try:
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                process, port = servers[name]
                report = run_load(
                    f"http://127.0.0.1:{port}/classify", body, processes=1, connections=args.connections,
                    duration=args.duration, warmup=1, server_pid=process.pid,
                )  # fmt: skip
                runs.append({**report, "stack": name, "round": round_index})
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGINT)
            process.wait(30)
    print("| stack | req/s (median) | server CPU ms / request | load generator CPU ms / request | non-200 |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        mine = [run for run in runs if run["stack"] == name]
        print(
            f"| {name} | {statistics.median(r['req_per_s'] for r in mine):.0f} | "
            f"{statistics.median(r['server_cpu_ms_per_request'] for r in mine):.3f} | "
            f"{statistics.median(1e3 * r['loadgen_cpu_s'] / max(1, r['ok']) for r in mine):.3f} | "
            f"{sum(r['requests'] - r['ok'] for r in mine)} |"
        )


if __name__ == "__main__":
    main()
