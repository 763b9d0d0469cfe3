"""Per-epoch training checkpoints, pickle-free: weights and optimizer tensors in safetensors, the rest in JSON.

Layout of OUT/checkpoint/: model.safetensors, optimizer.safetensors, state.json (epoch, global step,
best metric, optimizer hyper-parameters and scalar state).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastast.errors import CheckpointError
from fastast.model.store import load_state_dict_checked

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"


def save_checkpoint(directory: Path, network: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(directory / MODEL))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / OPTIMIZER))
    doc = {**state, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(directory / STATE)  # state.json last and atomically: it marks a complete checkpoint


def load_checkpoint(directory: Path, network: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer in place; returns the saved training state."""
    try:
        doc = json.loads((directory / STATE).read_text())
        weights = load_file(str(directory / MODEL))
        tensors = load_file(str(directory / OPTIMIZER))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: {exc}") from None
    load_state_dict_checked(network, weights, str(directory / MODEL))
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *doc["optimizer"]["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    # load_state_dict moves the moments to each parameter's device
    optimizer.load_state_dict({"state": state, "param_groups": doc["optimizer"]["param_groups"]})
    return {k: v for k, v in doc.items() if k != "optimizer"}
