"""Data preparers: official dataset layouts -> AST-format manifests + label CSV (the files `fastast train` reads).

- ESC-50 (`meta/esc50.csv`, `audio/`): 5 folds; fold k evaluates on fold k and trains on the other four.
- Speech Commands V2 (`WORD/*.wav`, `validation_list.txt`, `testing_list.txt`): train / val / test.
- AudioSet (segment CSV such as `balanced_train_segments.csv` + a folder of downloaded clips): one manifest;
  segments without a local file are counted and listed, not fatal (AudioSet downloads are always partial).
- A folder-per-class layout (`CLASS/*.wav`): one manifest and labels named after the folders.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastast.model.card import Label, bundled_labels
from fastast.training.data import (
    AUDIO_SUFFIXES,
    DataError,
    Example,
    scan_class_folders,
    write_label_csv,
    write_manifest,
)

ESC50_FOLDS = 5


@dataclass
class Prepared:
    """What a preparer wrote: manifest name -> number of examples, plus problems worth telling the user."""

    out: Path
    manifests: dict[str, int]
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {count}" for name, count in self.manifests.items())
        miss = f"; {len(self.missing)} listed clips without a local file" if self.missing else ""
        return f"wrote {self.out}: {parts} (+ labels.csv){miss}"


def write_splits(out: Path, splits: dict[str, Sequence[Example]], labels: Sequence[Label], missing: list[str] | None = None) -> Prepared:
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        if not examples:
            raise DataError(f"split {name!r} would be empty")
        write_manifest(out / f"{name}.json", examples)
    write_label_csv(out / "labels.csv", labels)
    return Prepared(out, {name: len(ex) for name, ex in splits.items()}, missing or [])


def prepare_esc50(root: str | Path, out: str | Path) -> Prepared:
    """ESC-50-master/ -> fold{k}_train.json / fold{k}_eval.json for k = 1..5."""
    root, out = Path(root), Path(out)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataError(f"not an ESC-50 folder (no meta/esc50.csv): {root}")
    labels = bundled_labels("esc50")
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        items = [(int(row["fold"]), Example(root / "audio" / row["filename"], (labels[int(row["target"])].mid,)))
                 for row in rows]
    except (KeyError, ValueError, IndexError) as exc:
        raise DataError(f"{meta}: expected columns filename,fold,target ({exc})") from None
    return write_splits(out, fold_splits(items), labels)


def fold_splits(items: Sequence[tuple[int, Example]]) -> dict[str, list[Example]]:
    """(fold, example) pairs -> fold{k}_eval (fold k) and fold{k}_train (the other folds) for k = 1..5."""
    splits = {}
    for fold in range(1, ESC50_FOLDS + 1):
        splits[f"fold{fold}_train"] = [ex for k, ex in items if k != fold]
        splits[f"fold{fold}_eval"] = [ex for k, ex in items if k == fold]
    return splits


def prepare_speechcommands(root: str | Path, out: str | Path) -> Prepared:
    """speech_commands_v0.02/ -> train.json / val.json / test.json with the official 35 labels."""
    root, out = Path(root), Path(out)
    lists = {name: root / f"{name}_list.txt" for name in ("validation", "testing")}
    for path in lists.values():
        if not path.is_file():
            raise DataError(f"not a Speech Commands folder (no {path.name}): {root}")
    labels = bundled_labels("speechcommands")
    by_word = {label.display_name: label.mid for label in labels}
    held_out = {name: {line.strip() for line in path.read_text().splitlines() if line.strip()}
                for name, path in lists.items()}
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for word_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))):
        if word_dir.name not in by_word:
            raise DataError(f"{word_dir}: {word_dir.name!r} is not one of the 35 Speech Commands words")
        for wav in sorted(word_dir.glob("*.wav")):
            rel = f"{word_dir.name}/{wav.name}"
            split = "val" if rel in held_out["validation"] else "test" if rel in held_out["testing"] else "train"
            splits[split].append(Example(wav, (by_word[word_dir.name],)))
    return write_splits(out, splits, labels)


def read_audioset_segments(path: Path) -> list[tuple[str, float, list[str]]]:
    """(YTID, start seconds, label mids) of an AudioSet segment CSV (comment lines start with '#')."""
    if not path.is_file():
        raise DataError(f"segment CSV not found: {path}")
    segments = []
    with path.open(newline="") as f:
        for row in csv.reader((line for line in f if not line.startswith("#")), skipinitialspace=True):
            if not row:
                continue
            if len(row) < 4:
                raise DataError(f"{path}: expected YTID, start_seconds, end_seconds, positive_labels; got {row}")
            segments.append((row[0], float(row[1]), [m for m in row[3].split(",") if m]))
    if not segments:
        raise DataError(f"{path}: no segments")
    return segments


def _audio_index(folder: Path) -> dict[str, Path]:
    """Local clips by stem; downloaders name them YTID, YID (with AudioSet's 'Y' prefix) or YTID_start."""
    if not folder.is_dir():
        raise DataError(f"audio folder not found: {folder}")
    return {f.stem: f for f in sorted(folder.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES}


def prepare_audioset(segments_csv: str | Path, audio_dir: str | Path, out: str | Path, name: str = "train") -> Prepared:
    """An AudioSet segment CSV + local clips -> NAME.json with the 527 AudioSet labels."""
    segments = read_audioset_segments(Path(segments_csv))
    index = _audio_index(Path(audio_dir))
    labels = bundled_labels("audioset")
    known = {label.mid for label in labels}
    examples, missing = [], []
    for ytid, start, mids in segments:
        candidates = (ytid, f"Y{ytid}", f"{ytid}_{int(start)}", f"{ytid}_{start:.3f}", f"{ytid}_{int(start * 1000)}")
        path = next((index[c] for c in candidates if c in index), None)
        mids = [m for m in mids if m in known]
        if path is None or not mids:
            missing.append(ytid)
            continue
        examples.append(Example(path, tuple(mids)))
    if not examples:
        raise DataError(f"none of the {len(segments)} segments of {segments_csv} has a clip in {audio_dir}")
    return write_splits(Path(out), {name: examples}, labels, missing)


def prepare_folder(root: str | Path, out: str | Path, name: str = "train") -> Prepared:
    """CLASS/*.wav -> NAME.json + labels.csv (labels named after the folders)."""
    examples, labels = scan_class_folders(root)
    return write_splits(Path(out), {name: examples}, labels)
