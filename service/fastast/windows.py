"""Audio longer than the model's window: where the windows start, how their scores make one answer, the timeline.

numpy only: the service's API workers import it without torch, and `fastast predict` and the serving engine
share it, so a clip gets the same windows, the same clip-level answer and the same timeline on both paths.

A window is the model's input span, `fastast.audio.window_samples(card.input.target_length, sample_rate)`
samples. Audio of at most one window is one window starting at 0: exactly what a model saw before windows
existed. The last window of longer audio may be shorter; the fbank pads it as it pads a short clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fastast.errors import InvalidWindowError

if TYPE_CHECKING:
    from fastast.model.card import Label

# Default hop: half a window. Every instant is then seen by two windows, one of which holds it in its middle
# half, so a word or event shorter than half a window is never only cut in two at a window's edge.
DEFAULT_HOP_FRACTION = 0.5

AGGREGATES = ("mean", "max")
# Multi-label default: "max". AudioSet-style labels say "this happens somewhere in the clip", and most events
# (a bark, a door, a siren's pass) are short: the mean divides a one-window event by the number of windows, so
# a 1 s bark in a minute of street sound would score ~1/60 of its window's score; the max keeps it. "mean" suits
# sounds that last the whole clip (rain, an engine) and is less swayed by one noisy window.
DEFAULT_MULTI_LABEL_AGGREGATE = "max"


def hop_samples(hop_s: float | None, window: int, sample_rate: int) -> int:
    """`--window-hop-s` / `?hop_s=` in samples: None is half a window; it must be above 0 and at most a window."""
    if hop_s is None:
        return max(1, round(window * DEFAULT_HOP_FRACTION))
    hop = round(hop_s * sample_rate) if math.isfinite(hop_s) else 0
    if not 1 <= hop <= window:
        raise InvalidWindowError(
            f"hop must be above 0 s and at most the model's window ({window / sample_rate:g} s), got {hop_s:g} s"
        )
    return hop


def window_starts(n_samples: int, window: int, hop: int) -> list[int]:
    """First sample of each window: 0, hop, 2 hop, ... until a window reaches the end of the audio.

    At most one window of audio -> [0]. No window starts once the previous one already reaches the end, so none
    adds nothing; the last one may be shorter than `window`. ValueError (InvalidWindowError) unless 1 <= hop <= window.
    """
    if window < 1 or not 1 <= hop <= window:
        raise InvalidWindowError(f"hop must be 1..{window} samples for a window of {window}, got {hop}")
    count = 1 + max(0, math.ceil((n_samples - window) / hop))
    return [i * hop for i in range(count)]


def split(pcm: np.ndarray, window: int, hop: int) -> list[np.ndarray]:
    """The windows of `pcm` [samples] as views into it (no copies), in the order of `window_starts`."""
    return [pcm[start : start + window] for start in window_starts(len(pcm), window, hop)]


def resolve_aggregate(task: str, how: str | None) -> str:
    """The aggregation a request gets: None is the task's default; refuses what the task cannot do.

    Single-label models always take the mean of the windows' softmax probabilities (it stays a distribution
    that sums to 1; a per-class max does not), so asking them for "max" is an error, not silently ignored.
    """
    if how is not None and how not in AGGREGATES:
        raise InvalidWindowError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")
    if task == "single-label":
        if how == "max":
            raise InvalidWindowError("aggregate=max applies to multi-label models; single-label models use the mean")
        return "mean"
    return how or DEFAULT_MULTI_LABEL_AGGREGATE


def aggregate(scores: np.ndarray, task: str, how: str | None = None) -> np.ndarray:
    """Per-window scores [windows, classes] -> one clip's scores [classes] (one window: that window's scores).

    `scores` are already scores: sigmoid for multi-label models, softmax for single-label ones (the model's
    `scores(logits)`). Multi-label: the mean or max per class, default DEFAULT_MULTI_LABEL_AGGREGATE;
    single-label: the mean (see resolve_aggregate).
    """
    method = resolve_aggregate(task, how)
    return scores.max(axis=0) if method == "max" else scores.mean(axis=0)


def top_k(scores: np.ndarray, labels: Sequence[Label], k: int) -> list[dict]:
    """The k best classes of one score vector [classes], highest first: {index, mid, label, score} each."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [
        {"index": int(i), "mid": labels[i].mid, "label": labels[i].display_name, "score": float(scores[i])}
        for i in order
    ]


def timeline(
    scores: np.ndarray, n_samples: int, window: int, hop: int, sample_rate: int, labels: Sequence[Label], k: int
) -> list[dict]:
    """One entry per window of a clip of `n_samples`: {start_s, end_s, labels: top_k}, end_s clipped to the audio.

    `scores` [windows, classes] are in the order of `window_starts(n_samples, window, hop)`; times are rounded
    to the millisecond.
    """
    starts = window_starts(n_samples, window, hop)
    if len(starts) != len(scores):
        raise ValueError(f"{len(scores)} rows of scores for {len(starts)} windows")
    return [
        {
            "start_s": round(start / sample_rate, 3),
            "end_s": round(min(start + window, n_samples) / sample_rate, 3),
            "labels": top_k(row, labels, k),
        }
        for start, row in zip(starts, scores)
    ]
