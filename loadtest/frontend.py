"""Front-end benchmark: servers side by side on the same near-zero-cost model, clips and load, rounds interleaved.

    python -m loadtest.frontend --server "new-w2=fastast serve --workers 2" --server "old=..." --clips 1,10 \
        --rounds 3 --duration 8 --out docs/loadtest/frontend

Each --server is NAME=COMMAND; the command gets `--model DIR --port PORT --host 127.0.0.1` appended (peers under
loadtest/peers take the same flags) and is started once, then every (server, clip) case is driven by loadtest.loadgen in rotating order for `--rounds`
rounds, so drifting background load reaches every case alike. Reported per case: the median req/s, and the
server's CPU per request summed over its whole process tree, next to the load generator's own CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

from loadtest.loadgen import run_load


def random_model(directory: Path, config, labels: str = "speechcommands") -> Path:
    """An AST of the given ASTConfig with random weights in model-store layout (speed depends only on shapes)."""
    from fastast.model import ModelCard, save_model
    from fastast.model.ast import AST
    from fastast.model.card import InputSpec, bundled_labels
    from fastast.model.store import card_arch

    card = ModelCard(
        name=directory.name,
        arch=card_arch(config),
        input=InputSpec(target_length=config.target_length),
        labels=bundled_labels(labels),
        task="single-label" if labels == "speechcommands" else "multi-label",
        provenance={"source": "random weights for a benchmark"},
    )
    save_model(directory, AST(config).eval(), card)
    return directory


def near_zero_model(directory: Path, target_length: int = 128) -> Path:
    """A 16-wide, 1-block AST (1 s input by default): the model costs nothing, so what is measured is the service."""
    from fastast.model import ASTConfig

    return random_model(directory, ASTConfig(num_classes=35, dim=16, depth=1, heads=1, target_length=target_length))


def clip(directory: Path, seconds: int) -> Path:
    """A 16 kHz 16-bit WAV of a modulated tone plus noise."""
    rng = np.random.default_rng(seconds)
    t = np.arange(seconds * 16000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(len(t))
    path = directory / f"clip_{seconds}s.wav"
    sf.write(path, wave.astype(np.float32), 16000, subtype="PCM_16")
    return path


def upload(wav: bytes, multipart: bool) -> tuple[bytes, str]:
    """The request body and its Content-Type: the WAV itself, or a multipart/form-data form with it as field 'file'."""
    if not multipart:
        return wav, "audio/wav"
    boundary = "fastast-frontend-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    return head.encode() + wav + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    command: str, model: Path, log: Path, ready_path: str = "/readyz", timeout_s: float = 120.0
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [*shlex.split(command), "--model", str(model), "--port", str(port), "--host", "127.0.0.1"]
    with log.open("w") as out:
        # A session of its own, so that whatever a server leaves running after its SIGTERM can be killed with it.
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}{ready_path}", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{command}: not ready after {timeout_s:g} s; see {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", required=True, help="NAME=COMMAND (repeatable)")
    parser.add_argument("--ready", action="append", default=[], help="NAME=PATH: its readiness path (default /readyz)")
    parser.add_argument("--model", type=Path, help="serve this model_store folder instead of the near-zero model")
    parser.add_argument(
        "--target-length", type=int, default=128,
        help="the near-zero model's input frames: 128 (1 s) or 1024 (10 s, so a 10 s clip is one window, as in AudioSet)",
    )  # fmt: skip
    parser.add_argument("--clips", default="1,10", help="clip lengths in seconds")
    parser.add_argument("--r", type=int, default=0, help="the r every request asks for (the peers always run r=0)")
    parser.add_argument(
        "--multipart", action="store_true",
        help="post each clip as multipart/form-data field 'file' instead of the raw body (peers that take only forms)",
    )  # fmt: skip
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds a server may take to be ready")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastast-frontend"))
    parser.add_argument("--out", type=Path, help="write OUT.json (every run) and OUT.md (the table)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or near_zero_model(args.work / f"zero-{args.target_length}", args.target_length)
    clips = {int(s): clip(args.work, int(s)) for s in args.clips.split(",")}
    servers = dict(spec.split("=", 1) for spec in args.server)
    ready = dict(spec.split("=", 1) for spec in args.ready)
    running: dict[str, tuple[subprocess.Popen, str]] = {}
    cases = [(name, seconds) for name in servers for seconds in clips]
    uploads = {seconds: upload(path.read_bytes(), args.multipart) for seconds, path in clips.items()}
    runs: list[dict] = []
    try:
        for name, command in servers.items():
            log = args.work / f"{name}.log"
            running[name] = start(command, model, log, ready.get(name, "/readyz"), args.ready_timeout)
        for round_index in range(args.rounds):
            shift = round_index % len(cases)
            for name, seconds in cases[shift:] + cases[:shift]:
                process, url = running[name]
                body, content_type = uploads[seconds]
                report = run_load(
                    f"{url}/classify?r={args.r}", body, content_type=content_type, processes=args.processes,
                    connections=args.connections, duration=args.duration, warmup=args.warmup, server_pid=process.pid,
                )  # fmt: skip
                report.update(server=name, clip_s=seconds, round=round_index)
                print(json.dumps(report), flush=True)
                runs.append(report)
    finally:
        for process, _ in running.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in running.values():
            process.wait(60)
            stop_leftovers(process)
    table = format_table(runs, cases)
    print(table)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")


def stop_leftovers(process: subprocess.Popen) -> None:
    """Kill what a server left behind in its session after it exited (LitServe 0.2.16's processes outlive it)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
        print(f"killed processes pid {process.pid} left behind", file=sys.stderr)
    except ProcessLookupError:
        pass


def format_table(runs: list[dict], cases: list[tuple[str, int]]) -> str:
    lines = [
        "| server | clip | req/s (median) | server CPU ms / request | load generator CPU ms / request | non-200 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, seconds in cases:
        mine = [run for run in runs if run["server"] == name and run["clip_s"] == seconds]
        errors = sum(run["requests"] - run["ok"] for run in mine)
        lines.append(
            f"| {name} | {seconds} s | {statistics.median(r['req_per_s'] for r in mine):.0f} | "
            f"{statistics.median(r['server_cpu_ms_per_request'] for r in mine):.2f} | "
            f"{statistics.median(1e3 * r['loadgen_cpu_s'] / max(1, r['ok']) for r in mine):.2f} | {errors} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
