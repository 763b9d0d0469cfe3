"""Training data: AST-format manifests, label CSVs, the folder-per-class layout, and the Dataset.

A manifest is AST's JSON: `{"data": [{"wav": path, "labels": "mid1,mid2"}]}`. Relative wav paths
resolve against the manifest's folder, so a data folder can be moved as a whole.

The Dataset runs in DataLoader worker processes and returns the *un-normalised* augmented log-mel
fbank; each model normalises it with its own InputSpec, so a teacher and a student see the same
augmented tensor. A file that fails to decode never stops an epoch: the sample is dropped by the
collate function and its name travels with the batch so the loop can report and count it.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastast.errors import FastASTError
from fastast.model.card import Label, read_label_csv
from fastast.training.augment import AugmentConfig, augment_fbank, augment_wave, mix_waveforms

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


class DataError(FastASTError, ValueError):
    """A manifest, label file or data folder that cannot be used for training."""


@dataclass(frozen=True)
class Example:
    path: Path
    labels: tuple[str, ...]  # label mids
    speaker: str = ""  # who spoke it, where known (manifest key "speaker"): for per-speaker accuracy


def read_manifest(path: str | Path) -> list[Example]:
    """Examples of an AST-format manifest; relative wav paths resolve against the manifest's folder."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON manifest ({exc})") from None
    rows = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise DataError(f'{path}: expected {{"data": [{{"wav": ..., "labels": ...}}]}}')
    if not rows:
        raise DataError(f"{path}: the manifest is empty")
    examples = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("wav"), str) or not isinstance(row.get("labels"), str):
            raise DataError(f"{path}: entry {i} needs string fields 'wav' and 'labels'")
        wav = Path(row["wav"])
        wav = wav if wav.is_absolute() else path.parent / wav
        mids = tuple(m.strip() for m in row["labels"].split(",") if m.strip())
        if not mids:
            raise DataError(f"{path}: entry {i} ({row['wav']}) has no labels")
        examples.append(Example(wav, mids, str(row.get("speaker", ""))))
    return examples


def write_manifest(path: str | Path, examples: Sequence[Example]) -> Path:
    """Write an AST manifest; paths inside the manifest's folder are stored relative to it. A known speaker is
    stored as an extra "speaker" key, which AST's own loader ignores."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    rows = []
    for ex in examples:
        wav = ex.path.resolve()
        row = {"wav": str(wav.relative_to(base)) if wav.is_relative_to(base) else str(wav),
               "labels": ",".join(ex.labels)}
        rows.append({**row, "speaker": ex.speaker} if ex.speaker else row)
    path.write_text(json.dumps({"data": rows}, indent=1) + "\n")
    return path


def write_label_csv(path: str | Path, labels: Sequence[Label]) -> Path:
    """AST's label CSV: `index,mid,display_name`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["index", "mid", "display_name"])
        for label in labels:
            writer.writerow([label.index, label.mid, label.display_name])
    return path


class LabelSet:
    """The label list of a task and the mapping mid -> output index."""

    def __init__(self, labels: Sequence[Label]):
        self.labels = list(labels)
        self.index = {label.mid: label.index for label in self.labels}

    @classmethod
    def from_csv(cls, path: str | Path) -> LabelSet:
        try:
            return cls(read_label_csv(path))
        except FastASTError as exc:
            raise DataError(str(exc)) from None

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, mids: Sequence[str]) -> Tensor:
        """Multi-hot target vector."""
        target = torch.zeros(len(self.labels))
        for mid in mids:
            target[self.index[mid]] = 1.0
        return target


def check_examples(examples: Sequence[Example], labels: LabelSet, source: str) -> None:
    """Fail before training on missing files or labels absent from the label CSV (one-line errors)."""
    missing = [ex.path for ex in examples if not ex.path.is_file()]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{source}: audio file not found: {missing[0]}{more}")
    unknown = sorted({mid for ex in examples for mid in ex.labels if mid not in labels.index})
    if unknown:
        raise DataError(f"{source}: labels not in the label CSV: {', '.join(unknown[:5])}"
                        + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))


def infer_task(examples: Sequence[Example]) -> str:
    """single-label when every example has exactly one label (cross-entropy), else multi-label (BCE)."""
    return "single-label" if all(len(ex.labels) == 1 for ex in examples) else "multi-label"


