"""Run exported graphs with ONNX Runtime: one InferenceSession per r, all checked against the card at start-up.

A folder written by `fastast export-onnx` holds card.json (with its `onnx` entry) and r{N}.onnx per exported r.
Every listed graph is opened when the runner starts, so a missing, corrupt or foreign file fails then, by name,
instead of at the first request for its r.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastast.errors import CheckpointError, FastASTError, InvalidRError
from fastast.export.spec import INPUT, OUTPUT, graph_file, read_spec
from fastast.model.card import ModelCard
from fastast.model.store import CARD

log = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise FastASTError("onnxruntime is not installed: pip install 'fastast[onnx]'") from None
    return onnxruntime


def pick_providers(device: str = "auto", tensorrt: bool = False) -> list:
    """ONNX Runtime providers for a device: CUDA (TensorRT first only if asked) where available, else CPU.

    auto uses CUDA when onnxruntime has it and falls back to the CPU; asking for cuda (or TensorRT) where it is
    missing is an error rather than a silent fallback.
    """
    if not DEVICE.fullmatch(device):
        raise FastASTError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    available = _onnxruntime().get_available_providers()
    if device == "cpu":
        if tensorrt:
            raise FastASTError("TensorRT needs a CUDA device, not cpu")
        return [CPU]
    if CUDA not in available:
        if device != "auto" or tensorrt:
            raise FastASTError(f"device {device}: this onnxruntime has no {CUDA} (install onnxruntime-gpu)")
        return [CPU]
    options = {"device_id": int(device.split(":")[1]) if ":" in device else 0}
    providers = [(CUDA, options), CPU]
    if tensorrt:
        if TENSORRT not in available:
            raise FastASTError(f"TensorRT asked for, but this onnxruntime has no {TENSORRT}")
        providers.insert(0, (TENSORRT, options))
    return providers


def _matches(arg, name: str, type_: str, dims: list[int]) -> bool:
    """One graph input/output against the card: its name, float32, a dynamic batch axis, then `dims`."""
    shape = list(arg.shape or [])
    batch_is_dynamic = bool(shape) and not isinstance(shape[0], int)
    return arg.name == name and arg.type == type_ and batch_is_dynamic and shape[1:] == dims


class OnnxRunner:
    """The exported graphs of one model: `run(features, r) -> logits` for every exported r."""

    def __init__(self, directory: str | Path, device: str = "auto", tensorrt: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"ONNX folder not found: {self.directory}")
        self.card = ModelCard.load(self.directory / CARD)
        self.spec = read_spec(self.card, self.directory / CARD)
        providers = pick_providers(device, tensorrt)
        ort = _onnxruntime()
        self.sessions = {r: self._open(ort, r, providers) for r in self.spec.r}
        self.provider = next(iter(self.sessions.values())).get_providers()[0]
        log.info("onnxruntime %s: graphs for r=%s on %s", ort.__version__, self.r_values_text, self.provider)

    @property
    def r_values(self) -> list[int]:
        return list(self.sessions)

    @property
    def r_values_text(self) -> str:
        return ", ".join(map(str, self.sessions))

    def _open(self, ort, r: int, providers: list):
        """One graph, refused by name when it is missing, unreadable, or not the interface the card describes."""
        path = self.directory / graph_file(r)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, but {self.directory / CARD} lists r={r}")
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unparsable files
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise CheckpointError(f"{path}: not a loadable ONNX graph ({reason})") from None
        spec = self.card.input
        expected = {
            "input": (INPUT, "tensor(float)", [spec.target_length, spec.num_mel_bins]),
            "output": (OUTPUT, "tensor(float)", [self.card.num_classes]),
        }
        for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
            name, type_, dims = expected[kind]
            if not (len(args) == 1 and _matches(args[0], name, type_, dims)):
                found = [(a.name, a.type, a.shape) for a in args]
                raise CheckpointError(
                    f"{path}: graph {kind} {found} does not match the card ({name} {type_} [batch, "
                    f"{', '.join(map(str, dims))}]); was it exported from another model?"
                )
        return session

    def check_r(self, r: int) -> None:
        if r not in self.sessions:
            raise InvalidRError(f"r={r} has no exported ONNX graph; exported r values: {self.r_values_text}")

    def run(self, features: Tensor | np.ndarray, r: int) -> Tensor:
        """Normalized features [B, T, F] -> logits [B, classes] (float32, on the CPU)."""
        self.check_r(r)
        if isinstance(features, Tensor):
            features = features.detach().to("cpu", torch.float32).numpy()
        features = np.ascontiguousarray(features, dtype=np.float32)
        expected = (self.card.input.target_length, self.card.input.num_mel_bins)
        if features.ndim != 3 or features.shape[1:] != expected:
            raise ValueError(f"features must be [batch, {expected[0]}, {expected[1]}], got {list(features.shape)}")
        return torch.from_numpy(self.sessions[r].run([OUTPUT], {INPUT: features})[0])


def runner_for(
    model_dir: str | Path | None,
    r_values: list[int],
    *,
    onnx_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> OnnxRunner:
    """Graphs for every r in r_values: from onnx_dir, else the model folder's own, else exported to a temp dir.

    For tools (fastast bench) that time ONNX Runtime next to PyTorch without a separate export step; the
    temporary graphs are validated like any export and deleted once their sessions are loaded.
    """
    import tempfile

    from fastast.export.onnx import export_onnx

    if onnx_dir is None and model_dir is not None:
        card = ModelCard.load(Path(model_dir) / CARD)
        if "onnx" in (card.model_extra or {}):
            spec = read_spec(card, Path(model_dir) / CARD)
            if set(r_values) <= set(spec.r) and spec.dtype == dtype:
                onnx_dir = model_dir
    if onnx_dir is not None:
        runner = OnnxRunner(onnx_dir, device)
    elif model_dir is None:
        raise FastASTError("ONNX Runtime needs a model folder (--model) or exported graphs (--onnx)")
    else:
        with tempfile.TemporaryDirectory(prefix="fastast-onnx-") as tmp:
            log.info("exporting r=%s of %s to ONNX for this run", ", ".join(map(str, r_values)), model_dir)
            export_onnx(model_dir, tmp, r_values, dtype=dtype)
            runner = OnnxRunner(tmp, device)
    missing = sorted(set(r_values) - set(runner.r_values))
    if missing:
        raise InvalidRError(
            f"no exported ONNX graph for r={missing} in {runner.directory}; exported: {runner.r_values_text}"
        )
    return runner
