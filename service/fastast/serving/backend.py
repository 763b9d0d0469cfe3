"""Inference backends: what the engine calls to turn a batch of features into scores.

The engine knows only the `Backend` interface (normalized features [B, T, F] on `feature_device` at one r ->
scores [B, classes]), so another runtime (ONNX Runtime, say) plugs in without touching the batcher or the routes.
The audio front end is the same for every backend: the engine computes it on `feature_device` from the model
card's input spec.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fastast.device import DTYPES, resolve_device
from fastast.errors import FastASTError
from fastast.model.card import ModelCard
from fastast.model.compiled import compile_model
from fastast.model.store import FastASTModel, load_model

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Backend(abc.ABC):
    """One loaded model on one device. `run` is called from the engine's single inference thread only."""

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

    def prepare(self, r_values: Sequence[int]) -> None:
        """Called before the warm-up with the r values it runs: a backend may specialise for them (torch.compile)."""

    @property
    def r_values(self) -> list[int] | None:
        """The only r values this backend can run (ONNX: one graph each); None for any r up to max_r."""
        return None

    @property
    def feature_device(self) -> torch.device:
        """Where the engine computes the features it passes to `run`."""
        return torch.device("cpu")

    @abc.abstractmethod
    def run(self, features: Tensor, r: int) -> Tensor:
        """Normalized features [B, T, F] float32 on feature_device -> scores [B, classes] (float, any device)."""

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.card.input.target_length, self.card.input.num_mel_bins


class TorchBackend(Backend):
    """FastASTModel in PyTorch, under torch.inference_mode: eager, or with `compiled` torch.compile graphs for the
    r values the warm-up runs (any other r runs eagerly, so no request ever waits for a compile)."""

    name = "torch"

    def __init__(self, model: FastASTModel, compiled: bool = False):
        super().__init__(model.card)
        self.model = model
        self.compiled = compiled
        self._graphs: Callable[[Tensor, int], Tensor] | None = None
        self._compiled_r: frozenset[int] = frozenset()

    def prepare(self, r_values: Sequence[int]) -> None:
        """With `compiled`: two graphs per r (batch size 1, and any other size: the batch dimension is dynamic)."""
        if self.compiled:
            self._graphs = compile_model(self.model, graphs=2 * len(r_values))
            self._compiled_r = frozenset(r_values)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return DTYPE_NAMES.get(self.model.dtype, str(self.model.dtype))

    @property
    def max_r(self) -> int:
        return self.model.max_r

    @property
    def feature_device(self) -> torch.device:
        return self.model.device

    def run(self, features: Tensor, r: int) -> Tensor:
        features = features.to(self.model.device, non_blocking=True)
        with torch.inference_mode():
            if self._graphs is None or r not in self._compiled_r:
                return self.model.scores(self.model(features, r))
            if len(features) > 1:
                torch._dynamo.mark_dynamic(features, 0)
            return self.model.scores(self._graphs(features, r))


def resolve_dtype(name: str, device: torch.device) -> str:
    """auto -> fp32 on CPU (where half precision is slower), bf16 on CUDA (fp16 where bf16 is unsupported)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_torch_backend(
    model_dir: Path, device: str = "auto", dtype: str = "auto", allow_unverified: bool = False, compiled: bool = False
) -> TorchBackend:
    torch_device = resolve_device(device)
    model = load_model(
        model_dir, device=torch_device, dtype=resolve_dtype(dtype, torch_device), allow_unverified=allow_unverified
    )
    return TorchBackend(model, compiled)


def load_backend(settings) -> Backend:
    """The runtime --backend names, on --model with --device and --dtype."""
    if settings.backend == "onnxruntime":
        if settings.torch_compile:
            raise FastASTError("--torch-compile applies to the torch backend, not onnxruntime")
        from fastast.export.backend import load_onnx_backend

        return load_onnx_backend(settings.model, settings.device, settings.dtype)
    return load_torch_backend(
        settings.model, settings.device, settings.dtype, settings.allow_unverified, settings.torch_compile
    )
