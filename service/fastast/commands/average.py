"""`fastast average`: one model from the mean of several runs' weights (a "model soup")."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "average",
        help="average the weights of runs fine-tuned from one start into one model",
        description="Write the uniform average of the models' weights as a model_store folder. The models must "
        "share architecture, input, labels and task, and should be runs from one start (e.g. one stage trained "
        "with different seeds): their average is usually better than a typical run at no cost in speed. The "
        "result has no r table: measure it with `fastast evaluate --write-card`.",
    )
    parser.add_argument("models", nargs="+", type=Path, help="model_store folders (at least two)")
    parser.add_argument("--out", type=Path, required=True, help="model_store folder to write")
    parser.add_argument("--name", help="model name in the card (default: the first model's)")
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastast.model.average import average_models
    from fastast.model.store import refuse_overwrite, save_model

    out: Path = args.out
    refuse_overwrite(out, args.force)
    network, card = average_models(args.models)
    if args.name:
        card = card.model_copy(update={"name": args.name})
    card = save_model(out, network, card)
    print(f"averaged {len(args.models)} models -> {out} (sha256 {card.weights_sha256[:12]})")
    return 0
