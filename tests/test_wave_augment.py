"""Waveform augmentation (speed, reverb, real background noise, gain) and label-balanced sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone

from fastast.training.augment import AugmentConfig, add_noise, augment_wave, room_impulse
from fastast.training.data import Example, balanced_weights, read_path_list

SR = 16000


def test_noise_lands_at_the_requested_snr():
    rng = np.random.default_rng(0)
    speech = tone(1.0).astype(np.float64)
    noise = rng.standard_normal(SR // 3)  # shorter than the clip: looped
    mixed = add_noise(speech, noise, 10.0, rng)
    snr = 10 * np.log10(np.mean(speech**2) / np.mean((mixed - speech) ** 2))
    assert snr == pytest.approx(10.0, abs=0.01)


def test_room_impulse_is_unit_energy_with_the_direct_path_first():
    rir = room_impulse(np.random.default_rng(1), SR)
    assert np.sum(rir**2) == pytest.approx(1.0) and np.argmax(np.abs(rir)) == 0
    assert 0.1 * SR <= len(rir) <= 0.7 * SR


def test_augment_wave_is_reproducible_bounded_and_changes_speed():
    config = AugmentConfig(speed=0.2, gain_db=20, reverb=1.0, bg_noise=1.0, snr_db=(0.0, 5.0))
    noises = [np.random.default_rng(2).standard_normal(SR).astype(np.float32)]
    first = augment_wave(tone(1.0), SR, config, np.random.default_rng(3), noises)
    again = augment_wave(tone(1.0), SR, config, np.random.default_rng(3), noises)
    assert np.array_equal(first, again) and first.dtype == np.float32
    assert np.abs(first).max() <= 1.0
    lengths = {len(augment_wave(tone(1.0), SR, config, np.random.default_rng(seed), noises)) for seed in range(5)}
    assert len(lengths) > 1 and all(0.8 * SR <= n <= 1.26 * SR for n in lengths)
    assert not AugmentConfig(freqm=4).on_waveform and config.on_waveform


def test_balanced_weights_draw_every_label_and_every_source_within_it_equally():
    examples = [Example(Path(f"{i}.wav"), ("a",)) for i in range(90)] + [Example(Path("b.wav"), ("b",))] * 10
    weights = balanced_weights(examples)
    assert weights[:90].sum().item() == pytest.approx(weights[90:].sum().item())
    drawn = torch.multinomial(weights, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert 0.45 < (drawn >= 90).float().mean().item() < 0.55
    # Within label a, 80 clips from source 0 and 10 from source 1 are drawn equally often.
    weights = balanced_weights(examples, [0] * 80 + [1] * 10 + [0] * 10)
    assert weights[:80].sum().item() == pytest.approx(weights[80:90].sum().item())
    assert weights[:90].sum().item() == pytest.approx(weights[90:].sum().item())


def test_path_lists_resolve_relative_to_their_folder(tmp_path):
    (tmp_path / "noise.txt").write_text("a.flac\n/abs/b.flac\n\n")
    assert read_path_list(tmp_path / "noise.txt") == [tmp_path / "a.flac", Path("/abs/b.flac")]
