"""The serving Backend on ONNX Runtime: the batcher, routes and metrics are the ones the torch backend uses.

Only the exported r values can run (one graph each); any other r is refused before it is queued.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from fastast.errors import FastASTError
from fastast.export.ort import CPU, OnnxRunner
from fastast.model.store import scores_from_logits
from fastast.serving.backend import Backend


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(self, runner: OnnxRunner):
        super().__init__(runner.card)
        self.runner = runner
        session = runner.sessions[runner.r_values[0]]
        device_id = session.get_provider_options().get(runner.provider, {}).get("device_id", "0")
        self._device = f"{'cpu' if runner.provider == CPU else f'cuda:{device_id}'}/{runner.provider}"

    @property
    def device(self) -> str:
        """Where it runs and through which execution provider (e.g. cpu/CPUExecutionProvider): fastast_model_info's
        `device` label, so dashboards see the provider next to backend="onnxruntime"."""
        return self._device

    @property
    def dtype(self) -> str:
        return self.runner.spec.dtype

    @property
    def max_r(self) -> int:
        return max(self.runner.r_values)

    def check_r(self, r: int) -> None:
        self.runner.check_r(r)

    @property
    def r_values(self) -> list[int]:
        return list(self.runner.r_values)

    def run(self, features: Tensor, r: int) -> Tensor:
        return scores_from_logits(self.runner.run(features, r), self.card.task)


def load_onnx_backend(directory: Path, device: str = "auto", dtype: str = "auto") -> OnnxBackend:
    """The graphs in `directory` (written by `fastast export-onnx`); their precision was fixed at export."""
    runner = OnnxRunner(directory, device)
    if dtype not in ("auto", runner.spec.dtype):
        raise FastASTError(f"--dtype {dtype}: the ONNX graphs in {directory} were exported as {runner.spec.dtype}")
    return OnnxBackend(runner)
