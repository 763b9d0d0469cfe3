"""`fastast synth-commands`: write a synthetic Speech Commands V2 data set spoken by TTS engines."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth-commands",
        help="write a synthetic Speech Commands data set (TTS speech, noise, speaker-disjoint splits)",
        description="The 35 Speech Commands V2 words spoken by espeak-ng voices and variants (and, with "
        "--engines, flite and festival voices in train), as one-second 16 kHz WAVs with background noise, plus "
        "AST manifests train/val/test.json (wav paths relative to the manifest's folder), labels.csv and "
        "speakers.json. Val and test speakers never occur in train; the same seed gives byte-identical files.",
    )
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder to write")
    parser.add_argument(
        "--per-word", type=int, default=200, help="clips per word over all splits (10%% val, 10%% test)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel espeak-ng calls")
    parser.add_argument("--val-speakers", type=int, default=6, help="speakers (voice+variant) held out for val")
    parser.add_argument("--test-speakers", type=int, default=6, help="speakers (voice+variant) held out for test")
    parser.add_argument(
        "--engines",
        default="espeak-ng",
        help="comma-separated TTS engines: espeak-ng (always; it speaks val and test), flite, festival "
        "(their 7 voices speak a third of the training clips; apt-get install flite festival festvox-kallpc16k "
        "festvox-kdlpc16k festvox-us-slt-hts)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastast.training.synth import generate

    def progress(done: int, total: int) -> None:
        if done * 20 // total != (done - 1) * 20 // total:  # every 5%
            print(f"{done}/{total} clips", file=sys.stderr, flush=True)

    start = time.perf_counter()
    summary = generate(
        args.out,
        args.per_word,
        args.seed,
        workers=args.workers,
        val_speakers=args.val_speakers,
        test_speakers=args.test_speakers,
        engines=tuple(e.strip() for e in args.engines.split(",") if e.strip()),
        progress=progress,
    )
    total = sum(s["clips"] for s in summary.values())
    print(f"wrote {total} clips to {args.out} in {time.perf_counter() - start:.0f} s")
    for split, s in summary.items():
        print(
            f"  {split}: {s['clips']} clips, {s['speakers']} speakers used "
            f"(from {s['voices']} voices x {s['variants']} variants)"
        )
    return 0
