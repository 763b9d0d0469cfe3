"""The GPU figures of this product, in one bounded run: `bash scripts/gpu_check.sh` (it installs the wheels first).

Steps, each under its own time limit so one failure costs only its own slot:
1. `fastast bench`: random AST-base, 1024 frames, bf16, r = 0,10,20,30,40, next to transformers' AST (--vs-hf).
2. The batched Kaldi fbank on CUDA against the same code on the CPU (parity and clips/s).
3. `fastast serve --device cuda` under loadtest.loadgen (multi-process, reports its own CPU): a near-zero model
   (1 s and 10 s clips) and AST-base (10 s clips at several r), for each --workers count the server supports;
   service S/s next to step 1's bench S/s.
4. ONNX Runtime's CUDA provider: parity and speed against torch, where the installed onnxruntime has it.
5. (Only with --steps auto: about 4 minutes.) r=auto on AST-base under an open-loop ramp (loadtest.auto_ramp),
   beside fixed r=0 and fixed r=40: the model-bound run the CPU host could not give. Random weights have no r
   table, so --auto-max-r 40 sets the ladder and the expected accuracy column stays empty.
6. (Only with --steps compile: a few minutes of compiling.) `fastast bench --backend torch,torch-compile` on
   AST-base at the served r values: whether torch.compile graphs per r would pay on this GPU (the issue's item 6).

Everything lands in OUT (default /tmp/gpu_check): results.json with every figure, and the servers' log tails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "service"), str(ROOT)]

BENCH_BATCH = 64
BASE_R = (0, 10, 20, 30, 40)
SERVED_BASE_R = (0, 20, 40)


def fastast(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastast", *args]


def env() -> dict[str, str]:
    paths = [str(ROOT / "service"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_json(command: list[str], timeout: float) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout)


# ---- 1. model throughput ------------------------------------------------------------------------------------------


def base_bench(r_values: tuple[int, ...], *extra: str) -> list[str]:
    """`fastast bench` on a random AST-base at 1024 frames in bf16 on CUDA, at r_values, plus `extra` options."""
    return fastast(
        "bench", "--arch", "base", "--target-length", "1024", "--dtype", "bf16", "--device", "cuda",
        "--batch-size", str(BENCH_BATCH), "--r", ",".join(map(str, r_values)), "--warmup", "3", "--runs", "10",
        "--json", *extra,
    )  # fmt: skip


def bench_base() -> dict:
    return run_json(base_bench(BASE_R, "--vs-hf"), timeout=240)


def bench_compiled() -> dict:
    return run_json(base_bench(SERVED_BASE_R, "--backend", "torch,torch-compile"), timeout=420)


# ---- 2. fbank on the device ---------------------------------------------------------------------------------------


def fbank_parity() -> dict:
    import numpy as np
    import torch

    from fastast import features

    rng = np.random.default_rng(0)
    rate = 16000
    t = np.arange(10 * rate) / rate
    waves = np.stack(
        [0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(len(t)) for i in range(8)]
    ).astype(np.float32)
    cpu = features.kaldi_fbank(waves, rate)
    cuda = features.kaldi_fbank(torch.from_numpy(waves).cuda(), rate).cpu()
    report = {"clips": len(waves), "seconds_each": 10, "max_abs_diff": float((cpu - cuda).abs().max())}
    # The engine's path: clips of different lengths in one zero-padded batch, each with its length.
    lengths = [160_000, 95_000, 16_000, 401, 120_345, 64_000, 8_000, 150_000]
    padded = waves.copy()
    for row, length in zip(padded, lengths):
        row[length:] = 0.0
    spec = dict(target_length=1024, mean=-4.27, std=4.57)
    batched = features.featurize(torch.from_numpy(padded).cuda(), rate, **spec, lengths=lengths).cpu()
    solo = torch.cat([features.featurize(row[:length], rate, **spec) for row, length in zip(waves, lengths)])
    report["lengths_batch_cuda_vs_solo_cpu_max_abs_diff"] = float((batched - solo).abs().max())

    batch = torch.from_numpy(np.tile(waves, (8, 1))).cuda()  # 64 clips of 10 s
    timings = []
    for _ in range(13):
        torch.cuda.synchronize()
        start = time.perf_counter()
        features.kaldi_fbank(batch, rate)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    cuda_s = sorted(timings[3:])[len(timings[3:]) // 2]
    start = time.perf_counter()
    features.kaldi_fbank(batch.cpu(), rate)
    cpu_s = time.perf_counter() - start
    report.update(
        cuda_clips_per_s_10s=len(batch) / cuda_s, cpu_clips_per_s_10s=len(batch) / cpu_s, cpu_threads=torch.get_num_threads()
    )
    return report


# ---- 3. the service under load --------------------------------------------------------------------------------------


def make_models(directory: Path) -> dict[str, Path]:
    """A near-zero-cost model (16 wide, 1 block, 1 s) and AST-base at 1024 frames, random weights."""
    from fastast.model import ASTConfig
    from loadtest.frontend import near_zero_model, random_model

    base = ASTConfig.preset("base", 527, target_length=1024)
    return {"zero": near_zero_model(directory / "zero"), "base": random_model(directory / "base", base, "audioset")}


def make_clips(directory: Path) -> dict[str, Path]:
    from loadtest.frontend import clip

    return {f"{seconds}s": clip(directory, seconds) for seconds in (1, 10)}


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def serve_supports_workers() -> bool:
    help_text = subprocess.run(fastast("serve", "--help"), capture_output=True, text=True, env=env(), cwd=ROOT).stdout
    return "--workers" in help_text


def serve_case(model: Path, workers: int | None, loads: list[tuple[str, Path]], out: Path, port: int) -> list[dict]:
    """Start one server, drive each (r query, clip) in turn, stop it; one loadgen report per load."""
    from loadtest.loadgen import run_load

    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(model), "--device", "cuda", "--port", str(port), "--max-batch-size", str(BENCH_BATCH)]
    args += ["--max-queue", "1024", "--log-level", "warning"]
    if workers is not None:
        args += ["--workers", str(workers)]
    log_path = out / f"serve_{model.name}_w{workers or 0}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(fastast(*args), stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
    reports = []
    try:
        wait_ready(url, process)
        for query, clip in loads:
            report = run_load(
                f"{url}/classify?{query}", clip.read_bytes(), processes=4, connections=128, duration=8, warmup=2,
                server_pid=process.pid,
            )  # fmt: skip
            report.update(model=model.name, workers=workers or 0, clip=clip.name)
            print(json.dumps(report), flush=True)
            reports.append(report)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return reports


def serve_under_load(out: Path, work: Path) -> list[dict]:
    models, clips = make_models(work), make_clips(work)
    worker_counts: list[int | None] = [1, 4, 8] if serve_supports_workers() else [None]
    reports = []
    for index, workers in enumerate(worker_counts):
        zero = [("r=0", clips["1s"]), ("r=0", clips["10s"])]
        base = [(f"r={r}", clips["10s"]) for r in SERVED_BASE_R]
        reports += serve_case(models["zero"], workers, zero, out, 8700 + 2 * index)
        reports += serve_case(models["base"], workers, base, out, 8701 + 2 * index)
    return reports


# ---- 4. ONNX Runtime on CUDA -------------------------------------------------------------------------------------------


def onnxruntime_cuda(work: Path) -> dict:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    report: dict = {"version": onnxruntime.__version__, "providers": providers}
    if "CUDAExecutionProvider" not in providers:
        report["skipped"] = "this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
        return report
    model = work / "base"
    report["bench"] = run_json(
        fastast("bench", "--model", str(model), "--backend", "torch,onnxruntime", "--device", "cuda", "--dtype", "fp32",
                "--r", "0,20", "--batch-size", "16", "--runs", "5", "--json"),
        timeout=300,
    )  # fmt: skip
    return report


# ---- 5. r=auto under an open-loop ramp (optional) --------------------------------------------------------------------


def auto_ramp(out: Path, work: Path) -> dict:
    from loadtest.auto_ramp import main as ramp

    models, clips = make_models(work), make_clips(work)
    serve_args = f"--device cuda --workers 8 --max-batch-size {BENCH_BATCH} --max-queue 1024 --auto-max-r 40"
    ramp(["--model", str(models["base"]), "--audio", str(clips["10s"]), "--slo-ms", "500", "--levels", "0.5,1,1.5,2,3",
          "--level-s", "6", "--serve-args", serve_args, "--out", str(out / "auto_ramp")])  # fmt: skip
    return json.loads((out / "auto_ramp.json").read_text())


STEPS = {"bench": bench_base, "fbank": fbank_parity, "serve": serve_under_load, "onnxruntime": onnxruntime_cuda}
OPTIONAL_STEPS = {"auto": auto_ramp, "compile": bench_compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")))
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join([*STEPS, *OPTIONAL_STEPS])
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/gpu_check_work")
    work.mkdir(exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for name in args.steps.split(","):
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            step = {**STEPS, **OPTIONAL_STEPS}[name]
            needs = {"serve": (args.out, work), "onnxruntime": (work,), "auto": (args.out, work)}.get(name, ())
            results[name] = step(*needs)
        except Exception as exc:  # a failed step is recorded; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        results[name + "_s"] = round(time.monotonic() - started, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results[name])[:1500], flush=True)


if __name__ == "__main__":
    main()
