"""Uniform weight averaging ("model soup", Wortsman et al. 2022) of runs fine-tuned from one start.

Runs that share their initial weights end in one basin of the loss, so the mean of their weights is a model of the
same size that is usually better than a typical run (on the default model: about a point on real speakers, twice;
docs/BENCHMARKS.md). Runs from different starts do not average into anything useful, and nothing here can tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fastast.errors import CheckpointError
from fastast.model.card import ModelCard
from fastast.model.store import load_model

# What must be equal for weights to be averaged and the result fed and read like each of them.
SAME = ("arch", "input", "labels", "task")


def average_models(directories: Sequence[str | Path]) -> tuple[nn.Module, ModelCard]:
    """The network whose every tensor is the mean of the models' (each verified on load), and its card.

    The card is the first model's, without its r_table (measured on other weights) or sha256 (save_model writes the
    new one), and with a provenance naming the averaged models by folder and sha256.
    """
    if len(directories) < 2:
        raise CheckpointError(f"averaging needs at least two models, got {len(directories)}")
    models = [load_model(directory) for directory in directories]
    first = models[0].card
    for directory, model in zip(directories[1:], models[1:]):
        for key in SAME:
            if getattr(model.card, key) != getattr(first, key):
                raise CheckpointError(f"{directory} and {directories[0]} differ in their cards' {key}: cannot average")
    states = [model.net.state_dict() for model in models]
    mean = {key: torch.stack([state[key].double() for state in states]).mean(dim=0).to(tensor.dtype)
            for key, tensor in states[0].items()}
    network = models[0].net  # already built for this card: it takes the mean in place of its own weights
    network.load_state_dict(mean)
    provenance = {
        "source": "fastast average",
        "models": [{"model": str(d), "weights_sha256": m.card.weights_sha256} for d, m in zip(directories, models)],
    }
    return network, first.model_copy(update={"r_table": [], "provenance": provenance, "weights_sha256": ""})
