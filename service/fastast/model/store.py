"""The model store: a servable model is a folder with `model.safetensors` and `card.json`.

Weights are only ever read with safetensors (no pickle), and their sha256 must match the card.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fastast.device import DTYPES
from fastast.errors import CheckpointError, IntegrityError, InvalidRError
from fastast.model.ast import AST, ASTConfig
from fastast.model.card import ModelCard

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CARD = "card.json"


def ast_config_from_card(card: ModelCard) -> ASTConfig:
    arch = {k: v for k, v in card.arch.items() if k != "type"}
    return ASTConfig(num_classes=card.num_classes, **arch)


def card_arch(config: ASTConfig) -> dict:
    """The card's `arch` entry for an AST (num_classes lives in the card's labels)."""
    arch = {"type": "ast", **config.to_dict()}
    del arch["num_classes"]
    return arch


def build_network(card: ModelCard) -> nn.Module:
    """An untrained network of the architecture the card describes."""
    kind = card.arch.get("type", "ast")
    if kind == "ast":  # the card's validation has checked that its arch builds
        return AST(ast_config_from_card(card))
    if kind == "efficientnet_b2":  # the CMKD teacher; needs timm (the `train` extra)
        from fastast.training.teacher import build_teacher

        return build_teacher(card)
    raise CheckpointError(f"unknown architecture type {kind!r} in card")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_checked(network: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """load_state_dict with one readable error for missing, unexpected or mis-shaped keys."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {_short(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    network.load_state_dict(state)


def _short(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def refuse_overwrite(directory: Path, force: bool) -> None:
    """A command that writes a model into `directory` does not silently replace one already there."""
    if not force and ((directory / CARD).exists() or (directory / WEIGHTS).exists()):
        raise CheckpointError(f"{directory} already holds a model; use --force to overwrite it")


def save_model(directory: str | Path, network: nn.Module, card: ModelCard) -> ModelCard:
    """Write weights and card; the card gets the weights' sha256. Returns the card as written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors writes 0600; a model store is read by other users (e.g. a container's)
    card = card.model_copy(update={"weights_sha256": sha256_file(weights)})
    card.save(directory / CARD)
    return card


def _verify_weights(weights: Path, card: ModelCard, allow_unverified: bool = False) -> None:
    """The weights' sha256 must equal the card's; a card without one passes only when allowed, with a warning."""
    if not card.weights_sha256:
        if not allow_unverified:
            raise IntegrityError(
                f"{weights.parent / CARD} has no weights_sha256, so {weights} cannot be verified: write the file's "
                "sha256 into the card (fastast import and train always do), or load it anyway with --allow-unverified "
                "(serve, predict)"
            )
        log.warning("loading %s unverified: its card has no weights_sha256 (--allow-unverified)", weights)
        return
    actual = sha256_file(weights)
    if actual != card.weights_sha256:
        raise IntegrityError(
            f"{weights}: sha256 {actual[:12]}… does not match the card's {card.weights_sha256[:12]}…"
        )


class FastASTModel(nn.Module):
    """A loaded model: the network plus its card, its front end and its output activation."""

    def __init__(self, network: nn.Module, card: ModelCard):
        super().__init__()
        self.net = network
        self.card = card

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def max_r(self) -> int:
        """Beyond this r nothing more can merge: half the patch tokens."""
        config = getattr(self.net, "config", None)
        return config.num_patches // 2 if isinstance(config, ASTConfig) else 0

    def featurize(self, waveforms: Tensor | np.ndarray, sample_rate: int) -> Tensor:
        """Waveforms [batch, samples] (or [samples]) -> normalized features [batch, time, mel] on the model's device."""
        from fastast.features import model_input

        return model_input(waveforms, sample_rate, self.card.input).to(self.device)

    def forward(self, features: Tensor, r: int | Sequence[int] = 0) -> Tensor:
        if isinstance(self.net, AST):
            return self.net(features.to(self.dtype), r)
        if r != 0:
            raise InvalidRError(f"{self.card.arch.get('type')} models have no token merging; use r=0")
        return self.net(features.to(self.dtype))

    def scores(self, logits: Tensor) -> Tensor:
        return scores_from_logits(logits, self.card.task)


def scores_from_logits(logits: Tensor, task: str) -> Tensor:
    """Sigmoid for multi-label models, softmax for single-label ones (shared by every backend)."""
    logits = logits.float()
    return logits.sigmoid() if task == "multi-label" else logits.softmax(dim=-1)


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    allow_unverified: bool = False,
) -> FastASTModel:
    """Load model_store/NAME: checks the weights' sha256 against the card, never unpickles.

    A card without a sha256 is refused unless `allow_unverified`: a flipped byte would otherwise load silently.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model folder not found: {directory}")
    card = ModelCard.load(directory / CARD)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in {directory}")
    _verify_weights(weights, card, allow_unverified)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    network = build_network(card)
    load_state_dict_checked(network, state, str(weights))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    model = FastASTModel(network, card).eval().to(device=device, dtype=dtype)
    return model
