"""r=auto under an open-loop load ramp: fixed r=0, fixed at the highest auto r, and r=auto, side by side.

    python -m loadtest.auto_ramp --model model_store/default --slo-ms 200 --out docs/loadtest/auto_ramp

Starts the three servers (same model, limits and SLO; only --default-r differs), measures the r=0 server's
capacity closed-loop, then offers each server Poisson arrivals at 0.5x ... 3x that capacity, one level at a
time, rotating which server goes first. Per level and server: p50/p99 latency of the answered requests,
goodput (answered 200 within the SLO, per second), 429s, the mean r used and the accuracy expected from the
card's r table at the r values actually used. Writes OUT.md, OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadtest.frontend import clip, start
from loadtest.loadgen import percentile, run_load
from loadtest.openloop import Outcome, run_open_loop

DRAIN_S = 2.0  # pause after each level, so one server's backlog never overlaps the next measurement


def summarize(outcomes: list[Outcome], seconds: float, slo_s: float, accuracy: dict[int, float]) -> dict:
    answered = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_s for o in answered]
    used = [o.r for o in answered if o.r is not None]
    known = [accuracy[r] for r in used if r in accuracy]
    return {
        "offered_per_s": len(outcomes) / seconds,
        "ok": len(answered),
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "goodput_per_s": sum(1 for x in latencies if x <= slo_s) / seconds,
        "rejected_429": sum(1 for o in outcomes if o.status == 429),
        "other_errors": sum(1 for o in outcomes if o.status not in (200, 429)),
        "mean_r": sum(used) / len(used) if used else float("nan"),
        "expected_accuracy": sum(known) / len(known) if len(known) == len(used) and known else float("nan"),
    }


def model_info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
        return json.load(response)["models"][0]


def format_table(results: list[dict], slo_ms: float) -> str:
    lines = [
        f"| load (x r=0 capacity) | offered req/s | server | p50 ms | p99 ms | goodput/s (<= {slo_ms:g} ms) | 429s | mean r | expected accuracy |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['level']:g} | {row['offered_per_s']:.0f} | {row['server']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} "
            f"| {row['goodput_per_s']:.0f} | {row['rejected_429']} | {row['mean_r']:.1f} | {row['expected_accuracy']:.4f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], servers: list[str], slo_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("p99_ms", "p99 latency (ms)"), ("goodput_per_s", "goodput (req/s within SLO)"),
               ("rejected_429", "429s per level"), ("mean_r", "mean r used")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(18, 4))
    for axis, (key, title) in zip(axes, metrics):
        for server in servers:
            rows = [row for row in results if row["server"] == server]
            axis.plot([row["level"] for row in rows], [row[key] for row in rows], marker="o", label=server)
        if key == "p99_ms":
            axis.axhline(slo_ms, color="grey", linestyle="--", label="SLO")
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("offered load (x r=0 capacity)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("model_store/default"))
    parser.add_argument("--slo-ms", type=float, default=200.0)
    parser.add_argument("--levels", default="0.5,1,1.5,2,2.5,3", help="offered load as multiples of r=0 capacity")
    parser.add_argument("--level-s", type=float, default=10.0, help="seconds of load per level and server")
    parser.add_argument("--serve-args", default="--workers 1 --max-batch-size 8 --max-queue 64",
                        help="flags every server gets (besides --default-r and --slo-ms)")
    parser.add_argument("--audio", type=Path, help="the clip posted (default: a 1 s tone with noise)")
    parser.add_argument("--out", type=Path, default=Path("docs/loadtest/auto_ramp"))
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    work = Path(tempfile.mkdtemp(prefix="auto_ramp_"))
    body = (args.audio or clip(work, 1)).read_bytes()
    command = f"{sys.executable} -m fastast serve {args.serve_args} --slo-ms {args.slo_ms}"
    processes, urls = [], {}
    try:
        for name, default_r in (("r=auto", "auto"), ("r=0", "0")):
            process, urls[name] = start(f"{command} --default-r {default_r}", args.model, work / f"{default_r}.log")
            processes.append(process)
        info = model_info(urls["r=auto"])
        top = info["auto"]["max_r"]
        accuracy = {point["r"]: point["value"] for point in info["pareto"]}
        process, urls[f"r={top}"] = start(f"{command} --default-r {top}", args.model, work / f"{top}.log")
        processes.append(process)
        servers = ["r=0", f"r={top}", "r=auto"]
        capacity = run_load(f"{urls['r=0']}/classify", body, processes=1, connections=32, duration=8, warmup=2)["req_per_s"]
        print(f"r=0 capacity: {capacity:.0f} req/s; auto ladder {info['auto']['ladder']}", file=sys.stderr)
        results = []
        for i, level in enumerate(float(x) for x in args.levels.split(",")):
            for server in servers[i % 3 :] + servers[: i % 3]:
                outcomes = asyncio.run(run_open_loop(f"{urls[server]}/classify", body, level * capacity, args.level_s, seed=i))
                row = {"level": level, "server": server, **summarize(outcomes, args.level_s, args.slo_ms / 1000, accuracy)}
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
                time.sleep(DRAIN_S)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    results.sort(key=lambda row: (row["level"], servers.index(row["server"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "slo_ms": args.slo_ms, "serve_args": args.serve_args, "r0_capacity_per_s": capacity,
              "auto": info["auto"], "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = format_table(results, args.slo_ms)
    args.out.with_suffix(".md").write_text(table + "\n")
    try:
        plot(results, servers, args.slo_ms, args.out.with_suffix(".png"))
    except ImportError:  # the GPU host may lack matplotlib: the table and the JSON still stand
        print("matplotlib is not installed: no PNG", file=sys.stderr)
    print(table)


if __name__ == "__main__":
    main()
