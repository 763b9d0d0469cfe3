"""`fastast prepare-data`: dataset layouts -> AST manifests + labels.csv for `fastast train`.

The speechcommands-real, fsdd and esc10 kinds read the folders of `shared/data/real/` (a clips.csv each) and split
them deterministically: by speaker (seeded hash of the speaker id) for Speech Commands and FSDD, by fold for ESC-10.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def handle(args: argparse.Namespace) -> int:
    from fastast.training import prepare, prepare_real

    if args.dataset == "esc50":
        result = prepare.prepare_esc50(args.root, args.out)
    elif args.dataset == "speechcommands":
        result = prepare.prepare_speechcommands(args.root, args.out)
    elif args.dataset == "speechcommands-real":
        result = prepare_real.prepare_real_speechcommands(args.root, args.out, args.seed, args.test_speakers,
                                                          args.val_speakers)
    elif args.dataset == "fsdd":
        result = prepare_real.prepare_fsdd(args.root, args.out, args.seed, args.test_speakers, args.val_speakers)
    elif args.dataset == "esc10":
        result = prepare_real.prepare_esc10(args.root, args.out, args.test_fold)
    elif args.dataset == "audioset":
        result = prepare.prepare_audioset(args.segments, args.audio, args.out, args.split)
    else:
        result = prepare.prepare_folder(args.root, args.out, args.split)
    print(result.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
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
    real_sc = kinds.add_parser("speechcommands-real", help="real Speech Commands clips (clips.csv with speaker): "
                               "train/val/test.json split by speaker, noise.txt (the _silence_ clips), speakers.json")
    fsdd = kinds.add_parser("fsdd", help="Free Spoken Digit Dataset (clips.csv): digits as zero..nine at 16 kHz in "
                            "OUT/audio, train/val/test.json split by speaker, speakers.json")
    for sub, test, val in ((real_sc, 40, 20), (fsdd, 1, 1)):
        sub.add_argument("--root", type=Path, required=True)
        sub.add_argument("--seed", type=int, default=0, help="speaker split seed")
        sub.add_argument("--test-speakers", type=int, default=test, help="speakers held out for test")
        sub.add_argument("--val-speakers", type=int, default=val, help="speakers held out for validation")
    esc10 = kinds.add_parser("esc10", help="ESC-10 (clips.csv with fold): fold{1..5}_{train,eval}.json and train/val/test.json "
                                  "(folds 1-3 / 4 / 5 by default)")
    esc10.add_argument("--root", type=Path, required=True)
    esc10.add_argument("--test-fold", type=int, default=5,
                       help="test.json's fold, 1..5; val.json is the fold before it (5 for fold 1), train.json the rest")
    for sub in (esc, sc, aset, folder, real_sc, fsdd, esc10):
        sub.add_argument("--out", type=Path, required=True, help="output folder for manifests and labels.csv")
    parser.set_defaults(func=handle)
