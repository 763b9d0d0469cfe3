"""A PNG of the accuracy/speed trade-off: metric and samples/s against r."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastast.model.card import RTableRow


def plot_rows(rows: Sequence[RTableRow], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row.r for row in rows]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(r, [row.value for row in rows], "o-", color="tab:blue")
    left.set_xlabel("r (tokens merged per block)")
    left.set_ylabel(rows[0].metric, color="tab:blue")
    right = left.twinx()
    right.plot(r, [row.samples_per_s or 0 for row in rows], "s--", color="tab:orange")
    right.set_ylabel("samples/s", color="tab:orange")
    left.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
