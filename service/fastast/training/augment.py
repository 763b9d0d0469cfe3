"""AST's training augmentation (reference sections 1.5-1.7), applied per sample in the data workers.

Everything here works on the *un-normalised* log-mel fbank, so that models with different
normalisation statistics can share one augmented tensor. AST adds its noise after normalisation;
`noise_scale` (= 2 * std of the student's InputSpec) converts that noise to the raw domain, which gives
the student exactly AST's recipe: normalize(x + n * 2 std) = normalize(x) + n.
"""

from __future__ import annotations

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

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls()

    def to_dict(self) -> dict:
        return asdict(self)


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