def scan_class_folders(root: str | Path) -> tuple[list[Example], list[Label]]:
    """Folder-per-class layout root/CLASS/*.wav: one label per sub-folder, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    labels = [Label(index=i, mid=name, display_name=name) for i, name in enumerate(classes)]
    examples = [
        Example(f, (name,))
        for name in classes
        for f in sorted((root / name).rglob("*"))
        if f.suffix.lower() in AUDIO_SUFFIXES
    ]
    if not examples:
        raise DataError(f"{root}: no audio files in class sub-folders")
    return examples, labels


@dataclass
class FeatureSpec:
    """The shared front end of everything trained together (teacher and student agree on it)."""

    target_length: int
    num_mel_bins: int = 128
    sample_rate: int = 16000


@dataclass
class Sample:
    fbank: Tensor | None  # [target_length, mel], un-normalised log-mel
    target: Tensor | None
    failed: list[str] = field(default_factory=list)


class AudioDataset(Dataset):
    """Decode -> (mixup) -> speed / reverb / background noise / gain -> Kaldi fbank -> pad/trim ->
    SpecAugment / noise / shift. `noises` are the background-noise waveforms the augmentation draws from.

    Randomness comes from (seed, epoch, index), so augmentation is reproducible and a resumed run
    draws what the interrupted one would have drawn.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        labels: LabelSet,
        features: FeatureSpec,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        noises: Sequence[np.ndarray] = (),
    ):
        self.examples = list(examples)
        self.labels = labels
        self.features = features
        self.augment = augment or AugmentConfig.off()
        self.seed = seed
        self.noises = list(noises)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, i: int) -> np.ndarray:
        from fastast.audio import load_audio

        return load_audio(self.examples[i].path, self.features.sample_rate)

    def __getitem__(self, i: int) -> Sample:
        from fastast.features import kaldi_fbank, pad_or_trim

        rng = np.random.default_rng((self.seed, self.epoch, i))
        try:
            wave = self._load(i)
        except (FastASTError, OSError, RuntimeError, ValueError) as exc:
            return Sample(None, None, [f"{self.examples[i].path}: {exc}"])
        target = self.labels.encode(self.examples[i].labels)
        failed: list[str] = []
        if self.augment.mixup > 0 and rng.random() < self.augment.mixup:
            j = int(rng.integers(len(self.examples)))
            try:
                partner = self._load(j)
                lam = float(rng.beta(10, 10))
                wave = mix_waveforms(wave, partner, lam)
                target = lam * target + (1 - lam) * self.labels.encode(self.examples[j].labels)
            except (FastASTError, OSError, RuntimeError, ValueError) as exc:
                failed.append(f"{self.examples[j].path}: {exc}")
        if self.augment.on_waveform:
            wave = augment_wave(wave, self.features.sample_rate, self.augment, rng, self.noises)
        fbank = kaldi_fbank(torch.from_numpy(np.ascontiguousarray(wave)), self.features.sample_rate,
                            num_mel_bins=self.features.num_mel_bins)
        fbank = pad_or_trim(fbank, self.features.target_length)
        return Sample(augment_fbank(fbank, self.augment, rng), target, failed)


@dataclass
class Batch:
    fbank: Tensor  # [B, T, F] un-normalised
    target: Tensor  # [B, C]
    failed: list[str]

    def __len__(self) -> int:
        return self.fbank.shape[0]


def collate(samples: list[Sample]) -> Batch:
    """Stack the good samples; undecodable ones are dropped and named in `failed`."""
    good = [s for s in samples if s.fbank is not None]
    failed = [name for s in samples for name in s.failed]
    if not good:
        return Batch(torch.empty(0), torch.empty(0), failed)
    return Batch(torch.stack([s.fbank for s in good]), torch.stack([s.target for s in good]), failed)


def read_path_list(path: str | Path) -> list[Path]:
    """A text file of audio paths, one a line; relative paths resolve against the file's folder."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if not lines:
        raise DataError(f"{path}: no paths")
    return [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]


def balanced_weights(examples: Sequence[Example], sources: Sequence[int] | None = None) -> Tensor:
    """Sampling weights that draw every (first) label equally often and, within a label, every source (e.g. the
    manifest an example came from) equally often: a few real clips of a word weigh as much as many synthetic ones."""
    sources = list(sources) if sources is not None else [0] * len(examples)
    per_pair = Counter((ex.labels[0], source) for ex, source in zip(examples, sources, strict=True))
    per_label = Counter(label for label, _ in per_pair)  # sources per label
    return torch.tensor([1.0 / (per_label[ex.labels[0]] * per_pair[ex.labels[0], source])
                         for ex, source in zip(examples, sources)], dtype=torch.double)
