"""`fastast import`: turn a Hugging Face or original AST checkpoint into a model_store folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastast.errors import FastASTError


_ORIGINAL_ONLY = {"--labels": "labels", "--target-length": "target_length", "--mean": "mean", "--std": "std"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a Hugging Face or original AST checkpoint into the model store",
        description="Import an AST checkpoint into a model_store folder (model.safetensors + card.json). "
        "--from hf reads an ASTForAudioClassification folder (config.json, model.safetensors or "
        "pytorch_model.bin, optional preprocessor_config.json); --from ast reads an original AST .pth.",
    )
    parser.add_argument("--from", dest="kind", choices=("hf", "ast"), required=True, help="checkpoint format")
    parser.add_argument("source", type=Path, help="HF model folder (--from hf) or .pth file (--from ast)")
    parser.add_argument("--out", type=Path, required=True, help="model_store folder to write")
    parser.add_argument("--name", help="model name in the card (default: the --out folder's name)")
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    original = parser.add_argument_group("original AST checkpoints (--from ast)")
    original.add_argument("--labels", help="label CSV (index,mid,display_name) or audioset|esc50|speechcommands")
    original.add_argument("--target-length", type=int, help="input frames the checkpoint was trained with")
    original.add_argument("--fstride", type=int, default=10)
    original.add_argument("--tstride", type=int, default=10)
    original.add_argument("--mean", type=float, help="fbank mean for normalisation (default: AudioSet's)")
    original.add_argument("--std", type=float, help="fbank std for normalisation (default: AudioSet's)")
    original.add_argument(
        "--task", choices=("multi-label", "single-label"), default="multi-label", help="sigmoid or softmax scores"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastast.model import importers
    from fastast.model.card import AUDIOSET_MEAN, AUDIOSET_STD
    from fastast.model.store import refuse_overwrite, save_model

    out: Path = args.out
    refuse_overwrite(out, args.force)
    if args.kind == "hf":
        given = [flag for flag, value in _ORIGINAL_ONLY.items() if getattr(args, value) is not None]
        if given:
            raise FastASTError(f"{', '.join(given)} only apply to --from ast (HF folders carry their own)")
        network, card = importers.import_hf(args.source)
    else:
        if args.labels is None or args.target_length is None:
            raise FastASTError("--from ast needs --labels and --target-length")
        network, card = importers.import_original(
            args.source,
            args.labels,
            args.target_length,
            fstride=args.fstride,
            tstride=args.tstride,
            mean=AUDIOSET_MEAN if args.mean is None else args.mean,
            std=AUDIOSET_STD if args.std is None else args.std,
            task=args.task,
        )
    card = card.model_copy(update={"name": args.name or out.resolve().name})
    card = save_model(out, network, card)
    arch = card.arch
    print(
        f"imported {card.name}: AST dim {arch['dim']}, depth {arch['depth']}, {card.num_classes} labels, "
        f"{card.input.target_length} frames, {card.task} -> {out} (sha256 {card.weights_sha256[:12]})"
    )
    return 0
