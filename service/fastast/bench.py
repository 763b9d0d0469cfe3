"""Model throughput: samples/s of AST+ToMe against r, next to the FLOPs that merging saves.

Only torch (and fastast's torch-only model code) is imported at module level, so the benchmark runs on a
bare GPU box; transformers is imported only for the `--vs-hf` baseline. A backend is any `Runner`, a
callable `(features, r) -> logits`, so ONNX Runtime or a compiled model plugs in without changes here.

Timing: every (backend, r) case is warmed up, then timed in interleaved rounds (each round runs every
case once, in a rotating order), so drifting background load hits all cases alike; the median per case
is reported. CUDA is synchronized around every timed call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch
from torch import Tensor

from fastast.device import DTYPES
from fastast.errors import FastASTError
from fastast.model import tome
from fastast.model.ast import AST, SIZES, ASTConfig
from fastast.model.compiled import compile_model

Runner = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class Backend:
    """A way to run the model; `merges=False` for one without ToMe (timed at r=0 only, as a baseline)."""

    name: str
    runner: Runner
    merges: bool = True


@dataclass(frozen=True)
class RResult:
    r: int
    samples_per_s: float
    speedup: float  # samples/s at r over samples/s at r=0
    flops_ratio: float  # encoder FLOPs at r over those at r=0
    tokens_out: int
    ms_per_batch: float  # median
    ms_per_batch_min: float  # the fastest run: background load only ever slows a run down


@dataclass(frozen=True)
class BaselineResult:
    backend: str
    r: int
    samples_per_s: float
    ratio: float  # the main backend's samples/s over this one's, at the same r (> 1: ours is faster)
    max_abs_diff: float  # largest logit difference to the main backend, same input


@dataclass
class BenchReport:
    backend: str  # the main backend; `results` are its numbers
    arch: str
    target_length: int
    tokens_in: int
    batch_size: int
    device: str
    dtype: str
    warmup: int
    runs: int
    results: list[RResult]
    baselines: list[BaselineResult] = field(default_factory=list)
    threads: int = field(default_factory=torch.get_num_threads)
    torch: str = torch.__version__
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)


def block_flops(dim: int, hidden: int, tokens_in: int, tokens_out: int) -> int:
    """FLOPs (2 per multiply-add) of one block for one sample.

    Attention (qkv and output projections, q.k^T and attn.v) runs on the tokens entering the block; the
    MLP runs on the tokens left after the merge. Norms, activations and the matching itself are left out.
    """
    projections = 2 * tokens_in * dim * 4 * dim
    attention = 2 * 2 * tokens_in * tokens_in * dim
    mlp = 2 * 2 * tokens_out * dim * hidden
    return projections + attention + mlp


def encoder_flops(config: ASTConfig, r: int | Sequence[int]) -> int:
    """FLOPs of the transformer blocks for one sample, from the token count before and after each merge."""
    counts = tome.token_schedule(config.num_tokens, tome.parse_r(r, config.depth))
    hidden = int(config.dim * config.mlp_ratio)
    entering = [config.num_tokens, *counts[:-1]]
    return sum(block_flops(config.dim, hidden, n_in, n_out) for n_in, n_out in zip(entering, counts))


def tokens_out(config: ASTConfig, r: int | Sequence[int]) -> int:
    """Tokens left after the last block."""
    return tome.token_schedule(config.num_tokens, tome.parse_r(r, config.depth))[-1]


def random_network(arch: str, target_length: int, num_classes: int) -> AST:
    """An AST of a preset size with random weights: throughput depends on the shapes, not on the values
    (merging picks which tokens to merge by similarity, but always merges the same number)."""
    if arch not in SIZES:
        raise FastASTError(f"unknown arch {arch!r}; choose one of {', '.join(SIZES)}")
    try:
        config = ASTConfig.preset(arch, num_classes, target_length=target_length)
        if config.num_patches < 1:
            raise ValueError(f"target length {target_length} is shorter than one {config.patch_size}-frame patch")
    except ValueError as exc:
        raise FastASTError(str(exc)) from None
    return AST(config).eval()


def hf_backend(network: AST) -> Backend:
    """transformers' ASTForAudioClassification (sdpa attention) with the same weights, device and dtype."""
    try:
        from fastast.model.importers import to_hf_model

        hf = to_hf_model(network, attn_implementation="sdpa")
    except ImportError as exc:
        raise FastASTError(f"--vs-hf needs transformers, a dev dependency ({exc})") from None
    return Backend("transformers-sdpa", lambda features, r: hf(input_values=features).logits, merges=False)


