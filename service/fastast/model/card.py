"""The model card: everything needed to rebuild, feed and describe a servable model (card.json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastast.errors import CheckpointError

# AudioSet statistics, the default of AST and of Hugging Face's ASTFeatureExtractor.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


class InputSpec(BaseModel):
    """How raw audio becomes the model's input: fbank at sample_rate, pad/trim, (x - mean) / (2 * std)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: int = 1024
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD


class Label(BaseModel):
    index: int
    mid: str
    display_name: str


class RTableRow(BaseModel):
    """One measured point of the accuracy/speed trade-off."""

    model_config = ConfigDict(extra="allow")

    r: int
    metric: str  # "accuracy" or "mAP"
    value: float
    drop: float | None = None  # value at r=0 minus value at r
    samples_per_s: float | None = None
    variant: str | None = None  # e.g. "Inf" (trained at r=0) or "Train+Inf"


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arch: dict[str, Any]  # {"type": "ast", ...ASTConfig fields}; other types are added by their builders
    input: InputSpec = Field(default_factory=InputSpec)
    labels: list[Label]
    task: Literal["multi-label", "single-label"] = "multi-label"
    provenance: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str = ""
    r_table: list[RTableRow] = Field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"no card.json in {path.parent}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "card"
            raise CheckpointError(f"invalid {path}: {where}: {first['msg']}") from None


def read_label_csv(path: str | Path) -> list[Label]:
    """Labels in AST's CSV format: a header, then `index,mid,display_name` rows."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise CheckpointError(f"label file not found: {path}") from None
    try:
        labels = [Label(index=int(row["index"]), mid=row["mid"], display_name=row["display_name"]) for row in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: expected columns index,mid,display_name ({exc})") from None
    if not labels:
        raise CheckpointError(f"{path}: no labels")
    if [label.index for label in labels] != list(range(len(labels))):
        raise CheckpointError(f"{path}: label indices must run 0..{len(labels) - 1} in order")
    return labels


LABEL_SETS = ("audioset", "esc50", "speechcommands")


def bundled_labels(name: str) -> list[Label]:
    """The label sets shipped with the package: audioset (527), esc50 (50), speechcommands (35)."""
    if name not in LABEL_SETS:
        raise CheckpointError(f"unknown label set {name!r}; choose one of {', '.join(LABEL_SETS)} or give a CSV path")
    return read_label_csv(Path(__file__).resolve().parent.parent / "labels" / f"{name}_class_labels_indices.csv")
