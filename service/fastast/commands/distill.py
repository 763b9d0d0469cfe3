"""`fastast distill`: CMKD, a student trained on lambda * ground truth + (1 - lambda) * a frozen teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastast.commands.train import add_training_args, check_args, config_from_args, report


def handle(args: argparse.Namespace) -> int:
    from fastast.training.data import DataError
    from fastast.training.loop import Trainer

    check_args(args)
    if not 0.0 <= args.lam <= 1.0:
        raise DataError("--lambda must be in [0, 1]")
    if args.tau <= 0:
        raise DataError("--tau must be positive")
    card = Trainer(config_from_args(args, teacher=args.teacher, lam=args.lam, tau=args.tau)).run()
    report(card, args.out)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("distill", help="train a student by CMKD from a frozen teacher",
                                   description=__doc__)
    parser.add_argument("--teacher", type=Path, required=True, help="model_store folder of the teacher")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.1,
                        help="weight of the ground-truth term (the teacher term gets 1 - lambda)")
    parser.add_argument("--tau", type=float, default=1.0, help="temperature applied to the teacher's logits")
    add_training_args(parser)
    parser.set_defaults(func=handle)
