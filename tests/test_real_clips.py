"""The shipped default model on real voices: 20 clips from Speech Commands speakers it never trained on.

The card's "Inf" table is measured on the real test split; these clips come from that split's speakers, so the
number of clips the model gets right must be plausible for a Binomial(20, claimed accuracy). The one-sided bound
(p < 0.001) fails a model whose real accuracy is far below its card, e.g. one trained only on synthetic speech.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastast import load_model
from fastast.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]
CLIPS = sorted((ROOT / "tests" / "data" / "real").glob("*.flac"))
ALPHA = 0.001


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.fixture(scope="module")
def model():
    return load_model(ROOT / "model_store" / "default")


@pytest.mark.parametrize("r", [0, 8])
def test_default_model_gets_real_test_speakers_right_at_the_rate_its_card_claims(model, r):
    claimed = {row.r: row.value for row in model.card.r_table if row.variant == "Inf"}[r]
    words = [clip.name.split("_")[0] for clip in CLIPS]
    waves = np.stack([load_audio(clip, 16000)[:16000] for clip in CLIPS])
    with torch.no_grad():
        predicted = model(model.featurize(waves, 16000), r=r).argmax(dim=-1).tolist()
    names = [model.card.labels[i].display_name for i in predicted]
    correct = sum(p == w for p, w in zip(names, words))
    assert len(CLIPS) == 20
    assert binomial_cdf(correct, len(CLIPS), claimed) >= ALPHA, (
        f"{correct}/{len(CLIPS)} right at r={r}, the card claims {claimed:.3f}: "
        f"{[(w, p) for w, p in zip(words, names) if w != p]}"
    )
