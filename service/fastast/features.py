"""Model input from decoded audio: Kaldi log-mel fbank -> pad/trim -> AST normalisation, batched, on any device.

The fbank is batched torch (one unfold, then one rfft and one mel projection per block of frames) held to numerical
parity with `torchaudio.compliance.kaldi.fbank` as AST calls it (hanning window, no dither, no energy), so it runs
on any device without torchaudio, whose feature code is no longer maintained. Clips of different lengths share
one batch through `lengths`: every clip's features equal the ones it gets alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastast.audio import FRAME_MS, frame_length, frame_shift, resample, window_samples
from fastast.errors import InvalidAudioError

if TYPE_CHECKING:
    from fastast.model.card import InputSpec

PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
LOG_FLOOR = float(torch.finfo(torch.float32).eps)  # Kaldi floors energies at float epsilon before the log
# On the CPU a batch goes through in blocks of about this many frames: a few MB per intermediate stays in cache,
# where one pass over a whole batch of long clips spends most of its time faulting in fresh pages.
CPU_BLOCK_FRAMES = 512
# Each FFT bin feeds at most two adjacent mel filters, so the [bins, mel] matrix is about 98 % zeros. On the CPU the
# projection multiplies each group of this many filters by only the bins they cover: ~8x fewer multiplications for
# 128 filters, where the dense product took about a third of the fbank's CPU time. A GPU keeps the one dense matmul.
MEL_BAND_FILTERS = 16


def kaldi_mel_matrix(sample_rate: int, n_fft: int, num_mel_bins: int) -> Tensor:
    """Kaldi's triangular mel filters [n_fft // 2 + 1, num_mel_bins]: 20 Hz to Nyquist, triangles in mel space.

    At 16 kHz with 128 bins, filter 3 falls between two FFT bins and stays empty (a constant log-floor column);
    torchaudio, and so every AST checkpoint, has it too, while Kaldi itself refuses such settings.
    """

    def mel(hz: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)

    low, high = mel(LOW_FREQ_HZ), mel(sample_rate / 2)
    edges = low + (high - low) / (num_mel_bins + 1) * np.arange(num_mel_bins + 2)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    bin_mel = mel(np.arange(n_fft // 2) * sample_rate / n_fft)[:, None]
    weights = np.maximum(0.0, np.minimum((bin_mel - left) / (centre - left), (right - bin_mel) / (right - centre)))
    nyquist_row = np.zeros((1, num_mel_bins))  # Kaldi gives the Nyquist bin no weight
    return torch.from_numpy(np.vstack([weights, nyquist_row]).astype(np.float32))


@dataclass(frozen=True)
class MelProjection:
    """Power spectrum [..., bins] -> mel energies [..., mel]: a dense matmul, or on the CPU one small matmul per
    band of filters over just the bins that band covers (the same products; only the zeros are skipped)."""

    matrix: Tensor  # [bins, mel]
    bands: tuple[tuple[int, int, Tensor], ...]  # (first bin, end bin, matrix[first:end, band's filters]); () = dense

    @classmethod
    def build(cls, matrix: Tensor, banded: bool) -> MelProjection:
        if not banded:
            return cls(matrix, ())
        bands = []
        for filters in torch.arange(matrix.shape[1]).split(MEL_BAND_FILTERS):
            bins = matrix[:, filters].any(dim=1).nonzero().flatten().tolist() or [0]  # an empty band: a zero row
            first, end = bins[0], bins[-1] + 1
            bands.append((first, end, matrix[first:end, filters].contiguous()))
        return cls(matrix, tuple(bands))

    def __call__(self, power: Tensor) -> Tensor:
        if not self.bands:
            return torch.matmul(power, self.matrix)
        rows = power.reshape(-1, power.shape[-1])
        mel = torch.cat([rows[:, first:end] @ weights for first, end, weights in self.bands], dim=1)
        return mel.view(*power.shape[:-1], mel.shape[-1])


@lru_cache(maxsize=32)
def _analysis_tensors(sample_rate: int, num_mel_bins: int, device: torch.device) -> tuple[Tensor, MelProjection]:
    """(symmetric Hann window, mel projection) for one configuration, built once per device."""
    length = frame_length(sample_rate)
    n_fft = 1 << (length - 1).bit_length()
    # Built on the CPU in float32 like torchaudio's, so every device sees the same window to the last bit.
    window = torch.hann_window(length, periodic=False, dtype=torch.float32).to(device)
    matrix = kaldi_mel_matrix(sample_rate, n_fft, num_mel_bins).to(device)
    return window, MelProjection.build(matrix, banded=device.type == "cpu")


def _as_batch(waveforms: Tensor | np.ndarray) -> tuple[Tensor, bool]:
    """float32 [B, N] on the input's device, and whether the input was a single [N] waveform."""
    batch = torch.from_numpy(np.ascontiguousarray(waveforms)) if isinstance(waveforms, np.ndarray) else waveforms
    if not (batch.is_floating_point() and batch.dim() in (1, 2)):
        raise InvalidAudioError(
            f"waveforms must be float [samples] or [batch, samples] in [-1, 1], got {batch.dtype} {tuple(batch.shape)}"
        )
    single = batch.dim() == 1
    return (batch.unsqueeze(0) if single else batch).to(torch.float32), single


