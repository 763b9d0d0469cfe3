"""`fastast predict`: classify audio files offline with a model_store model at a chosen ToMe r."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastast.errors import FastASTError, InvalidAudioError, InvalidRError

BATCH = 16  # files per forward pass; results do not depend on it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify audio files with a model_store model",
        description="Print the top-k labels of each audio file (WAV, FLAC, OGG, MP3).",
    )
    parser.add_argument("--model", type=Path, required=True, help="model_store folder (model.safetensors + card.json)")
    parser.add_argument(
        "--r", default="0", help="ToMe tokens merged per block: an int, or a comma-separated list with one per block"
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels to print per file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--allow-unverified", action="store_true", help="load weights whose card has no weights_sha256 (with a warning)"
    )
    parser.add_argument("audio", nargs="+", type=Path, help="audio files")
    parser.set_defaults(func=run)


def parse_r_arg(text: str) -> int | list[int]:
    """'20' -> 20, '8,8,4,0' -> [8, 8, 4, 0]; range and length are checked against the model later."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidRError(f"r must be an integer or a comma-separated list of integers, got {text!r}") from None
    return values if "," in text else values[0]


def read_audio(path: Path, sample_rate: int):
    """One file as mono float32 at the model's rate; errors name the file."""
    from fastast.audio import load_audio

    try:
        return load_audio(path, sample_rate=sample_rate)
    except InvalidAudioError as exc:
        message = str(exc)
        raise InvalidAudioError(message if str(path) in message else f"{path}: {message}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from fastast.device import resolve_device
    from fastast.model import tome
    from fastast.model.ast import AST
    from fastast.model.store import load_model

    r = parse_r_arg(args.r)
    if args.top_k < 1:
        raise FastASTError(f"--top-k must be at least 1, got {args.top_k}")
    model = load_model(args.model, device=resolve_device(args.device), allow_unverified=args.allow_unverified)
    if isinstance(model.net, AST):
        tome.parse_r(r, model.net.config.depth)  # refuse a bad schedule before any audio is read
    spec = model.card.input
    waves = [read_audio(path, spec.sample_rate) for path in args.audio]
    k = min(args.top_k, model.card.num_classes)
    results = []
    with torch.inference_mode():
        for start in range(0, len(waves), BATCH):
            features = torch.cat([model.featurize(wave, spec.sample_rate) for wave in waves[start : start + BATCH]])
            scores = model.scores(model(features, r)).cpu()
            top = scores.topk(k, dim=-1)
            for offset, (values, indices) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                path = args.audio[start + offset]
                duration = len(waves[start + offset]) / spec.sample_rate
                labels = [model.card.labels[i] for i in indices]
                top_k = [
                    {"index": label.index, "mid": label.mid, "label": label.display_name, "score": score}
                    for label, score in zip(labels, values)
                ]
                results.append({"file": str(path), "seconds": round(duration, 3), "top": top_k})
    if args.json:
        document = {
            "model": model.card.name,
            "task": model.card.task,
            "r": r,
            "device": str(model.device),
            "results": results,
        }
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        print_table(results, model.card.name, r)
    return 0


def print_table(results: list[dict], model_name: str, r: int | list[int]) -> None:
    print(f"model {model_name}, r={r}")
    for result in results:
        print(f"\n{result['file']}  ({result['seconds']:.2f} s)")
        width = max(len(entry["label"]) for entry in result["top"])
        for rank, entry in enumerate(result["top"], 1):
            print(f"  {rank:>2}  {entry['label']:<{width}}  {entry['score']:.4f}")
