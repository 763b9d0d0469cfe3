"""`fastast evaluate`: accuracy (or mAP) and samples/s for each r on a manifest; optionally into the card's r_table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastast.training.evaluate import SweepResult


def handle(args: argparse.Namespace) -> int:
    import torch

    from fastast.model.tome import parse_r_values
    from fastast.training.evaluate import run_evaluation

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run_evaluation(args.model, args.data, parse_r_values(args.r), batch_size=args.batch_size,
                            device=args.device, workers=args.workers, variant=args.variant)
    rows = [row.model_dump(exclude_none=True) for row in result.rows]
    speakers = per_speaker(result, args.data) if args.per_speaker else None
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), "samples": result.samples,
                          "skipped": result.failed, "rows": rows,
                          **({"per_speaker": speakers} if speakers is not None else {})}, indent=1))
    else:
        metric = result.rows[0].metric
        print(f"{'r':>4}  {metric:>9}  {'drop':>8}  {'S/s':>9}")
        for row in result.rows:
            print(f"{row.r:>4}  {row.value:>9.4f}  {row.drop:>8.4f}  {row.samples_per_s or 0:>9.1f}")
        print(f"{result.samples} samples, {len(result.failed)} skipped")
        if speakers is not None:
            print_per_speaker(speakers)
    if args.plot:
        from fastast.training.plot import plot_rows

        plot_rows(result.rows, args.plot, title=f"{Path(args.model).name} on {Path(args.data).name}")
    if args.write_card:
        from fastast.training.evaluate import write_r_table

        write_r_table(args.card or args.model, result.rows, args.variant, evaluated=args.model)
    return 0


def per_speaker(result: SweepResult, manifest: Path) -> dict[str, dict[str, list[int]]]:
    """r -> speaker -> [correct, clips], from the manifest's "speaker" keys (prepare-data writes them)."""
    from fastast.training.data import DataError, read_manifest
    from fastast.training.evaluate import accuracy_by_group

    speakers = [ex.speaker for ex in read_manifest(manifest)]
    if result.failed or not all(speakers):
        raise DataError(f"--per-speaker needs every clip of {manifest} decoded and with a speaker")
    return {str(r): {s: list(t) for s, t in accuracy_by_group(scores, result.target, speakers).items()}
            for r, scores in result.scores.items()}


def print_per_speaker(speakers: dict[str, dict[str, list[int]]]) -> None:
    """Per-speaker accuracy at the first r, worst first, and its spread."""
    r, table = next(iter(speakers.items()))
    share = sorted((c / n, s, c, n) for s, (c, n) in table.items())
    print(f"per speaker at r={r} ({len(share)} speakers): min {share[0][0]:.3f}, "
          f"median {share[len(share) // 2][0]:.3f}, max {share[-1][0]:.3f}")
    for value, speaker, correct, clips in share:
        print(f"  {speaker:>12}  {value:.3f}  ({correct}/{clips})")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="accuracy/mAP and samples/s against r", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model_store folder")
    parser.add_argument("--data", type=Path, required=True, help="AST-format manifest; labels must be the model's")
    parser.add_argument("--r", default="0,5,10,15,20,25,30,35,40", help="comma-separated r values (first = baseline)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=Path, default=None, help="write accuracy and S/s against r to this PNG")
    parser.add_argument("--write-card", action="store_true", help="store the rows in the card's r_table")
    parser.add_argument("--card", type=Path, default=None,
                        help="with --write-card: store the rows in this model's card instead (e.g. a Train+Inf "
                             "sibling's table in the shipped model's card); rows then name the evaluated weights")
    parser.add_argument("--variant", default=None, help='label of these rows, e.g. "Inf" or "Train+Inf"')
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--per-speaker", action="store_true",
                        help="also report accuracy per speaker (the manifest's \"speaker\" keys)")
    parser.set_defaults(func=handle)
