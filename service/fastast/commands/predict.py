"""`fastast predict`: classify audio files offline with a model_store model at a chosen ToMe r."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastast.errors import FastASTError, InvalidAudioError, InvalidRError
from fastast.windows import AGGREGATES, DEFAULT_MULTI_LABEL_AGGREGATE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fastast.model.card import InputSpec

BATCH = 16  # windows per forward pass, across files; results do not depend on it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify audio files with a model_store model",
        description="Print the top-k labels of each audio file (WAV, FLAC, OGG, MP3). Audio longer than the model's "
        "window is classified whole, in overlapping windows whose scores make one answer per file.",
    )
    parser.add_argument("--model", type=Path, required=True, help="model_store folder (model.safetensors + card.json)")
    parser.add_argument(
        "--r", default="0", help="ToMe tokens merged per block: an int, or a comma-separated list with one per block"
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels to print per file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument(
        "--hop-s", type=float, default=None, help="seconds between window starts on long audio (default: half a window)"
    )
    parser.add_argument(
        "--aggregate",
        default=None,
        help=f"how window scores make a file's answer: {' or '.join(AGGREGATES)} (multi-label models; default "
        f"{DEFAULT_MULTI_LABEL_AGGREGATE}); single-label models always take the mean",
    )
    parser.add_argument("--timeline", action="store_true", help="also list each window's span and top-k labels")
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
    import numpy as np
    import torch

    from fastast import windows
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
    card, spec = model.card, model.card.input
    windowing = windows.Windowing.for_input(spec.target_length, spec.sample_rate, args.hop_s)
    windows.resolve_aggregate(card.task, args.aggregate)  # refuse a bad method before any audio is read
    waves = [read_audio(path, spec.sample_rate) for path in args.audio]
    # Every window of every file, in order, featurized a batch at a time: a long file never becomes one tensor.
    rows = [view for wave in waves for view in windowing.split(wave)]
    scores = np.empty((len(rows), card.num_classes), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), BATCH):
            features = batch_features(rows[start : start + BATCH], spec).to(model.device)
            scores[start : start + BATCH] = model.scores(model(features, r)).cpu().numpy()
    k = min(args.top_k, card.num_classes)
    results, first = [], 0
    for path, wave in zip(args.audio, waves):
        count = windowing.count(len(wave))
        clip = scores[first : first + count]
        first += count
        result = {
            "file": str(path),
            "seconds": round(len(wave) / spec.sample_rate, 3),
            "windows": count,
            "top": windows.top_k(windows.aggregate(clip, card.task, args.aggregate), card.labels, k),
        }
        if args.timeline:
            result["timeline"] = windowing.timeline(clip, len(wave), card.labels, k)
        results.append(result)
    if args.json:
        document = {"model": card.name, "task": card.task, "r": r, "device": str(model.device), "results": results}
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        print_table(results, card.name, r)
    return 0


def batch_features(views: list[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """Windows at the model's rate -> the model's input in one fbank pass (per window it is ~2x slower).

    Zero-padded rows with their lengths get exactly the features each gets alone: a file's last window may be
    shorter than the others.
    """
    import numpy as np
    import torch

    from fastast.features import model_input, pad_rows

    batch = np.empty((len(views), max(len(view) for view in views)), dtype=np.float32)
    lengths = pad_rows(views, batch)
    return model_input(batch, spec.sample_rate, spec, lengths=torch.tensor(lengths))


def print_table(results: list[dict], model_name: str, r: int | list[int]) -> None:
    print(f"model {model_name}, r={r}")
    for result in results:
        count = result["windows"]
        windows = f", {count} windows" if count > 1 else ""
        print(f"\n{result['file']}  ({result['seconds']:.2f} s{windows})")
        width = max(len(entry["label"]) for entry in result["top"])
        for rank, entry in enumerate(result["top"], 1):
            print(f"  {rank:>2}  {entry['label']:<{width}}  {entry['score']:.4f}")
        if "timeline" in result:
            print("  timeline (s)")
        for entry in result.get("timeline", []):
            labels = ", ".join(f"{label['label']} {label['score']:.2f}" for label in entry["labels"])
            print(f"  {entry['start_s']:9.3f}-{entry['end_s']:<9.3f}  {labels}")
