"""Evaluation: accuracy / mAP (written here, no sklearn) and the accuracy-and-throughput-vs-r sweep.

The sweep decodes every batch once and runs it at every r, timing only the forward passes, so the
samples/s column measures the model (not the decoder) and all r values see identical inputs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fastast.model.card import ModelCard, RTableRow, mark_pareto


def accuracy(scores: Tensor, targets: Tensor) -> float:
    """Share of samples whose top-scoring class is the target's top class."""
    return (scores.argmax(dim=-1) == targets.argmax(dim=-1)).float().mean().item()


def average_precision(scores: Tensor, positives: Tensor) -> float:
    """AP of one class: the mean, over positives, of the precision at that positive's rank (sklearn's definition).

    Tied scores form one threshold: every sample in a tie group is counted before precision is taken.
    """
    positives = positives.float()
    total = positives.sum().item()
    if total == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positives = scores[order], positives[order]
    tp = positives.cumsum(0)
    # Keep the last index of every run of equal scores: one operating point per distinct threshold.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    idx = last.nonzero().squeeze(1)
    tp_at, n_at = tp[idx], (idx + 1).float()
    recall = tp_at / total
    precision = tp_at / n_at
    recall_gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_gain * precision).sum().item())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean AP over the classes that have at least one positive (AST: per-class AP, then the mean)."""
    positives = targets > 0.5
    aps = [average_precision(scores[:, c], positives[:, c]) for c in range(targets.shape[1]) if positives[:, c].any()]
    return sum(aps) / len(aps) if aps else float("nan")


def metric_name(task: str) -> str:
    return "mAP" if task == "multi-label" else "accuracy"


def metric_value(task: str, scores: Tensor, targets: Tensor) -> float:
    return mean_average_precision(scores, targets) if task == "multi-label" else accuracy(scores, targets)


@dataclass
class SweepResult:
    rows: list[RTableRow]
    samples: int
    failed: list[str]
    scores: dict[int, Tensor] = field(default_factory=dict)  # r -> [samples, classes], in loader order
    target: Tensor | None = None


def accuracy_by_group(scores: Tensor, target: Tensor, groups: Sequence[str]) -> dict[str, tuple[int, int]]:
    """group -> (correct, total) top-1 answers, e.g. per speaker: a mean hides the speakers a model fails."""
    hits = (scores.argmax(dim=-1) == target.argmax(dim=-1)).tolist()
    right = Counter(group for group, hit in zip(groups, hits, strict=True) if hit)
    totals = Counter(groups)
    return {group: (right[group], totals[group]) for group in sorted(totals)}


def sweep(
    forward: Callable[[Tensor, int], Tensor],
    prepare: Callable[[Tensor], Tensor],
    activation: Callable[[Tensor], Tensor],
    loader: DataLoader,
    r_values: Sequence[int],
    task: str,
    variant: str | None = None,
    synchronize: Callable[[], None] = lambda: None,
) -> SweepResult:
    """Run every batch at every r; rows of (r, metric, drop vs the first r, samples/s)."""
    scores: dict[int, list[Tensor]] = {r: [] for r in r_values}
    seconds = dict.fromkeys(r_values, 0.0)
    targets, failed, samples = [], [], 0
    with torch.inference_mode():
        for batch in loader:
            failed.extend(batch.failed)
            if len(batch) == 0:
                continue
            features = prepare(batch.fbank)
            targets.append(batch.target)
            samples += len(batch)
            for r in r_values:
                synchronize()
                start = time.perf_counter()
                logits = forward(features, r)
                synchronize()
                seconds[r] += time.perf_counter() - start
                scores[r].append(activation(logits).float().cpu())
    if not targets:
        return SweepResult([], 0, failed)
    target = torch.cat(targets)
    name = metric_name(task)
    stacked = {r: torch.cat(scores[r]) for r in r_values}
    values = {r: metric_value(task, stacked[r], target) for r in r_values}
    base = values[r_values[0]]
    rows = [
        RTableRow(r=r, metric=name, value=round(values[r], 6), drop=round(base - values[r], 6),
                  samples_per_s=round(samples / seconds[r], 2) if seconds[r] > 0 else None, variant=variant)
        for r in r_values
    ]
    return SweepResult(rows, samples, failed, stacked, target)


def run_evaluation(
    model_dir: str | Path,
    manifest: str | Path,
    r_values: Sequence[int],
    *,
    batch_size: int = 32,
    device: str = "auto",
    workers: int = 2,
    variant: str | None = None,
) -> SweepResult:
    """Load a model_store model and sweep r on a manifest (no augmentation)."""
    from fastast.model.store import load_model
    from fastast.training.data import AudioDataset, DataError, FeatureSpec, LabelSet, check_examples, read_manifest
    from fastast.device import resolve_device
    from fastast.training.loop import make_loader, normalizer

    model = load_model(model_dir, device=resolve_device(device))
    card = model.card
    if any(r > 0 for r in r_values) and card.arch.get("type", "ast") != "ast":
        raise DataError(f"{model_dir} is a {card.arch.get('type')} model without token merging; use --r 0")
    labels = LabelSet(card.labels)
    examples = read_manifest(manifest)
    check_examples(examples, labels, str(manifest))
    spec = card.input
    dataset = AudioDataset(examples, labels, FeatureSpec(spec.target_length, spec.num_mel_bins, spec.sample_rate))
    loader = make_loader(dataset, batch_size, workers, shuffle=False)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    result = sweep(model, normalizer(spec, model.device), model.scores, loader, list(r_values), card.task, variant, sync)
    if not result.rows:
        raise DataError(f"{manifest}: no file could be decoded")
    return result


def write_r_table(
    model_dir: str | Path, rows: Sequence[RTableRow], variant: str | None, evaluated: str | Path | None = None
) -> ModelCard:
    """Replace the card's rows of this variant and mark each variant's Pareto-optimal r; the weights are untouched.

    Rows measured on other weights (`evaluated`, e.g. the Train+Inf sibling of a shipped model) say which.
    """
    path = Path(model_dir) / "card.json"
    card = ModelCard.load(path)
    if evaluated is not None and Path(evaluated).resolve() != Path(model_dir).resolve():
        source = ModelCard.load(Path(evaluated) / "card.json")
        note = {"model": source.name, "weights_sha256": source.weights_sha256}
        rows = [row.model_copy(update=note) for row in rows]
    kept = [row for row in card.r_table if row.variant != variant]
    card = card.model_copy(update={"r_table": mark_pareto(kept + list(rows))})
    card.save(path)
    return card
