"""The shipped model_store/default keeps the issue's contract and still recognises spoken keywords.

Keywords are spoken by espeak-ng the way `fastast synth-commands` builds its clips (centred in one second,
with background noise), so a broken normalisation, label order or weight file fails here.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import espeak

from fastast import load_model
from fastast.audio import load_audio
from fastast.model.card import bundled_labels

DEFAULT = Path(__file__).resolve().parents[1] / "model_store" / "default"


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT)  # checks the weights' sha256 against the card


def keyword_clips(words: list[str], voice: str, directory: Path) -> np.ndarray:
    """One second per word: speech centred, white noise 20 dB below it (fixed seed)."""
    rng = np.random.default_rng(0)
    clips = np.zeros((len(words), 16000), dtype=np.float32)
    for clip, word in zip(clips, words):
        speech = load_audio(espeak(word, directory / f"{voice}-{word}.wav", voice=voice))[:16000]
        start = (16000 - len(speech)) // 2
        clip[start : start + len(speech)] = speech
        clip += rng.standard_normal(16000).astype(np.float32) * np.sqrt(np.mean(speech**2) / 100)
    return clips


def top1_accuracy(model, clips: np.ndarray, r: int) -> float:
    with torch.no_grad():
        predicted = model(model.featurize(clips, 16000), r=r).argmax(dim=-1)
    return (predicted == torch.arange(len(clips))).float().mean().item()


def test_default_model_meets_the_issue_contract(model):
    arch, spec = model.card.arch, model.card.input
    assert arch["type"] == "ast" and arch["dim"] <= 192  # AST-tiny width or smaller
    assert spec.target_length == 128 and spec.sample_rate == 16000
    assert (DEFAULT / "model.safetensors").stat().st_size <= 25 * 2**20
    assert [label.mid for label in model.card.labels] == [
        label.mid for label in bundled_labels("speechcommands")
    ]
    assert model.max_r > 0  # ToMe-ready: r merges tokens


def test_default_model_card_holds_both_r_tables(model):
    rows = model.card.r_table
    for variant in ("Inf", "Train+Inf"):
        table = {row.r: row for row in rows if row.variant == variant}
        assert 0 in table and len(table) >= 4, variant
        for row in table.values():
            assert row.metric == "accuracy" and 0.0 <= row.value <= 1.0
            assert row.drop == pytest.approx(table[0].value - row.value, abs=1e-5)
            assert row.samples_per_s > 0


@pytest.mark.parametrize("r", [0, 6])
def test_default_model_recognises_keywords_from_a_training_voice(model, tmp_path, r):
    words = [label.display_name for label in model.card.labels]
    clips = keyword_clips(words, "en-us", tmp_path)
    assert top1_accuracy(model, clips, r) >= 0.9  # chance: 1/35


def test_default_model_generalises_to_an_unseen_voice(model, tmp_path):
    """`nl` is one of the test split's voices: never heard in training."""
    words = [label.display_name for label in model.card.labels]
    clips = keyword_clips(words, "nl", tmp_path)
    assert top1_accuracy(model, clips, 0) >= 0.5
