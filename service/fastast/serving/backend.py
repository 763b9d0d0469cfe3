"""Inference backends: what the batcher calls to turn a batch of features into scores.

The service knows only the `Backend` interface (features [B, T, F] at one r -> scores [B, classes]), so another
runtime (ONNX Runtime, say) plugs in without touching the batcher or the routes. The audio front end is the
same for every backend: it depends only on the model card's input spec.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastast import audio
from fastast.device import DTYPES, resolve_device
from fastast.model.card import ModelCard
from fastast.model.store import FastASTModel, load_model

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Backend(abc.ABC):
    """One loaded model on one device. `run` is called from a single inference thread only."""

    name: str  # the runtime, e.g. "torch"; the `backend` label of fastast_model_info

    def __init__(self, card: ModelCard):
        self.card = card

    @property
    @abc.abstractmethod
    def device(self) -> str: ...

    @property
    @abc.abstractmethod
    def dtype(self) -> str: ...

    @property
    @abc.abstractmethod
    def max_r(self) -> int:
        """The largest r that still merges something (0 for models without token merging)."""

    def check_r(self, r: int) -> None:
        """Raise InvalidRError for an r this backend cannot run (ONNX: one without a graph); any r by default."""

    @abc.abstractmethod
    def run(self, features: Tensor, r: int) -> Tensor:
        """Normalized features [B, T, F] (CPU float32) -> scores [B, classes] (CPU float32)."""

    def featurize(self, wave: np.ndarray) -> Tensor:
        """Mono float32 samples at the model's rate -> features [T, F] on the CPU (thread-safe; runs in the decode pool)."""
        spec = self.card.input
        features = audio.featurize(
            wave,
            spec.sample_rate,
            target_length=spec.target_length,
            mean=spec.mean,
            std=spec.std,
            num_mel_bins=spec.num_mel_bins,
            model_sample_rate=spec.sample_rate,
        )
        return features[0]

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.card.input.target_length, self.card.input.num_mel_bins


class TorchBackend(Backend):
    """FastASTModel in eager PyTorch, under torch.inference_mode."""

    name = "torch"

    def __init__(self, model: FastASTModel):
        super().__init__(model.card)
        self.model = model

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return DTYPE_NAMES.get(self.model.dtype, str(self.model.dtype))

    @property
    def max_r(self) -> int:
        return self.model.max_r

    def run(self, features: Tensor, r: int) -> Tensor:
        with torch.inference_mode():
            logits = self.model(features.to(self.model.device, non_blocking=True), r)
            return self.model.scores(logits).cpu()


def resolve_dtype(name: str, device: torch.device) -> str:
    """auto -> fp32 on CPU (where half precision is slower), bf16 on CUDA (fp16 where bf16 is unsupported)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_torch_backend(
    model_dir: Path, device: str = "auto", dtype: str = "auto", allow_unverified: bool = False
) -> TorchBackend:
    torch_device = resolve_device(device)
    model = load_model(
        model_dir, device=torch_device, dtype=resolve_dtype(dtype, torch_device), allow_unverified=allow_unverified
    )
    return TorchBackend(model)


def load_backend(settings) -> Backend:
    """The runtime --backend names, on --model with --device and --dtype."""
    if settings.backend == "onnxruntime":
        from fastast.export.backend import load_onnx_backend

        return load_onnx_backend(settings.model, settings.device, settings.dtype)
    return load_torch_backend(settings.model, settings.device, settings.dtype, settings.allow_unverified)
