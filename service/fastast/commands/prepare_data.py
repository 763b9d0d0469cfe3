"""`fastast prepare-data`: official dataset layouts -> AST manifests + labels.csv for `fastast train`."""

from __future__ import annotations

import argparse
from pathlib import Path


def handle(args: argparse.Namespace) -> int:
    from fastast.training import prepare

    if args.dataset == "esc50":
        result = prepare.prepare_esc50(args.root, args.out)
    elif args.dataset == "speechcommands":
        result = prepare.prepare_speechcommands(args.root, args.out)
    elif args.dataset == "audioset":
        result = prepare.prepare_audioset(args.segments, args.audio, args.out, args.split)
    else:
        result = prepare.prepare_folder(args.root, args.out, args.split)
    print(result.summary())
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("prepare-data", help="make training manifests from a dataset folder",
                                   description=__doc__)
    kinds = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    esc = kinds.add_parser("esc50", help="ESC-50-master/ (meta/esc50.csv, audio/): fold{1..5}_{train,eval}.json")
    esc.add_argument("--root", type=Path, required=True)
    sc = kinds.add_parser("speechcommands", help="Speech Commands V2 folder: train/val/test.json")
    sc.add_argument("--root", type=Path, required=True)
    aset = kinds.add_parser("audioset", help="AudioSet segment CSV + downloaded clips: SPLIT.json")
    aset.add_argument("--segments", type=Path, required=True, help="e.g. balanced_train_segments.csv")
    aset.add_argument("--audio", type=Path, required=True, help="folder of clips named YTID(.wav|.flac...)")
    aset.add_argument("--split", default="train", help="manifest name (train, eval, ...)")
    folder = kinds.add_parser("folder", help="folder-per-class layout CLASS/*.wav: SPLIT.json")
    folder.add_argument("--root", type=Path, required=True)
    folder.add_argument("--split", default="train")
    for sub in (esc, sc, aset, folder):
        sub.add_argument("--out", type=Path, required=True, help="output folder for manifests and labels.csv")
    parser.set_defaults(func=handle)
