"""Start training from a model_store model (`--init DIR`): AST's positional-embedding adaptation
(reference 2.3: centred cut when the new grid is smaller, bilinear interpolation when it is larger,
time axis first, then frequency) and a fresh head when the label set differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastast.errors import CheckpointError
from fastast.model import tome
from fastast.model.ast import AST
from fastast.model.card import Label
from fastast.model.store import load_model, load_state_dict_checked

# The training options an --init model's own architecture supplies: its width, depth and heads always, its patch
# strides unless the command gives others (AST's fine-tuning choice; the position embeddings follow the new grid).
INIT_ARCH_OPTIONS = ("dim", "depth", "heads")
STRIDE_OPTIONS = ("fstride", "tstride")
AST_HEAD = ("head_norm.", "head.")
TEACHER_HEAD = ("pool.",)


def _fit_axis(grid: Tensor, axis: int, new: int) -> Tensor:
    """grid [1, D, F, T]: centred cut along `axis` (2 = freq, 3 = time) if it shrinks, bilinear if it grows."""
    old = grid.shape[axis]
    if new == old:
        return grid
    if new < old:
        return grid.narrow(axis, old // 2 - new // 2, new)
    size = list(grid.shape[2:])
    size[axis - 2] = new
    return F.interpolate(grid, size=tuple(size), mode="bilinear")


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """[1, 2 + Fo*To, D] -> [1, 2 + Fn*Tn, D]; the [CLS]/distillation entries are kept as they are."""
    special, patches = pos_embed[:, : tome.PROTECTED_TOKENS], pos_embed[:, tome.PROTECTED_TOKENS :]
    dim = pos_embed.shape[-1]
    grid = patches.transpose(1, 2).reshape(1, dim, *old_grid)
    grid = _fit_axis(grid, 3, new_grid[1])
    grid = _fit_axis(grid, 2, new_grid[0])
    return torch.cat([special, grid.flatten(2).transpose(1, 2)], dim=1)


def init_supplied(options: object) -> tuple[str, ...]:
    """The architecture options of `options` (parsed arguments or a TrainConfig) that --init's model supplies, so a
    card records them only when they were used."""
    if getattr(options, "init", None) is None:
        return ()
    return (*INIT_ARCH_OPTIONS, *(k for k in STRIDE_OPTIONS if getattr(options, k) is None))


def init_arch(directory: str | Path) -> dict:
    """The architecture of the init model (the student keeps its width, depth and heads, and its strides unless
    told otherwise)."""
    from fastast.model.card import ModelCard

    return dict(ModelCard.load(Path(directory) / "card.json").arch)


def load_init(directory: str | Path, network: nn.Module, labels: list[Label]) -> dict:
    """Copy the init model's weights into `network`; returns what was adapted (for the card's provenance)."""
    source = load_model(directory)
    state = {k: v.float() for k, v in source.net.state_dict().items()}
    notes: dict = {"init": str(directory)}
    same_labels = [lab.mid for lab in source.card.labels] == [lab.mid for lab in labels]
    if isinstance(network, AST):
        if not isinstance(source.net, AST):
            raise CheckpointError(f"--init {directory}: an AST student needs an AST to start from")
        old_grid, new_grid = source.net.config.grid, network.config.grid
        if old_grid != new_grid:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid)
            notes["pos_embed"] = f"{old_grid} -> {new_grid}"
        head = AST_HEAD
    else:
        head = TEACHER_HEAD
    if not same_labels:
        fresh = network.state_dict()
        state.update({k: v for k, v in fresh.items() if k.startswith(head)})
        notes["head"] = f"replaced ({len(source.card.labels)} -> {len(labels)} labels)"
    load_state_dict_checked(network, state, f"--init {directory}")
    return notes
