"""Export a FastAST model to ONNX: one graph per r, Token Merging inside the graph, checked against PyTorch.

Why one graph per r: ToMe removes r tokens in every block, so each r has its own (static) token counts; only
the batch axis is dynamic. The merge itself (cosine scores, -inf masking, max/argmax, argsort, gathers and
the size-weighted scatter-add) is traced into ordinary ONNX ops, so a graph needs no custom kernels.

Exporter: torch.onnx's TorchScript exporter (`dynamo=False`). The torch.export-based exporter needs onnxscript,
which is not installed here; the TorchScript one is still shipped (deprecated) by torch 2.11 through 2.14 and
gives graphs that match PyTorch on every r, at batch 1 and 5, which `export_onnx` checks before writing a file.
Its tracer sees the token counts as Python ints and warns that they become constants: that is intended, since
they are fixed by r and the target length; the batch size is never folded (validation runs batch 1 and 5
through a graph traced at batch 2).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from fastast.device import DTYPES
from fastast.errors import ExportError, InvalidRError
from fastast.export.spec import (
    DEFAULT_OPSET,
    EXPORT_DTYPES,
    GRAPH_NAME,
    INPUT,
    MAX_OPSET,
    MIN_OPSET,
    OUTPUT,
    OnnxSpec,
    graph_file,
)
from fastast.model.card import ModelCard
from fastast.model.store import CARD, FastASTModel, load_model

log = logging.getLogger(__name__)

# (atol, rtol) of ONNX Runtime against PyTorch in the same precision: |ort - torch| <= atol + rtol * |torch|.
TOLERANCE = {"fp32": (1e-4, 0.0), "fp16": (1e-2, 1e-2)}
NUDGE = {"fp32": 1e-6, "fp16": 1e-3}  # input change that probes PyTorch's own sensitivity (about one ulp of fp16)
TRACE_BATCH = 2  # not 1, so no size can be specialised to a single sample
CHECK_BATCHES = (1, 5)
SPEECH = "the quick brown fox jumps over the lazy dog"


class FixedR(nn.Module):
    """The model at one r, float32 in and out whatever its precision, so every graph has the same interface."""

    def __init__(self, model: FastASTModel, r: int):
        super().__init__()
        self.model = model
        self.r = r

    def forward(self, features: Tensor) -> Tensor:
        return self.model(features, self.r).float()


@symbolic_helper.parse_args("v", "i", "v", "v", "s", "b")
def _scatter_reduce(g, self, dim: int, index, src, reduce: str, include_self: bool):
    """aten::scatter_reduce(sum) as one ScatterElements(add) (the stock symbolic adds If nodes for 0-d inputs,
    which ONNX Runtime then warns about on every run).

    Half-precision operands are added in float32: ONNX Runtime's CPU kernel has no fp16 reduction, and the
    size-weighted sums are more exact that way.
    """
    if reduce != "sum" or not include_self:  # the merge's size-weighted sums are the only scatter in the graph
        raise ExportError(f"scatter_reduce({reduce!r}, include_self={include_self}) is not supported by the export")
    scalar = self.type().scalarType()
    if scalar in ("Half", "BFloat16"):
        to_float = symbolic_helper.cast_pytorch_to_onnx["Float"]
        self, src = g.op("Cast", self, to_i=to_float), g.op("Cast", src, to_i=to_float)
        out = g.op("ScatterElements", self, index, src, axis_i=dim, reduction_s="add")
        return g.op("Cast", out, to_i=symbolic_helper.cast_pytorch_to_onnx[scalar])
    out = g.op("ScatterElements", self, index, src, axis_i=dim, reduction_s="add")
    out.setType(self.type())
    return out


@contextmanager
def _exporter() -> Iterator[None]:
    """The TorchScript exporter with our scatter_reduce, and without the warnings the module docstring explains."""
    torch.onnx.register_custom_op_symbolic("aten::scatter_reduce", _scatter_reduce, MIN_OPSET)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::scatter_reduce", MIN_OPSET)


def export_graph(model: FastASTModel, r: int, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace the model at one r into `path` (input `features` [batch, T, F], output `logits` [batch, classes])."""
    spec = model.card.input
    example = torch.zeros(TRACE_BATCH, spec.target_length, spec.num_mel_bins, device=model.device)
    with _exporter(), torch.no_grad():
        torch.onnx.export(
            FixedR(model, r).eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )


def check_graph(path: Path, model: FastASTModel, r: int, inputs: dict[str, Tensor], dtype: str) -> float:
    """onnx.checker, then ONNX Runtime (CPU) against PyTorch on every input set at batch 1 and 5; the max |diff|.

    A sample passes within TOLERANCE, or, failing that, within twice PyTorch's own sensitivity on it: on real
    audio, padded frames give near-identical tokens whose similarities tie to the last bit, so which of them
    merge depends on rounding, and a different summation order (ONNX Runtime's, or just another input nudged by
    1e-6) moves the logits by more than 1e-4. Random inputs have no such ties and must meet TOLERANCE, which is
    what catches a wrong graph.
    """
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"r={r}: the exported graph fails the ONNX checker: {exc}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    atol, rtol = TOLERANCE[dtype]
    reference = FixedR(model, r)
    worst = 0.0
    for name, features in inputs.items():
        for batch in CHECK_BATCHES:
            x = features[:batch]
            expected = _run(reference, x)
            diff = np.abs(session.run([OUTPUT], {INPUT: x.cpu().numpy()})[0] - expected)
            worst = max(worst, float(diff.max()))
            outside = np.flatnonzero(np.any(diff > atol + rtol * np.abs(expected), axis=1))
            if outside.size == 0:
                continue
            row_diff = diff[outside].max(axis=1)
            sensitivity = _sensitivity(reference, x[outside], expected[outside], NUDGE[dtype])
            if np.all(row_diff <= 2 * sensitivity):
                log.warning(
                    "r=%d, %s input, batch %d: %d sample(s) differ by up to %.2g, within PyTorch's own sensitivity "
                    "(up to %.2g for input changes of %g): merge near-ties",
                    r, name, batch, outside.size, row_diff.max(), sensitivity.max(), NUDGE[dtype],
                )
                continue
            raise ExportError(
                f"r={r}: ONNX Runtime and PyTorch disagree on {name} input at batch {batch}: max |diff| "
                f"{row_diff.max():.3g} > tolerance (atol {atol:g}, rtol {rtol:g}, {dtype}) and > twice PyTorch's "
                f"own sensitivity to a {NUDGE[dtype]:g} input change ({sensitivity.max():.3g})"
            )
    return worst


