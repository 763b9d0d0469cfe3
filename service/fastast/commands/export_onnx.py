"""`fastast export-onnx`: one ONNX graph per ToMe r, validated against PyTorch before it is written."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from fastast.export.spec import DEFAULT_OPSET, EXPORT_DTYPES, MAX_OPSET, MIN_OPSET

    parser = subparsers.add_parser(
        "export-onnx",
        help="export a model_store model to ONNX, one graph per r",
        description=(
            "Write r{N}.onnx for each r (Token Merging inside the graph, dynamic batch axis, input `features` "
            "[batch, target_length, mel], output `logits`) and the model card listing them. Each graph is checked "
            "with onnx.checker and against PyTorch on random and real audio at batch 1 and 5 before it is written."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model_store folder (model.safetensors + card.json)")
    parser.add_argument("--r", required=True, help="comma-separated r values, one graph each, e.g. 0,10,20")
    parser.add_argument("--out", type=Path, required=True, help="folder for the graphs and the card (may be --model)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}")
    parser.add_argument(
        "--dtype", choices=EXPORT_DTYPES, default="fp32", help="precision inside the graph (I/O stay float32)"
    )
    parser.add_argument(
        "--audio", type=Path, nargs="*", default=(), help="audio files to validate on (default: espeak-ng speech)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastast.export.onnx import export_onnx
    from fastast.export.spec import graph_file
    from fastast.model.tome import parse_r_values

    r_values = sorted(parse_r_values(args.r))
    card = export_onnx(args.model, args.out, r_values, opset=args.opset, dtype=args.dtype, audio=args.audio)
    spec = card.model_extra["onnx"]
    for r in spec["r"]:
        path = args.out / graph_file(r)
        size_mb = path.stat().st_size / 1e6
        print(f"{path}  {size_mb:.1f} MB  max |ORT - torch| {spec['max_abs_diff'][str(r)]:.2g}")
    print(f"{args.out / 'card.json'}: onnx r={spec['r']} opset {spec['opset']} {spec['dtype']}")
    return 0
