"""`fastast bench`: the CLI's table and JSON, the analytic FLOP ratio and token counts, argument errors.

No timing assertions: throughput is measured by the benchmark itself (docs/BENCHMARKS.md), not by tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastast import bench
from fastast.cli import main
from fastast.model.ast import AST, ASTConfig

TINY = ["bench", "--arch", "tiny", "--target-length", "64", "--num-classes", "5", "--batch-size", "1", "--warmup", "1", "--runs", "2", "--device", "cpu"]
RESULT_KEYS = {"r", "samples_per_s", "speedup", "flops_ratio", "tokens_out", "ms_per_batch", "ms_per_batch_min"}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*TINY, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_has_one_row_per_r(capsys):
    code, out, err = run_cli(capsys, "--r", "0,4,20")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [0, 4, 20]
    # 64 frames: 12 x 5 patches + 2 = 62 tokens. r=4 never clamps: 62 - 12 * 4 = 14.
    # r=20: 62 42 22, then the clamp (t - 2) // 2 takes over: 12 7 5 4 3 and 3 from then on.
    assert [int(row[1]) for row in rows] == [62, 14, 3]  # tokens_out column
    assert "samples/s" in out and "flops_ratio" in out


def test_json_report(capsys):
    code, out, err = run_cli(capsys, "--r", "10,30", "--json", "--vs-hf", "--target-length", "128", "--runs", "1")
    assert code == 0, err
    report = json.loads(out)
    assert {"arch", "batch_size", "device", "dtype", "torch", "date", "results", "baselines"} <= set(report)
    assert (report["arch"], report["batch_size"], report["device"], report["dtype"]) == ("tiny", 1, "cpu", "fp32")
    assert report["torch"] == torch.__version__
    results = report["results"]
    assert [row["r"] for row in results] == [0, 10, 30]  # r=0 is always timed: speedups refer to it
    for row in results:
        assert RESULT_KEYS <= set(row)
        assert row["samples_per_s"] > 0
    assert results[0]["speedup"] == 1.0 and results[0]["flops_ratio"] == 1.0
    assert results[0]["tokens_out"] == 146 and results[1]["tokens_out"] == 26
    (hf,) = report["baselines"]
    assert hf["backend"] == "transformers-sdpa" and hf["r"] == 0 and hf["samples_per_s"] > 0
    assert hf["max_abs_diff"] < 1e-4  # the same weights, so the same logits: like is timed against like


def test_flops_ratio_is_one_at_r0_and_falls_with_r():
    config = ASTConfig.preset("base", 527, target_length=512)
    ratios = [bench.encoder_flops(config, r) / bench.encoder_flops(config, 0) for r in (0, 10, 20, 30, 40)]
    assert ratios[0] == 1.0
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert 0 < ratios[-1] < 1


def counted_block_flops(network: AST, features: torch.Tensor, r: int) -> int:
    """FLOPs of the blocks' attention and MLP modules as torch's own counter sees them (math SDPA, so the
    attention matmuls are visible as bmm); the ToMe matching between them is not part of either."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        network(features, r)
    counts = counter.get_flop_counts()
    modules = [f"AST.blocks.{i}.{part}" for i in range(network.config.depth) for part in ("attn", "mlp")]
    return sum(sum(counts[name].values()) for name in modules)


@pytest.mark.parametrize("r", [0, 7, 40])
def test_encoder_flops_match_torch_flop_counter(r):
    config = ASTConfig(num_classes=3, dim=32, depth=3, heads=2, target_length=64)
    network = AST(config).eval()
    features = torch.randn(2, config.target_length, config.num_mel_bins)
    assert bench.encoder_flops(config, r) * 2 == counted_block_flops(network, features, r)


@pytest.mark.parametrize(
    ("target_length", "r", "expected"),
    [(128, 10, 26), (128, 25, 3), (512, 10, 482), (512, 25, 302), (512, 50, 27), (512, 75, 5), (1024, 100, 58)],
)
def test_tokens_out_matches_reference_table(target_length, r, expected):
    """Reference section 4.7: tokens after 12 blocks of constant r (146, 602 and 1214 tokens in)."""
    assert bench.tokens_out(ASTConfig.preset("base", 527, target_length=target_length), r) == expected


def test_tokens_out_by_hand():
    """146 tokens, r=10: 144 patches lose 10 per block for 11 blocks (146 - 110 = 36), then the
    12th block may merge only (36 - 2) // 2 = 17 >= 10, so 26 remain; r=70 clamps at the first block."""
    config = ASTConfig.preset("tiny", 5, target_length=128)
    assert bench.tokens_out(config, 10) == 146 - 12 * 10
    assert bench.tokens_out(config, 70) == 3  # 146 -> 76 -> 39 -> 21 -> 12 -> 7 -> 5 -> 4 -> 3 -> 3 ...