def _run(module: nn.Module, x: Tensor) -> np.ndarray:
    with torch.inference_mode():
        return module(x).cpu().numpy()


def _sensitivity(module: nn.Module, x: Tensor, expected: np.ndarray, nudge: float, tries: int = 4) -> np.ndarray:
    """Per sample, how far PyTorch's logits move when the input moves by `nudge` (seeded, a few tries)."""
    moved = np.zeros(len(x), dtype=np.float32)
    for seed in range(tries):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
        moved = np.maximum(moved, np.abs(_run(module, x + nudge * noise) - expected).max(axis=1))
    return moved


def speech_waves(sample_rate: int, audio: Sequence[str | os.PathLike] = ()) -> list[np.ndarray]:
    """Real audio to validate on: the given files, else espeak-ng speech, else a seeded synthetic mix."""
    from fastast.audio import load_audio

    if audio:
        return [load_audio(path, sample_rate) for path in audio]
    if shutil.which("espeak-ng"):
        wav = subprocess.run(["espeak-ng", "--stdout", SPEECH], check=True, capture_output=True).stdout
        return [load_audio(wav, sample_rate)]
    log.warning("espeak-ng not found and no --audio given: validating on synthetic chirps instead of speech")
    t = np.arange(2 * sample_rate) / sample_rate
    rng = np.random.default_rng(0)
    chirp = np.sin(2 * np.pi * (200 + 900 * t) * t) * np.exp(-((t % 0.5) * 4))
    return [(0.3 * chirp + 0.01 * rng.standard_normal(t.size)).astype(np.float32)]


def validation_inputs(model: FastASTModel, waves: Sequence[np.ndarray]) -> dict[str, Tensor]:
    """Seeded random features and featurized real audio, 5 rows each; the clips are cut to different lengths so
    that the rows carry different amounts of padding (padded frames make near-identical tokens, the hard case
    for the merge's argsort)."""
    spec = model.card.input
    shape = (max(CHECK_BATCHES), spec.target_length, spec.num_mel_bins)
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(shape, generator=generator).to(model.device)
    span = int(spec.target_length * 0.01 * spec.sample_rate)  # samples the model sees (10 ms frame shift)
    clips = []
    for i in range(shape[0]):
        wave = waves[i % len(waves)]
        start = (i * len(wave)) // 10
        clips.append(wave[start : start + int(span * (1 - 0.15 * i))])
    speech = torch.cat([model.featurize(clip, spec.sample_rate) for clip in clips])
    return {"random": random, "speech": speech}


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    r_values: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    audio: Sequence[str | os.PathLike] = (),
) -> ModelCard:
    """Write r{N}.onnx for every r plus the card (with an `onnx` entry) into out_dir; returns that card.

    Every graph is checked before anything is written to out_dir, so a failed export leaves it as it was
    (apart from being created). Graphs of r values no longer listed are removed, so folder and card agree.
    Export runs on the CPU: the graph does not depend on the device it was traced on, and the parity check
    compares ONNX Runtime's CPU provider with PyTorch on the CPU, where both are deterministic.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    r_values = sorted(set(r_values))
    if not r_values or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in r_values):
        raise InvalidRError(f"r values must be non-negative integers, got {list(r_values)}")
    model = load_model(model_dir, device="cpu", dtype=DTYPES[dtype])
    if r_values != [0] and model.max_r == 0:
        raise InvalidRError(f"{model.card.arch.get('type')} models have no token merging; export r=0 only")
    inputs = validation_inputs(model, speech_waves(model.card.input.sample_rate, audio))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    diffs = {}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as staging:
        for r in r_values:
            path = Path(staging) / graph_file(r)
            export_graph(model, r, path, opset)
            diffs[str(r)] = check_graph(path, model, r, inputs, dtype)
            log.info("r=%d: %s checked, max |ORT - torch| = %.2g", r, graph_file(r), diffs[str(r)])
        for stale in out_dir.glob("r*.onnx"):
            match = GRAPH_NAME.fullmatch(stale.name)
            if match and int(match[1]) not in r_values:
                stale.unlink()
        for r in r_values:
            os.replace(Path(staging) / graph_file(r), out_dir / graph_file(r))
    spec = OnnxSpec(
        r=r_values,
        opset=opset,
        dtype=dtype,
        exporter=f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}",
        max_abs_diff=diffs,
    )
    card = model.card.model_copy(update={"onnx": spec.model_dump()})
    card.save(out_dir / CARD)
    return card
