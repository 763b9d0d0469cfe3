"""A PNG of the accuracy/speed trade-off: metric and samples/s against r, one pair of lines per variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastast.model.card import RTableRow

MIN_METRIC_SPAN = 0.1  # the metric axis spans at least this much, so a half-point wobble does not look like a cliff


def by_variant(rows: Sequence[RTableRow]) -> dict[str | None, list[RTableRow]]:
    """Rows grouped by variant in first-seen order, so Inf and Train+Inf (or several models) share one plot."""
    groups: dict[str | None, list[RTableRow]] = {}
    for row in rows:
        groups.setdefault(row.variant, []).append(row)
    return groups


def metric_limits(values: Sequence[float]) -> tuple[float, float]:
    """The metric axis: every value with a little room, and at least MIN_METRIC_SPAN wide around them."""
    margin = max(MIN_METRIC_SPAN - (max(values) - min(values)), 0.0) / 2 + 0.01
    return min(values) - margin, max(values) + margin


def plot_rows(rows: Sequence[RTableRow], path: str | Path, title: str = "") -> Path:
    """Metric (solid, left axis) and samples/s (dashed, right axis) against r; a variant keeps its colour on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6.5, 4.6), layout="constrained")
    right = left.twinx()
    groups = by_variant(rows)
    for k, (variant, group) in enumerate(groups.items()):
        colour = f"C{k}"
        r = [row.r for row in group]
        left.plot(r, [row.value for row in group], "o-", color=colour, label=variant or rows[0].metric)
        right.plot(r, [row.samples_per_s or 0 for row in group], "s--", color=colour, alpha=0.6)
    left.set_ylim(*metric_limits([row.value for row in rows]))
    left.set_xlabel("r (tokens merged per block)")
    left.set_ylabel(f"{rows[0].metric} (solid)")
    right.set_ylabel("samples/s (dashed)")
    if len(groups) > 1:  # below the axes: inside, it would hide the lines it names
        fig.legend(loc="outside lower center", ncol=min(len(groups), 3), fontsize="small")
    left.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
