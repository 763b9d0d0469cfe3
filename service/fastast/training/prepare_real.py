"""Preparers for the real recordings in `shared/data/real/` (each folder has a `clips.csv`):

- Speech Commands v0.02 test clips: split by speaker into train / val / test over the 35-word labels of
  `model_store/default`; the `_silence_` clips (no speaker) become `noise.txt`, background noise for augmentation.
- FSDD: digits 0-9 as the words zero ... nine, split by speaker, resampled to 16 kHz and centred in one second
  (written as FLAC under OUT/audio/), so they look like Speech Commands clips.
- ESC-10: fold{k}_train / fold{k}_eval for k = 1..5 (clips cut from one recording share a fold), plus a
  held-out split train / val / test with a validation fold of its own: test fold k, validation the fold before
  it, training the other three (folds 1-3 / 4 / 5 by default). Five runs, one per test fold, cross-validate.

A speaker's split depends only on (seed, speaker id), never on file order or on which other speakers exist, so
adding clips never moves a speaker to another split, and the test speakers are never used to train or select.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from fastast.audio import load_audio
from fastast.model.card import Label, bundled_labels
from fastast.training.data import DataError, Example
from fastast.training.prepare import ESC50_FOLDS, Prepared, fold_splits, write_splits

SAMPLE_RATE = 16000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SILENCE = "_silence_"
SPEECH_LABELS = bundled_labels("speechcommands")  # the default model's 35 words, for both speech preparers
SPEECH_MIDS = {label.display_name: label.mid for label in SPEECH_LABELS}


def read_clips(root: Path, columns: Iterable[str]) -> list[dict[str, str]]:
    """Rows of ROOT/clips.csv, checked for the columns a preparer needs."""
    path = root / "clips.csv"
    if not path.is_file():
        raise DataError(f"no clips.csv in {root}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(columns) - set(rows[0] if rows else {})
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(sorted(missing))}")
    return rows


def split_speakers(speakers: Iterable[str], seed: int, test: int, val: int) -> dict[str, str]:
    """speaker -> "test" | "val" | "train": speakers ordered by sha256(seed:speaker), the first `test` to test,
    the next `val` to val. The order of a speaker depends on nothing else, so the split is reproducible."""
    unique = sorted(set(speakers))
    if test < 1 or val < 1 or test + val >= len(unique):
        raise DataError(f"{len(unique)} speakers cannot give {test} test, {val} val and at least one train speaker")
    ranked = sorted(unique, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    return {s: "test" if i < test else "val" if i < test + val else "train" for i, s in enumerate(ranked)}


def _write_speakers(out: Path, split_of: dict[str, str], seed: int) -> None:
    by_split = {name: sorted(s for s, k in split_of.items() if k == name) for name in ("train", "val", "test")}
    (out / "speakers.json").write_text(json.dumps({"seed": seed, **by_split}, indent=1) + "\n")


def _group(items: list[tuple[str, Example]], split_of: dict[str, str]) -> dict[str, list[Example]]:
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for speaker, example in items:
        splits[split_of[speaker]].append(example)
    return splits


def _write_speaker_splits(out: Path, items: list[tuple[str, Example]], seed: int, test: int, val: int) -> Prepared:
    """(speaker, example) pairs -> train/val/test.json over the 35 words, split by speaker, and speakers.json."""
    split_of = split_speakers((speaker for speaker, _ in items), seed, test, val)
    prepared = write_splits(out, _group(items, split_of), SPEECH_LABELS)
    _write_speakers(out, split_of, seed)
    return prepared


def prepare_real_speechcommands(root: str | Path, out: str | Path, seed: int = 0, test_speakers: int = 40,
                                val_speakers: int = 20) -> Prepared:
    """speech_commands_test_v0.02/ -> train/val/test.json (35 words), noise.txt, speakers.json, labels.csv."""
    root, out = Path(root), Path(out)
    rows = read_clips(root, ("path", "word", "speaker"))
    items, noise = [], []
    for row in rows:
        if row["word"] == SILENCE:
            noise.append(str((root / row["path"]).resolve()))
        elif row["word"] in SPEECH_MIDS and row["speaker"]:
            items.append((row["speaker"], Example(root / row["path"], (SPEECH_MIDS[row["word"]],), row["speaker"])))
        else:
            raise DataError(f"{root / 'clips.csv'}: {row['path']} has word {row['word']!r} "
                            f"and speaker {row['speaker']!r}; expected a 35-word clip with a speaker, or {SILENCE}")
    prepared = _write_speaker_splits(out, items, seed, test_speakers, val_speakers)
    (out / "noise.txt").write_text("".join(f"{path}\n" for path in sorted(noise)))
    return prepared


def centre_in_second(wave: np.ndarray) -> np.ndarray:
    """Zero-pad a clip shorter than one second on both sides (Speech Commands clips are one second long)."""
    pad = max(0, SAMPLE_RATE - len(wave))
    return np.pad(wave, (pad // 2, pad - pad // 2))


def prepare_fsdd(root: str | Path, out: str | Path, seed: int = 0, test_speakers: int = 1,
                 val_speakers: int = 1) -> Prepared:
    """fsdd/ -> OUT/audio/*.flac (16 kHz, >= 1 s) and train/val/test.json with the 35-word labels."""
    root, out = Path(root), Path(out)
    rows = read_clips(root, ("path", "digit", "speaker"))
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    items = []
    for row in rows:
        try:
            word = DIGIT_WORDS[int(row["digit"])]
        except (ValueError, IndexError):
            raise DataError(f"{root / 'clips.csv'}: {row['path']} has digit {row['digit']!r}, expected 0-9") from None
        dest = audio / f"{Path(row['path']).stem}.flac"
        if not dest.is_file():
            wave = centre_in_second(load_audio(root / row["path"], SAMPLE_RATE))
            sf.write(str(dest), wave, SAMPLE_RATE, subtype="PCM_16")
        items.append((row["speaker"], Example(dest, (SPEECH_MIDS[word],), row["speaker"])))
    return _write_speaker_splits(out, items, seed, test_speakers, val_speakers)


ESC10_TEST_FOLD = 5


def esc10_val_fold(test_fold: int) -> int:
    """The fold before the test fold validates (fold 5 before fold 1), so five runs rotate every role."""
    if not 1 <= test_fold <= ESC50_FOLDS:
        raise DataError(f"the test fold must be 1..{ESC50_FOLDS}, got {test_fold}")
    return (test_fold - 2) % ESC50_FOLDS + 1


def holdout_splits(items: Sequence[tuple[int, Example]], val_fold: int, test_fold: int) -> dict[str, list[Example]]:
    """train / val / test by fold: cross-validation's fold{k}_train selects on its own test fold, so a single
    held-out run needs a validation fold of its own to pick epochs and models without touching the test fold."""
    held_out = {val_fold, test_fold}
    return {"train": [ex for k, ex in items if k not in held_out],
            "val": [ex for k, ex in items if k == val_fold],
            "test": [ex for k, ex in items if k == test_fold]}


def prepare_esc10(root: str | Path, out: str | Path, test_fold: int = ESC10_TEST_FOLD) -> Prepared:
    """esc10/ -> fold{k}_train.json / fold{k}_eval.json for k = 1..5, train / val / test.json (test fold
    `test_fold`, validation the fold before it, training the rest) and its 10 labels."""
    val_fold = esc10_val_fold(test_fold)
    root, out = Path(root), Path(out)
    rows = read_clips(root, ("path", "label", "label_idx", "fold"))
    names = {int(row["label_idx"]): row["label"] for row in rows}
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{root / 'clips.csv'}: label_idx should run 0..{len(names) - 1}, got {sorted(names)}")
    labels = [Label(index=i, mid=names[i].lower().replace(" ", "_"), display_name=names[i]) for i in sorted(names)]
    items = [(int(row["fold"]), Example(root / row["path"], (labels[int(row["label_idx"])].mid,))) for row in rows]
    return write_splits(out, fold_splits(items) | holdout_splits(items, val_fold, test_fold), labels)
