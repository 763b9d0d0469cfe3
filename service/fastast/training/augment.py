"""Training augmentation, applied per sample in the data workers: AST's (reference sections 1.5-1.7) on the
fbank, and waveform augmentation that makes clean or synthetic speech sound recorded (speed, gain, room reverb,
real background noise at a random SNR).

The fbank augmentation works on the *un-normalised* log-mel fbank, so that models with different
normalisation statistics can share one augmented tensor. AST adds its noise after normalisation;
`noise_scale` (= 2 * std of the student's InputSpec) converts that noise to the raw domain, which gives
the student exactly AST's recipe: normalize(x + n * 2 std) = normalize(x) + n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    freqm: int = 0  # SpecAugment: max frequency-mask width (torchaudio semantics: width in [0, freqm-1])
    timem: int = 0  # SpecAugment: max time-mask width
    mixup: float = 0.0  # probability of waveform mixup with a random partner, lambda ~ Beta(10, 10)
    noise: bool = False  # AST's Speech Commands noise: U[0,1) * u / 10 (normalised units), u ~ U[0,1)
    noise_scale: float = 1.0  # raw log-mel units per normalised unit (2 * std)
    shift: int = 0  # circular time shift by an integer in [-shift, shift - 1] frames
    speed: float = 0.0  # resample by a factor in [1 - speed, 1 + speed]: tempo and pitch change together (Kaldi)
    gain_db: float = 0.0  # gain drawn from [-gain_db, gain_db] dB
    reverb: float = 0.0  # probability of a synthetic room (exponentially decaying noise, RT60 0.1-0.7 s)
    bg_noise: float = 0.0  # probability of adding a real background-noise clip (the dataset's `noises`)
    snr_db: tuple[float, float] = (0.0, 20.0)  # SNR range of that noise

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls()

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def on_waveform(self) -> bool:
        return bool(self.speed or self.gain_db or self.reverb or self.bg_noise)


def mask_axis(fbank: Tensor, axis: int, param: int, rng: np.random.Generator) -> Tensor:
    """One mask along `axis` ([time, mel]: 0 = time, 1 = mel): width floor(U*param), start floor(U*(size-width)), value 0."""
    if param <= 0:
        return fbank
    size = fbank.shape[axis]
    width = int(rng.random() * param)
    start = int(rng.random() * (size - width))
    if width == 0:
        return fbank
    fbank = fbank.clone()
    fbank.narrow(axis, start, width).zero_()
    return fbank


def mix_waveforms(first: np.ndarray, second: np.ndarray, lam: float) -> np.ndarray:
    """lam * first + (1 - lam) * second, the partner zero-padded or cut to the first's length, means removed (AST)."""
    second = second[: len(first)]
    if len(second) < len(first):
        second = np.pad(second, (0, len(first) - len(second)))
    first = first - first.mean()
    second = second - second.mean()
    mixed = lam * first + (1 - lam) * second
    return (mixed - mixed.mean()).astype(np.float32)


def augment_fbank(fbank: Tensor, config: AugmentConfig, rng: np.random.Generator) -> Tensor:
    """SpecAugment (frequency then time mask), then noise, then time shift, in AST's order."""
    fbank = mask_axis(fbank, 1, config.freqm, rng)
    fbank = mask_axis(fbank, 0, config.timem, rng)
    if config.noise:
        noise = torch.from_numpy(rng.random(fbank.shape, dtype=np.float32))
        fbank = fbank + noise * (float(rng.random()) / 10 * config.noise_scale)
    if config.shift > 0:
        fbank = torch.roll(fbank, int(rng.integers(-config.shift, config.shift)), dims=0)
    return fbank


RT60_S = (0.1, 0.7)


def room_impulse(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A direct path plus a tail of exponentially decaying noise that falls 60 dB in RT60 seconds."""
    rt60 = rng.uniform(*RT60_S)
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * rng.uniform(0.1, 0.5)
    tail[0] = 1.0
    return tail / np.sqrt(np.sum(tail**2))


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """wave + a random excerpt of noise (looped if short), scaled to snr_db below the wave's power."""
    if len(noise) < len(wave):
        noise = np.tile(noise, -(-len(wave) // len(noise)))
    start = int(rng.integers(len(noise) - len(wave) + 1))
    excerpt = noise[start : start + len(wave)].astype(np.float64)
    power = np.mean(excerpt**2)
    if power <= 0:
        return wave
    scale = np.sqrt(np.mean(wave.astype(np.float64) ** 2) / (power * 10 ** (snr_db / 10)))
    return wave + excerpt * scale


def augment_wave(wave: np.ndarray, sample_rate: int, config: AugmentConfig, rng: np.random.Generator,
                 noises: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Speed, then room reverb, then background noise, then gain; float32, peak limited to 1."""
    import soxr

    wave = wave.astype(np.float64)
    if config.speed > 0:
        factor = rng.uniform(1 - config.speed, 1 + config.speed)
        wave = soxr.resample(wave, sample_rate * factor, sample_rate)
    if config.reverb > 0 and rng.random() < config.reverb:
        rir = room_impulse(rng, sample_rate)
        n = len(wave) + len(rir) - 1
        wave = np.fft.irfft(np.fft.rfft(wave, n) * np.fft.rfft(rir, n), n)[: len(wave)]
    if config.bg_noise > 0 and noises and rng.random() < config.bg_noise:
        wave = add_noise(wave, noises[int(rng.integers(len(noises)))], rng.uniform(*config.snr_db), rng)
    if config.gain_db > 0:
        wave = wave * 10 ** (rng.uniform(-config.gain_db, config.gain_db) / 20)
    peak = np.abs(wave).max(initial=0.0)
    return (wave / peak if peak > 1 else wave).astype(np.float32)
