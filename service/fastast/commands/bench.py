"""`fastast bench`: samples/s of the AST against the ToMe r, next to the FLOPs merging saves."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastast.errors import FastASTError

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("torch", "torch-compile", "onnxruntime")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure samples/s against r (and against transformers' AST)",
        description=(
            "Time the forward pass at each r (r=0 is always timed: speedups are relative to it), interleaving "
            "all cases so background load hits them alike, and report medians with the analytic FLOP ratio."
        ),
    )
    parser.add_argument("--model", type=Path, help="model_store folder (model.safetensors + card.json)")
    parser.add_argument("--arch", help="random-weight AST instead of --model: tiny, small or base")
    parser.add_argument("--target-length", default="1024", help="input frames for --arch (default 1024)")
    parser.add_argument("--num-classes", default="527", help="output classes for --arch (default 527)")
    parser.add_argument("--r", default="0,10,20,30,40", help="comma-separated r values (default 0,10,20,30,40)")
    parser.add_argument("--batch-size", default="8", help="samples per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (the weights are cast)")
    parser.add_argument("--warmup", default="3", help="untimed calls per case first (default 3)")
    parser.add_argument("--runs", default="10", help="timed calls per case; the median is reported (default 10)")
    parser.add_argument("--threads", help="CPU threads for torch (default: torch's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--vs-hf", action="store_true", help="also time transformers' AST (sdpa) with the same weights")
    parser.add_argument(
        "--backend",
        default="torch",
        help="torch, torch-compile (torch.compile, one graph per r, compiled during the warm-up) and/or onnxruntime, "
        "comma-separated; the first is the reference",
    )
    parser.add_argument(
        "--onnx", type=Path, help="exported graphs for onnxruntime (default: --model's, else exported for this run)"
    )
    parser.set_defaults(func=run)


def int_arg(name: str, text: str, minimum: int) -> int:
    """A whole-number option, refused with a one-line message (argparse would print its usage too)."""
    try:
        value = int(text)
    except ValueError:
        raise FastASTError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise FastASTError(f"{name} must be at least {minimum}, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    import torch

    from fastast import bench
    from fastast.device import resolve_device
    from fastast.model import tome

    rs = tome.parse_r_values(args.r)
    batch_size = int_arg("--batch-size", args.batch_size, 1)
    warmup = int_arg("--warmup", args.warmup, 0)
    runs = int_arg("--runs", args.runs, 1)
    if args.threads is not None:
        torch.set_num_threads(int_arg("--threads", args.threads, 1))
    if args.device not in DEVICES:
        raise FastASTError(f"unknown device {args.device!r}; choose one of {', '.join(DEVICES)}")
    if args.dtype not in bench.DTYPES:
        raise FastASTError(f"unknown dtype {args.dtype!r}; choose one of {', '.join(bench.DTYPES)}")
    backend_names = args.backend.split(",")
    if not set(backend_names) <= set(BACKENDS) or len(set(backend_names)) != len(backend_names):
        raise FastASTError(f"--backend takes {', '.join(BACKENDS)}, comma-separated, got {args.backend!r}")
    if (args.model is None) == (args.arch is None):
        raise FastASTError("give either --model DIR or --arch tiny|small|base")
    device = torch.device(resolve_device(args.device))

    if args.model is not None:
        network, name = load_network(args.model)
    else:
        target_length = int_arg("--target-length", args.target_length, 1)
        num_classes = int_arg("--num-classes", args.num_classes, 1)
        network, name = bench.random_network(args.arch, target_length, num_classes), args.arch
    dtype = bench.DTYPES[args.dtype]
    network.to(device=device, dtype=dtype)
    runners = {"torch": lambda features, r: network(features, r)}
    if "torch-compile" in backend_names:
        runners["torch-compile"] = bench.compiled_runner(network, rs)
    if "onnxruntime" in backend_names:
        from fastast.export.ort import runner_for

        timed_r = rs if 0 in rs else [0, *rs]
        onnx = runner_for(args.model, timed_r, onnx_dir=args.onnx, device=args.device, dtype=args.dtype)
        runners["onnxruntime"] = onnx.run
    backends = [bench.Backend(backend, runners[backend]) for backend in backend_names]
    if args.vs_hf:
        backends.append(bench.hf_backend(network))
    features = bench.make_features(network.config, batch_size, device, dtype)
    report = bench.run_bench(backends, network.config, features, rs, warmup=warmup, runs=runs, arch=name)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(bench.format_table(report))
    return 0


def load_network(directory: Path):
    """The AST inside a model_store folder, on the CPU in float32 (moved and cast by the caller)."""
    from fastast.model.ast import AST
    from fastast.model.store import load_model

    model = load_model(directory)
    if not isinstance(model.net, AST):
        raise FastASTError(f"{directory}: bench times AST models only, this is {model.card.arch.get('type')!r}")
    return model.net, model.card.name