def test_model_dir_backend(capsys, tiny_model_dir):
    code = main(["bench", "--model", str(tiny_model_dir), "--r", "0,5", "--batch-size", "1", "--warmup", "0", "--runs", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["arch"] == "tiny" and report["tokens_in"] == 146
    assert [row["tokens_out"] for row in report["results"]] == [146, 146 - 4 * 5]


def test_another_backend_plugs_in_as_a_runner():
    """Any callable (features, r) -> logits is a backend; a merging one is timed at every r and compared."""
    network = bench.random_network("tiny", 64, 5)
    calls = []

    def runner(features, r):
        calls.append(r)
        return network(features, r)

    backends = [bench.Backend("fastast", lambda f, r: network(f, r)), bench.Backend("other", runner)]
    features = bench.make_features(network.config, 1, torch.device("cpu"), torch.float32)
    report = bench.run_bench(backends, network.config, features, [20], warmup=0, runs=1, arch="tiny")
    assert sorted(set(calls)) == [0, 20]
    assert [(b.backend, b.r) for b in report.baselines] == [("other", 0), ("other", 20)]
    assert all(b.max_abs_diff == 0.0 and math.isfinite(b.ratio) for b in report.baselines)


def test_torch_compile_backend_builds_a_graph_per_r_with_the_same_logits():
    """--backend torch-compile: inductor compiles during each r's warm-up (one graph per r, nothing left to eager)
    and its logits match the eager network's. A 1-block, 16-wide AST keeps the CPU compile to seconds."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    network = AST(ASTConfig(num_classes=5, dim=16, depth=1, heads=1, target_length=64)).eval()
    backends = [bench.Backend("torch", lambda f, r: network(f, r)), bench.Backend("torch-compile", bench.compiled_runner(network, [0, 4]))]
    features = bench.make_features(network.config, 2, torch.device("cpu"), torch.float32)
    report = bench.run_bench(backends, network.config, features, [4], warmup=1, runs=1, arch="micro")
    assert [(b.backend, b.r) for b in report.baselines] == [("torch-compile", 0), ("torch-compile", 4)]
    assert all(b.max_abs_diff < 1e-5 and b.samples_per_s > 0 for b in report.baselines)
    assert counters["stats"]["unique_graphs"] >= 2  # r=0 and r=4 each got a compiled graph


def test_cases_are_timed_in_interleaved_rotating_rounds():
    """Background load drifts: each round runs every case once, and no case always goes first."""
    calls = []
    cases = [(lambda f, r, name=name: calls.append(name), 0) for name in "abc"]
    times = bench.time_cases(cases, torch.zeros(1), warmup=1, runs=3)
    assert [len(t) for t in times] == [3, 3, 3]
    assert calls == list("abc" + "abc" + "bca" + "cab")  # warm-up, then rounds starting at a, b, c


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--r", "0,-5"], "r must be >= 0"),
        (["--r", "a,b"], "--r takes comma-separated integers"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--runs", "x"], "--runs must be an integer"),
        (["--arch", "huge"], "unknown arch 'huge'"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--device", "tpu"], "unknown device"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--backend", "torch,tensorrt"], "--backend takes torch, torch-compile, onnxruntime"),
        (["--model", "/nonexistent"], "either --model DIR or --arch"),
        (["--target-length", "8"], "shorter than one 16-frame patch"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, args, message):
    code = main([*TINY, *args])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("fastast bench: error:")


def test_bench_module_needs_only_torch():
    """The benchmark runs on a bare GPU box: no server, training, model-store or transformers imports."""
    heavy = ["pydantic", "safetensors", "fastapi", "uvicorn", "prometheus_client", "transformers", "onnxruntime", "timm"]
    script = (
        "import sys\n"
        f"for name in {heavy!r}: sys.modules[name] = None\n"
        "import torch\n"
        "from fastast import bench\n"
        "net = bench.random_network('tiny', 64, 3)\n"
        "features = bench.make_features(net.config, 1, torch.device('cpu'), torch.float32)\n"
        "b = bench.Backend('fastast', lambda f, r: net(f, r))\n"
        "print(bench.format_table(bench.run_bench([b], net.config, features, [4], warmup=0, runs=1, arch='tiny')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "flops_ratio" in done.stdout
