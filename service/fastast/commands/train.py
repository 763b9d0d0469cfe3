"""`fastast train`: train an AST (optionally with ToMe active) or the EfficientNet-B2 teacher into model_store/NAME."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The options `train` and `distill` share."""
    data = parser.add_argument_group("data")
    data.add_argument("--train", type=Path, nargs="+", required=True,
                      help="AST-format training manifest(s) (JSON); several are trained on together")
    data.add_argument("--val", type=Path, required=True, help="validation manifest; picks the best epoch")
    data.add_argument("--labels", type=Path, required=True, help="label CSV: index,mid,display_name")
    data.add_argument("--task", choices=("single-label", "multi-label"), default=None,
                      help="default: single-label when every example has exactly one label")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--balance", action="store_true",
                      help="draw every label equally often, and within a label every --train manifest equally "
                      "often (with replacement), instead of shuffling")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="tiny",
                       help="AST size tiny, small or base (adjust with --dim/--depth/--heads), or efficientnet_b2 (the CMKD teacher)")
    model.add_argument("--dim", type=int, default=None, help="custom AST width (overrides the preset)")
    model.add_argument("--depth", type=int, default=None, help="custom AST depth")
    model.add_argument("--heads", type=int, default=None, help="custom AST attention heads")
    model.add_argument("--fstride", type=int, default=None,
                       help="patch stride along frequency (default 10, or the --init model's; another resizes its "
                       "position embeddings)")
    model.add_argument("--tstride", type=int, default=None, help="patch stride along time (the same)")
    model.add_argument("--target-length", type=int, default=1024, help="input frames (SC 128, ESC-50 512, AudioSet 1024)")
    model.add_argument("--init", type=Path, default=None, help="start from this model_store model (fine-tune)")
    model.add_argument("--mean", type=float, default=None, help="normalisation mean (default: measured on --train)")
    model.add_argument("--std", type=float, default=None, help="normalisation std (default: measured on --train)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--lr", type=float, default=2.5e-4)
    opt.add_argument("--weight-decay", type=float, default=5e-7)
    opt.add_argument("--warmup-steps", type=int, default=None, help="default: min(1000, 10%% of all steps)")
    opt.add_argument("--schedule", choices=("cosine", "step"), default="cosine")
    opt.add_argument("--step-start", type=int, default=5, help="step schedule: first epoch that decays")
    opt.add_argument("--gamma", type=float, default=0.85, help="step schedule: decay per epoch")
    opt.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip (0 = off)")
    opt.add_argument("--r-train", type=int, default=0, help="train with ToMe merging r tokens per block")
    opt.add_argument("--device", default="auto")
    opt.add_argument("--threads", type=int, default=0,
                     help="CPU threads for the model (0 = torch's default; 1 is fastest on busy shared cores)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    aug = parser.add_argument_group("augmentation (AST recipes; off for validation)")
    aug.add_argument("--freqm", type=int, default=48, help="SpecAugment frequency mask (0 = off)")
    aug.add_argument("--timem", type=int, default=None, help="SpecAugment time mask (default: 20%% of target length)")
    aug.add_argument("--mixup", type=float, default=0.0, help="waveform mixup probability, lambda ~ Beta(10,10)")
    aug.add_argument("--noise", action="store_true", help="AST's Speech Commands noise")
    aug.add_argument("--shift", type=int, default=0, help="random circular time shift in frames (AST SC: 10)")
    aug.add_argument("--speed", type=float, default=0.0,
                     help="speed perturbation: resample by a factor in [1-SPEED, 1+SPEED] (tempo and pitch)")
    aug.add_argument("--gain-db", type=float, default=0.0, help="random gain in [-GAIN_DB, GAIN_DB] dB")
    aug.add_argument("--reverb", type=float, default=0.0, help="probability of a synthetic room reverb")
    aug.add_argument("--noise-clips", type=Path, default=None,
                     help="text file of background-noise clips, one path a line (prepare-data's noise.txt)")
    aug.add_argument("--bg-noise", type=float, default=0.0,
                     help="probability of adding one of --noise-clips at a random SNR")
    aug.add_argument("--snr-db", type=float, nargs=2, default=(0.0, 20.0), metavar=("MIN", "MAX"),
                     help="SNR range of the background noise")
    parser.add_argument("--out", type=Path, required=True, help="output model_store folder")
    parser.add_argument("--name", default=None, help="model name in the card (default: the folder name)")


def config_from_args(args: argparse.Namespace, **extra):
    from fastast.training.augment import AugmentConfig
    from fastast.training.loop import TrainConfig

    timem = args.timem if args.timem is not None else round(0.2 * args.target_length)
    augment = AugmentConfig(freqm=args.freqm, timem=timem, mixup=args.mixup, noise=args.noise, shift=args.shift,
                            speed=args.speed, gain_db=args.gain_db, reverb=args.reverb, bg_noise=args.bg_noise,
                            snr_db=tuple(args.snr_db))
    keys = ("train", "val", "labels", "out", "arch", "dim", "depth", "heads", "fstride", "tstride", "target_length",
            "epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "schedule", "step_start", "gamma", "clip",
            "device", "threads", "seed", "init", "resume", "workers", "r_train", "mean", "std", "task", "name",
            "noise_clips", "balance")
    command = " ".join(["fastast", args.command, *_as_options(args)])
    return TrainConfig(**{k: getattr(args, k) for k in keys}, augment=augment, command=command, **extra)


def _as_options(args: argparse.Namespace) -> list[str]:
    """The parsed options as an explicit command line (for the card's provenance), without the architecture options
    an --init model overrides."""
    from fastast.training.init import init_supplied

    unused = init_supplied(args)
    words = []
    for key, value in sorted(vars(args).items()):
        if key in ("command", "func", *unused) or value is None or value is False:
            continue
        flag = "--lambda" if key == "lam" else "--" + key.replace("_", "-")
        values = value if isinstance(value, (list, tuple)) else [value]
        words += [flag] if value is True else [flag, *(shlex.quote(str(v)) for v in values)]
    return words


def check_args(args: argparse.Namespace) -> None:
    from fastast.training.data import DataError
    from fastast.training.loop import ARCHS

    for name in ("epochs", "batch_size", "target_length"):
        if getattr(args, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')} must be positive")
    if args.arch not in ARCHS:
        raise DataError(f"unknown arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.r_train < 0:
        raise DataError("--r-train must be >= 0")
    if args.arch == "efficientnet_b2" and args.r_train:
        raise DataError("--r-train needs an AST arch (the CNN has no tokens to merge)")
    if (args.mean is None) != (args.std is None):
        raise DataError("give both --mean and --std, or neither")
    if args.bg_noise > 0 and args.noise_clips is None:
        raise DataError("--bg-noise needs --noise-clips")
    if not 0 <= args.speed < 1:
        raise DataError("--speed must be in [0, 1)")


def report(card, out: Path) -> None:
    prov = card.provenance
    value = prov.get("val_metric", {}).get("value")
    print(f"saved {out} (best epoch {prov.get('best_epoch')}, validation "
          f"{'mAP' if card.task == 'multi-label' else 'accuracy'} {value})")


def handle(args: argparse.Namespace) -> int:
    from fastast.training.loop import Trainer

    check_args(args)
    card = Trainer(config_from_args(args)).run()
    report(card, args.out)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a FastAST (or the CNN teacher) from manifests",
                                   description=__doc__)
    add_training_args(parser)
    parser.set_defaults(func=handle)
