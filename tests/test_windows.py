"""fastast.windows: window starts at the edges, aggregation per task, the timeline; pure numpy, no model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fastast.errors import InvalidWindowError
from fastast.model.card import Label
from fastast.windows import (
    Windowing,
    aggregate,
    hop_samples,
    resolve_aggregate,
    top_k,
    window_count,
    window_starts,
)

LABELS = [Label(index=i, mid=f"/m/{i}", display_name=name) for i, name in enumerate(["a", "b", "c"])]


@pytest.mark.parametrize(
    ("n_samples", "window", "hop", "starts"),
    [
        (0, 10, 5, [0]),
        (7, 10, 5, [0]),  # shorter than a window: one window, as before windows existed
        (10, 10, 5, [0]),  # exactly one window
        (11, 10, 5, [0, 5]),  # one sample more: a second window, not one per sample
        (15, 10, 5, [0, 5]),  # the second window ends exactly at the end
        (16, 10, 5, [0, 5, 10]),
        (30, 10, 10, [0, 10, 20]),  # hop == window: no overlap
        (31, 10, 10, [0, 10, 20, 30]),  # a one-sample last window
        (12, 10, 1, [0, 1, 2]),  # tiny hop: stops once a window reaches the end
    ],
)
def test_window_starts(n_samples, window, hop, starts):
    assert window_starts(n_samples, window, hop) == starts
    assert starts[-1] + window >= n_samples  # the end is covered
    assert len(starts) == 1 or starts[-2] + window < n_samples  # and no window adds nothing


@pytest.mark.parametrize(("window", "hop"), [(10, 0), (10, -1), (10, 11)])
def test_window_starts_refuse_a_bad_hop(window, hop):
    with pytest.raises(ValueError, match="hop must be"):
        window_starts(100, window, hop)


def test_window_starts_drop_a_tail_shorter_than_min_last():
    assert window_starts(23, 10, 10, min_last=4) == [0, 10]  # a 3-sample tail would be all padding
    assert window_starts(24, 10, 10, min_last=4) == [0, 10, 20]
    assert window_starts(3, 10, 10, min_last=4) == [0]  # the first window always stays


def test_window_count_is_the_number_of_starts_without_listing_them():
    for n_samples in (1, 99, 100, 101, 150, 399, 400, 401, 1000, 12345):
        for hop in (1, 7, 50, 99, 100):
            for min_last in (1, 10, 60):
                expected = len(window_starts(n_samples, 100, hop, min_last))
                assert window_count(n_samples, 100, hop, min_last) == expected, (n_samples, hop, min_last)
    # Ten minutes at a one-sample hop: counted at once (a list would hold 9.6 million starts).
    assert window_count(600 * 16000, 20720, 1, 400) == 600 * 16000 - 20720 + 1


def test_windowing_for_the_default_model():
    windowing = Windowing.for_input(target_length=128, sample_rate=16000)
    assert (windowing.window, windowing.hop) == (20720, 10360)  # 1.295 s, half of it
    assert windowing.starts(20720) == [0] and windowing.starts(20721) == [0, 10360]
    no_overlap = Windowing.for_input(128, 16000, hop_s=1.295)
    assert no_overlap.starts(2 * 20720 + 399) == [0, 20720]  # a tail under one 25 ms frame gets no window
    assert no_overlap.starts(2 * 20720 + 400) == [0, 20720, 41440]
    assert Windowing.for_input(128, 16000, hop_s=0.5).hop == 8000
    with pytest.raises(InvalidWindowError):
        Windowing.for_input(128, 16000, hop_s=2.0)


def test_split_gives_views():
    pcm = np.arange(25, dtype=np.float32)
    parts = Windowing(window=10, hop=5, sample_rate=100).split(pcm)  # min_last: one 2-sample frame
    assert [len(part) for part in parts] == [10, 10, 10, 10]
    parts = Windowing(window=10, hop=6, sample_rate=100).split(pcm[:22])
    assert [part[0] for part in parts] == [0, 6, 12] and len(parts[-1]) == 10
    assert all(np.shares_memory(part, pcm) for part in parts)


def test_hop_samples():
    assert hop_samples(None, 20720, 16000) == 10360  # half a window
    assert hop_samples(0.25, 20720, 16000) == 4000
    assert hop_samples(1.295, 20720, 16000) == 20720  # a whole window is allowed
    for bad in (0.0, -1.0, 1.3, float("nan"), float("inf"), 1e-6):
        with pytest.raises(InvalidWindowError, match=r"at most the model's window \(1.295 s\)"):
            hop_samples(bad, 20720, 16000)


def test_aggregate_multi_label():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.3, 0.2]], dtype=np.float32)
    np.testing.assert_allclose(aggregate(scores, "multi-label", "mean"), [0.5, 0.2, 0.2])
    np.testing.assert_array_equal(aggregate(scores, "multi-label", "max"), scores[[0, 1, 0], [0, 1, 2]])
    np.testing.assert_array_equal(aggregate(scores, "multi-label"), scores[[0, 1, 0], [0, 1, 2]])  # default: max
    for how in ("mean", "max", None):
        np.testing.assert_array_equal(aggregate(scores[:1], "multi-label", how), scores[0])  # one window: unchanged


def test_aggregate_single_label_is_the_mean():
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    clip = aggregate(scores, "single-label")
    np.testing.assert_allclose(clip, [0.4, 0.15, 0.45])
    assert clip.sum() == pytest.approx(1.0)  # still a distribution
    np.testing.assert_array_equal(aggregate(scores, "single-label", "mean"), clip)
    with pytest.raises(InvalidWindowError, match="single-label models use the mean"):
        aggregate(scores, "single-label", "max")


def test_resolve_aggregate_refuses_unknown_methods():
    assert resolve_aggregate("multi-label", None) == "max" and resolve_aggregate("single-label", None) == "mean"
    with pytest.raises(InvalidWindowError, match="one of mean, max, got 'median'"):
        resolve_aggregate("multi-label", "median")


def test_top_k():
    assert top_k(np.array([0.2, 0.5, 0.3], dtype=np.float32), LABELS, 2) == [
        {"index": 1, "mid": "/m/1", "label": "b", "score": pytest.approx(0.5)},
        {"index": 2, "mid": "/m/2", "label": "c", "score": pytest.approx(0.3)},
    ]


def test_timeline_clips_the_last_window_to_the_audio():
    scores = np.array([[0.9, 0.0, 0.1], [0.0, 0.8, 0.2], [0.1, 0.1, 0.7]], dtype=np.float32)
    windowing = Windowing(window=16000, hop=8000, sample_rate=16000)
    entries = windowing.timeline(scores, n_samples=30000, labels=LABELS, k=1)
    assert [(e["start_s"], e["end_s"]) for e in entries] == [(0.0, 1.0), (0.5, 1.5), (1.0, 1.875)]
    assert [e["labels"][0]["label"] for e in entries] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 rows of scores for 3 windows"):
        windowing.timeline(scores[:2], 30000, LABELS, 1)


def test_no_torch():
    """API workers import this module without torch."""
    code = "import sys, fastast.windows; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
