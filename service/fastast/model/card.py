"""The model card: everything needed to rebuild, feed and describe a servable model (card.json)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fastast.errors import CheckpointError

# AudioSet statistics, the default of AST and of Hugging Face's ASTFeatureExtractor.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
# Model sample rates a card may give: telephone band to high-resolution audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
_AST_SIZES = ("dim", "depth", "heads", "patch_size", "fstride", "tstride", "num_mel_bins", "target_length")


class InputSpec(BaseModel):
    """How raw audio becomes the model's input: fbank at sample_rate, pad/trim, (x - mean) / (2 * std).

    A zero std or a NaN mean would turn every score into NaN, and a sample rate of 0 would fail every request:
    such a card is refused when it is read, not blamed on the clients.
    """

    sample_rate: int = Field(16000, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)
    num_mel_bins: int = Field(128, ge=1)
    target_length: int = Field(1024, ge=1)
    mean: float = Field(AUDIOSET_MEAN, allow_inf_nan=False)
    std: float = Field(AUDIOSET_STD, gt=0, allow_inf_nan=False)


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
    pareto: bool | None = None  # no other row of its variant is as accurate and as fast, and better in one


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arch: dict[str, Any]  # {"type": "ast", ...ASTConfig fields}; other types are added by their builders
    input: InputSpec = Field(default_factory=InputSpec)
    labels: list[Label]
    task: Literal["multi-label", "single-label"] = "multi-label"
    provenance: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")  # "" until save_model writes it
    r_table: list[RTableRow] = Field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def own_rows(self) -> list[RTableRow]:
        """The r_table rows measured on these weights (not on a sibling such as the Train+Inf model), one per r."""
        rows: dict[int, RTableRow] = {}
        for row in self.r_table:
            measured_on = (row.model_extra or {}).get("weights_sha256")
            if measured_on in (None, self.weights_sha256):
                rows.setdefault(row.r, row)
        return sorted(rows.values(), key=lambda row: row.r)

    @model_validator(mode="after")
    def _input_fits_network(self) -> ModelCard:
        """The input spec must be the shape the network was built for: otherwise every forward pass would fail."""
        kind = self.arch.get("type", "ast")
        built = _ast_input(self) if kind == "ast" else self.arch
        for key in ("target_length", "num_mel_bins"):
            given = getattr(self.input, key)
            if key in built and built[key] != given:
                raise ValueError(
                    f"input.{key} is {given}, but the {kind} network was built for {built[key]} (arch.{key})"
                )
        return self

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """The one way a card.json is read: whatever is wrong with it is one CheckpointError line."""
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise CheckpointError(f"no card.json in {path.parent}") from None
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        with card_errors(path):
            return cls.model_validate_json(text)


def _ast_input(card: ModelCard) -> dict[str, int]:
    """The input an AST card's architecture takes; refuses an architecture that cannot be built at all."""
    from fastast.model.ast import ASTConfig  # imports torch: only for cards, which are read to load a network

    try:
        config = ASTConfig(num_classes=card.num_classes, **{k: v for k, v in card.arch.items() if k != "type"})
    except TypeError as exc:
        raise ValueError(f"arch does not describe an AST: {exc}") from None
    sizes = {name: getattr(config, name) for name in _AST_SIZES}
    bad = [f"{name} {value!r}" for name, value in sizes.items() if type(value) is not int or value < 1]
    if bad:
        raise ValueError(f"arch sizes must be positive integers, got {', '.join(bad)}")
    if config.dim % config.heads:
        raise ValueError(f"arch.dim {config.dim} is not a multiple of arch.heads {config.heads}")
    if min(config.grid) < 1:
        raise ValueError(
            f"an input of {config.target_length} frames x {config.num_mel_bins} mel bins is smaller than one "
            f"{config.patch_size} x {config.patch_size} patch"
        )
    return {"target_length": config.target_length, "num_mel_bins": config.num_mel_bins}


def pareto_optimal(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (accuracy, speed) points: True where no other point is at least as good in both and better in one."""
    return [
        not any(a >= accuracy and s >= speed and (a, s) != (accuracy, speed) for a, s in points)
        for accuracy, speed in points
    ]


def mark_pareto(rows: Sequence[RTableRow]) -> list[RTableRow]:
    """The rows with `pareto` set, compared within each variant; rows without a speed are left unmarked."""
    groups: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        if row.samples_per_s is not None:
            groups.setdefault(row.variant, []).append(i)
    marked = list(rows)
    for members in groups.values():
        flags = pareto_optimal([(rows[i].value, rows[i].samples_per_s) for i in members])
        for i, flag in zip(members, flags):
            marked[i] = rows[i].model_copy(update={"pareto": flag})
    return marked


@contextmanager
def card_errors(source: str | Path) -> Iterator[None]:
    """Pydantic's ValidationError, raised while a card is read or built, as one CheckpointError line naming `source`."""
    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        raise CheckpointError(f"invalid {source}: {f'{where}: ' if where else ''}{message}") from None


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