def compiled_runner(network: AST, r_values: Sequence[int]) -> Runner:
    """The network under torch.compile: a graph per r (one batch size here), built in that case's warm-up."""
    return compile_model(network, graphs=len(r_values) + 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: Sequence[tuple[Runner, int]], features: Tensor, warmup: int, runs: int) -> list[list[float]]:
    """Seconds per call of each (runner, r), measured in interleaved rounds with a rotating order."""
    device = features.device
    times: list[list[float]] = [[] for _ in cases]
    with torch.inference_mode():
        for _ in range(warmup):
            for runner, r in cases:
                runner(features, r)
        for round_index in range(runs):
            shift = round_index % len(cases)
            for index in [*range(shift, len(cases)), *range(shift)]:
                runner, r = cases[index]
                synchronize(device)
                start = time.perf_counter()
                runner(features, r)
                synchronize(device)
                times[index].append(time.perf_counter() - start)
    return times


def max_abs_diff(main: Runner, other: Runner, features: Tensor, r: int) -> float:
    """Largest logit difference between two backends on the same input: the timings compare like with like."""
    with torch.inference_mode():
        return (main(features, r).float().cpu() - other(features, r).float().cpu()).abs().max().item()


def run_bench(
    backends: Sequence[Backend],
    config: ASTConfig,
    features: Tensor,
    rs: Sequence[int],
    *,
    warmup: int,
    runs: int,
    arch: str,
) -> BenchReport:
    """Time the first backend at every r (r=0 always, as the reference) and the others alongside it."""
    if runs < 1 or warmup < 0:
        raise FastASTError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    main, others = backends[0], backends[1:]
    rs = [0, *(r for r in rs if r != 0)]
    cases = [(main.name, main.runner, r) for r in rs]
    cases += [(b.name, b.runner, r) for b in others for r in (rs if b.merges else [0])]
    times = time_cases([(runner, r) for _, runner, r in cases], features, warmup, runs)
    seconds = {(name, r): statistics.median(t) for (name, _, r), t in zip(cases, times)}
    fastest = {(name, r): min(t) for (name, _, r), t in zip(cases, times)}

    batch = features.shape[0]
    base_flops = encoder_flops(config, 0)
    results = [
        RResult(
            r=r,
            samples_per_s=batch / seconds[main.name, r],
            speedup=seconds[main.name, 0] / seconds[main.name, r],
            flops_ratio=encoder_flops(config, r) / base_flops,
            tokens_out=tokens_out(config, r),
            ms_per_batch=1e3 * seconds[main.name, r],
            ms_per_batch_min=1e3 * fastest[main.name, r],
        )
        for r in rs
    ]
    baselines = [
        BaselineResult(
            backend=name,
            r=r,
            samples_per_s=batch / seconds[name, r],
            ratio=seconds[name, r] / seconds[main.name, r],
            max_abs_diff=max_abs_diff(main.runner, runner, features, r),
        )
        for name, runner, r in cases
        if name != main.name
    ]
    return BenchReport(
        backend=main.name,
        arch=arch,
        target_length=config.target_length,
        tokens_in=config.num_tokens,
        batch_size=batch,
        device=describe_device(features.device),
        dtype=next(name for name, dtype in DTYPES.items() if dtype == features.dtype),
        warmup=warmup,
        runs=runs,
        results=results,
        baselines=baselines,
    )


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def format_table(report: BenchReport) -> str:
    """The human-readable report: one row per r, then one line per baseline."""
    lines = [
        f"{report.backend}: AST {report.arch}, {report.tokens_in} tokens ({report.target_length} frames), batch {report.batch_size}, "
        f"{report.device} {report.dtype}, {report.threads} threads, torch {report.torch}",
        f"median of {report.runs} interleaved runs after {report.warmup} warm-up",
        f"{'r':>4}  {'tokens_out':>10}  {'samples/s':>10}  {'ms/batch':>9}  {'best ms':>9}  {'speedup':>7}  {'flops_ratio':>11}  {'1/flops':>7}",
    ]
    for row in report.results:
        lines.append(
            f"{row.r:>4}  {row.tokens_out:>10}  {row.samples_per_s:>10.2f}  {row.ms_per_batch:>9.1f}  {row.ms_per_batch_min:>9.1f}  "
            f"{row.speedup:>6.2f}x  {row.flops_ratio:>11.3f}  {1 / row.flops_ratio:>6.2f}x"
        )
    for base in report.baselines:
        lines.append(
            f"{base.backend} r={base.r}: {base.samples_per_s:.2f} samples/s; "
            f"{report.backend} is {base.ratio:.2f}x as fast (max |logit diff| {base.max_abs_diff:.1e})"
        )
    return "\n".join(lines)


def make_features(config: ASTConfig, batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Random normalized features [batch, time, mel]; like real ones they are roughly unit-scale."""
    generator = torch.Generator().manual_seed(seed)
    features = 0.5 * torch.randn(batch_size, config.target_length, config.num_mel_bins, generator=generator)
    return features.to(device=device, dtype=dtype)