def kaldi_fbank(waveforms: Tensor | np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128) -> Tensor:
    """Log-mel fbank [B, frames, mel] (or [frames, mel] for one [N] waveform), computed in float32.

    Matches `torchaudio.compliance.kaldi.fbank(w, htk_compat=True, use_energy=False, window_type='hanning',
    dither=0.0, frame_shift=10)`: snip_edges framing, per-frame DC removal, pre-emphasis 0.97, FFT rounded
    up to a power of two, power spectrum, Kaldi mel filters, natural log floored at float32 epsilon.
    """
    batch, single = _as_batch(waveforms)
    length, shift = frame_length(sample_rate), frame_shift(sample_rate)
    if batch.shape[-1] < length:
        raise InvalidAudioError(
            f"audio has {batch.shape[-1]} samples, fewer than one {FRAME_MS:g} ms frame ({length} at {sample_rate} Hz)"
        )
    window, mel = _analysis_tensors(sample_rate, num_mel_bins, batch.device)
    frames = batch.unfold(-1, length, shift)  # [B, T, length] view, T = 1 + (N - length) // shift
    block = max(1, CPU_BLOCK_FRAMES // max(1, len(batch))) if batch.device.type == "cpu" else frames.shape[1]
    blocks = [_log_mel(part, window, mel) for part in frames.split(block, dim=1)]
    fbank = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    return fbank[0] if single else fbank


def _log_mel(frames: Tensor, window: Tensor, mel: MelProjection) -> Tensor:
    """Frames [B, T, length] -> log-mel [B, T, mel]: one rfft and one mel projection for the whole block."""
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi: the first sample is its own predecessor
    frames = (frames - PREEMPHASIS * previous) * window
    # Zero-padded here rather than by rfft's n=: the transform of contiguous power-of-two rows runs ~3x faster.
    frames = F.pad(frames, (0, 2 * (mel.matrix.shape[0] - 1) - frames.shape[-1]))
    spectrum = torch.fft.rfft(frames)
    power = spectrum.real.square() + spectrum.imag.square()
    return mel(power).clamp_min_(LOG_FLOOR).log_()


def pad_or_trim(fbank: Tensor, target_length: int) -> Tensor:
    """[..., T, F] -> [..., target_length, F]: zeros appended at the end (log-mel domain) or the first frames kept."""
    frames = fbank.shape[-2]
    if frames >= target_length:
        return fbank[..., :target_length, :]
    return F.pad(fbank, (0, 0, 0, target_length - frames))


def normalize(fbank: Tensor, mean: float, std: float) -> Tensor:
    """AST's normalisation (x - mean) / (2 std): inputs end up near zero mean and 0.5 std."""
    return (fbank - mean) / (2 * std)


def featurize(
    waveforms: Tensor | np.ndarray,
    sample_rate: int,
    *,
    target_length: int,
    mean: float,
    std: float,
    num_mel_bins: int = 128,
    model_sample_rate: int = 16000,
    lengths: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Waveforms [B, N] or [N] -> the model's input [B, target_length, mel] float32, on the waveforms' device.

    Resamples to the model's rate when needed, then fbank, pad/trim (before normalising, as AST does), normalize.
    `lengths` gives the valid samples of each row of a zero-padded batch already at the model's rate: a row then
    gets exactly the features it would get alone.
    """
    batch, _ = _as_batch(waveforms)
    if not _all_finite(batch):
        raise InvalidAudioError("audio contains NaN or infinite samples")
    if sample_rate != model_sample_rate:
        if lengths is not None:
            raise ValueError("lengths apply to waveforms already at the model's sample rate")
        resampled = resample(batch.cpu().numpy().T, sample_rate, model_sample_rate).T  # soxr: channels are columns
        batch = torch.from_numpy(np.ascontiguousarray(resampled)).to(batch.device)
    # Samples past the last kept frame cannot change the output: skip their fbank.
    fbank = kaldi_fbank(batch[:, : window_samples(target_length, model_sample_rate)], model_sample_rate, num_mel_bins)
    if lengths is not None and not _all_full(lengths, batch.shape[-1]):
        fbank = _zero_padding_frames(fbank, lengths, model_sample_rate)
    return normalize(pad_or_trim(fbank, target_length), mean, std)


def _all_finite(batch: Tensor) -> bool:
    """Whether no sample is NaN or infinite: one sum (NaN and infinity propagate through it) instead of four passes;
    only a sum that overflowed on finite samples takes the exact check."""
    return bool(torch.isfinite(batch.sum())) or bool(torch.isfinite(batch).all())


def _all_full(lengths: Sequence[int] | Tensor, width: int) -> bool:
    """Whether every row of a padded batch is a whole clip (as a batch of same-length clips is): no frame to mask."""
    return not isinstance(lengths, Tensor) and all(length >= width for length in lengths)


def _zero_padding_frames(fbank: Tensor, lengths: Sequence[int] | Tensor, sample_rate: int) -> Tensor:
    """Frames that reach into a row's padding become zeros, the value pad_or_trim appends: a clip alone has none."""
    lengths = torch.as_tensor(lengths, device=fbank.device)
    frames = 1 + (lengths - frame_length(sample_rate)).div(frame_shift(sample_rate), rounding_mode="floor")
    padding = torch.arange(fbank.shape[-2], device=fbank.device)[None, :] >= frames[:, None]
    return fbank.masked_fill(padding[..., None], 0.0)


def pad_rows(waves: Sequence[np.ndarray], out: np.ndarray) -> list[int]:
    """Clips of different lengths into the rows of `out` [len(waves), >= the longest], zero-padded, and their
    lengths for featurize(..., lengths=). Every row is written whole, so `out` may be a reused (pinned) buffer."""
    for row, wave in zip(out, waves):
        row[: len(wave)] = wave
        row[len(wave) :] = 0.0
    return [len(wave) for wave in waves]


def model_input(
    waveforms: Tensor | np.ndarray, sample_rate: int, spec: InputSpec, lengths: Sequence[int] | Tensor | None = None
) -> Tensor:
    """featurize() with a model card's input spec: what every consumer of a servable model calls."""
    return featurize(
        waveforms,
        sample_rate,
        target_length=spec.target_length,
        mean=spec.mean,
        std=spec.std,
        num_mel_bins=spec.num_mel_bins,
        model_sample_rate=spec.sample_rate,
        lengths=lengths,
    )
