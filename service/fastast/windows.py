"""Audio longer than the model's window: where the windows start, how their scores make one answer, the timeline.

numpy and fastast.audio only: the service's API workers import it without torch, and `fastast predict` and the
serving engine share it, so a clip gets the same windows, clip-level answer and timeline on both paths.

A window is the model's input span, `fastast.audio.window_samples(card.input.target_length, sample_rate)`
samples. Audio of at most one window is one window starting at 0: exactly what a model saw before windows
existed. The last window of longer audio may be shorter; the fbank pads it as it pads a short clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fastast.audio import frame_length, window_samples
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


def window_count(n_samples: int, window: int, hop: int, min_last: int = 1) -> int:
    """How many windows `window_starts` gives, without listing them (a tiny hop on long audio makes millions,
    and a request must be refused for that without building the list)."""
    if window < 1:
        raise ValueError(f"a window must hold at least one sample, got {window}")
    if not 1 <= hop <= window:
        raise InvalidWindowError(f"hop must be 1..{window} samples for a window of {window}, got {hop}")
    count = 1 + max(0, -(-(n_samples - window) // hop))
    if count > 1 and n_samples - (count - 1) * hop < min_last:
        count -= 1
    return count


def window_starts(n_samples: int, window: int, hop: int, min_last: int = 1) -> list[int]:
    """First sample of each window: 0, hop, 2 hop, ... until a window reaches the end of the audio.

    At most one window of audio -> [0]. No window starts once the previous one already reaches the end, so none
    adds nothing; the last one may be shorter than `window`, but not than `min_last` samples (a tail that short
    is dropped: Windowing passes one analysis frame, less gives the fbank no frame and the model only padding).
    ValueError (InvalidWindowError) unless 1 <= hop <= window.
    """
    return [i * hop for i in range(window_count(n_samples, window, hop, min_last))]


@dataclass(frozen=True)
class Windowing:
    """How audio at a model's sample rate is cut into that model's windows; build it with `for_input`."""

    window: int  # samples: the model's input span
    hop: int  # samples between window starts, 1..window
    sample_rate: int

    @classmethod
    def for_input(cls, target_length: int, sample_rate: int, hop_s: float | None = None) -> Windowing:
        """The windows of a model card's input (`card.input.target_length`, `.sample_rate`) at a hop in seconds."""
        window = window_samples(target_length, sample_rate)
        return cls(window, hop_samples(hop_s, window, sample_rate), sample_rate)

    def starts(self, n_samples: int) -> list[int]:
        return window_starts(n_samples, self.window, self.hop, min_last=frame_length(self.sample_rate))

    def count(self, n_samples: int) -> int:
        return window_count(n_samples, self.window, self.hop, min_last=frame_length(self.sample_rate))

    def split(self, pcm: np.ndarray) -> list[np.ndarray]:
        """The windows of `pcm` [samples] as views into it (no copies), in the order of `starts`."""
        return [pcm[start : start + self.window] for start in self.starts(len(pcm))]

    def timeline(self, scores: np.ndarray, n_samples: int, labels: Sequence[Label], k: int) -> list[dict]:
        """One entry per window: {start_s, end_s, labels: top_k}, end_s clipped to the audio, times in ms steps.

        `scores` [windows, classes] are in the order of `starts(n_samples)`.
        """
        starts = self.starts(n_samples)
        if len(starts) != len(scores):
            raise ValueError(f"{len(scores)} rows of scores for {len(starts)} windows")
        return [
            {
                "start_s": round(start / self.sample_rate, 3),
                "end_s": round(min(start + self.window, n_samples) / self.sample_rate, 3),
                "labels": top_k(row, labels, k),
            }
            for start, row in zip(starts, scores)
        ]


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
