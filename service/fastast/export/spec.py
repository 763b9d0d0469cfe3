"""The on-disk contract of an ONNX export: graph names, their interface, and the card's `onnx` entry.

Kept free of torch and onnx imports so the CLI can build its parser quickly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from fastast.errors import CheckpointError

if TYPE_CHECKING:
    from fastast.model.card import ModelCard

INPUT, OUTPUT = "features", "logits"  # [batch, target_length, mel] -> [batch, classes], float32
DEFAULT_OPSET = 18
MIN_OPSET = 16  # ScatterElements with reduction="add" (the merge's scatter-add)
MAX_OPSET = 20  # the newest opset the TorchScript exporter writes
EXPORT_DTYPES = ("fp32", "fp16")
GRAPH_NAME = re.compile(r"r(\d+)\.onnx")


class OnnxSpec(BaseModel):
    """The card's `onnx` entry: which graphs exist next to it and how they were made."""

    r: list[int]
    opset: int
    dtype: str
    exporter: str = ""
    max_abs_diff: dict[str, float] = {}


def graph_file(r: int) -> str:
    return f"r{r}.onnx"


def read_spec(card: ModelCard, card_path: Path) -> OnnxSpec:
    """The `onnx` entry of a card; a folder without one has no exported graphs."""
    entry = (card.model_extra or {}).get("onnx")
    if entry is None:
        raise CheckpointError(f"{card_path} lists no ONNX graphs; create them with `fastast export-onnx`")
    try:
        return OnnxSpec.model_validate(entry)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"invalid {card_path}: onnx.{where}: {first['msg']}") from None
