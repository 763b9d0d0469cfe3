"""The audio front end: bytes or a file -> mono float32 at the model's rate -> Kaldi log-mel fbank -> model input.

The fbank is batched torch (one unfold, then one rfft and one matmul per block of frames) held to numerical
parity with `torchaudio.compliance.kaldi.fbank` as AST calls it (hanning window, no dither, no energy), so it runs
on any device without torchaudio, whose feature code is no longer maintained.
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor

from fastast.errors import AudioLimitError, AudioTooLongError, InvalidAudioError

FRAME_MS = 25.0
SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
LOG_FLOOR = float(torch.finfo(torch.float32).eps)  # Kaldi floors energies at float epsilon before the log
# On the CPU a batch goes through in blocks of about this many frames: a few MB per intermediate stays in cache,
# where one pass over a whole batch of long clips spends most of its time faulting in fresh pages.
CPU_BLOCK_FRAMES = 512

# libsndfile's header log for a WAV whose data chunk promises more bytes than the file holds.
_WAV_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZE = 0x7FFF0000  # writers that cannot seek (pipes) leave a placeholder this large or larger
_UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count when the header gives none (e.g. a FLAC written to a pipe)
# Audio is decoded this many samples (all channels together) at a time: 4 MB of float32, whatever the channels.
BLOCK_SAMPLES = 1 << 20

AudioSource = bytes | bytearray | memoryview | str | os.PathLike


def load_audio(
    source: AudioSource,
    sample_rate: int = 16000,
    max_seconds: float | None = None,
    *,
    max_channels: int | None = None,
    max_sample_rate: int | None = None,
) -> np.ndarray:
    """Decode any soundfile format, mix to mono and resample: the one way audio enters the service.

    Returns float32 samples in [-1, 1] at `sample_rate`; every problem with the input is an InvalidAudioError,
    and audio past a limit an AudioLimitError, raised from the header before anything is decoded where it can be.
    """
    wave, rate = decode(source, max_seconds, max_channels=max_channels, max_sample_rate=max_sample_rate)
    wave = resample(wave, rate, sample_rate)
    if len(wave) < frame_length(sample_rate):
        raise InvalidAudioError(
            f"audio is {1000 * len(wave) / sample_rate:.1f} ms long, shorter than one {FRAME_MS:g} ms analysis frame"
        )
    return wave


def decode(
    source: AudioSource,
    max_seconds: float | None = None,
    *,
    max_channels: int | None = None,
    max_sample_rate: int | None = None,
) -> tuple[np.ndarray, int]:
    """Mono float32 samples [frames] and their native sample rate.

    A few KB of compressed audio can declare hundreds of channels at a high rate: the header is checked against
    the limits first, then the audio is decoded in blocks and each block mixed to mono at once, so memory stays
    near the mono signal, never channels x rate x seconds of float32.
    """
    handle = _open_source(source)
    try:
        with sf.SoundFile(handle) as f:
            rate, declared = f.samplerate, (f.frames if f.frames < _UNKNOWN_FRAMES else None)
            if declared is None:
                _read_as_stream(f)
            limit = _check_header(f, declared, max_seconds, max_channels, max_sample_rate)
            _check_wav_complete(f)
            # Read at most one frame past the limit, so a header that understates the length costs no memory.
            wave = _read_mono(f, None if limit is None else limit + 1)
    except InvalidAudioError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)
        raise InvalidAudioError(f"cannot decode audio (not an audio format, corrupt or truncated): {reason}") from None
    if limit is not None and len(wave) > limit:
        claim = "its header gives no length" if declared is None else f"its header says {declared / rate:.1f} s"
        raise AudioTooLongError(f"audio runs past the limit of {max_seconds:g} s ({claim})")
    if wave.size == 0:
        raise InvalidAudioError("audio contains no samples")
    return wave, rate


def _read_as_stream(f: sf.SoundFile) -> None:
    """Read a file whose header gives no length as a stream, without seeking.

    soundfile tracks its position by seeking after every read, and libsndfile cannot seek to the end of a FLAC of
    unknown length, so the last read would fail (libsndfile issues 806 and 835).
    """
    f._info.seekable = False  # soundfile's own flag, which has no public setter


def _check_header(
    f: sf.SoundFile,
    declared: int | None,
    max_seconds: float | None,
    max_channels: int | None,
    max_sample_rate: int | None,
) -> int | None:
    """Refuse what the header alone shows to be over a limit; the most frames that may then be decoded."""
    if max_channels is not None and f.channels > max_channels:
        raise AudioLimitError(f"audio has {f.channels} channels; the limit is {max_channels}")
    if max_sample_rate is not None and f.samplerate > max_sample_rate:
        raise AudioLimitError(f"audio is sampled at {f.samplerate} Hz; the limit is {max_sample_rate} Hz")
    if max_seconds is None:
        return None
    limit = int(max_seconds * f.samplerate)
    if declared is not None and declared > limit:
        raise AudioTooLongError(f"audio is {declared / f.samplerate:.1f} s long; the limit is {max_seconds:g} s")
    return limit


def _read_mono(f: sf.SoundFile, max_frames: int | None) -> np.ndarray:
    """Up to max_frames frames (all when None), decoded block by block and mixed to mono as they come."""
    block = max(1, BLOCK_SAMPLES // f.channels)
    parts, total = [], 0
    while max_frames is None or total < max_frames:
        frames = block if max_frames is None else min(block, max_frames - total)
        samples = f.read(frames, dtype="float32", always_2d=True)
        if len(samples) == 0:
            break
        if not np.isfinite(samples).all():
            raise InvalidAudioError("audio contains NaN or infinite samples")
        parts.append(to_mono(samples))
        total += len(samples)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _open_source(source: AudioSource) -> io.BytesIO | str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidAudioError("audio input is empty (0 bytes)")
        return io.BytesIO(source)
    path = Path(source)
    if not path.is_file():
        raise InvalidAudioError(f"no audio file at {path}")
    if path.stat().st_size == 0:
        raise InvalidAudioError(f"audio file {path} is empty (0 bytes)")
    return str(path)


def _check_wav_complete(f: sf.SoundFile) -> None:
    """libsndfile silently shortens a WAV cut off mid-upload; its header log still tells, so refuse it."""
    if f.format not in ("WAV", "WAVEX"):
        return
    match = _WAV_DATA_SIZE.search(f.extra_info)
    if match:
        declared, present = int(match[1]), int(match[2])
        if present < declared < _STREAMING_SIZE:
            raise InvalidAudioError(
                f"audio file is truncated: its header declares {declared} bytes of samples, only {present} are present"
            )


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames]: the mean of the channels (AST models are trained on mono)."""
    return samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """soxr at its high-quality default; [frames] or [frames, channels] float32."""
    if from_rate == to_rate:
        return np.ascontiguousarray(wave, dtype=np.float32)
    try:
        out = soxr.resample(np.ascontiguousarray(wave, dtype=np.float32), from_rate, to_rate)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise InvalidAudioError(f"cannot resample audio from {from_rate} Hz to {to_rate} Hz: {exc}") from None
    return np.ascontiguousarray(out, dtype=np.float32)


def frame_length(sample_rate: int) -> int:
    """Samples per 25 ms frame (Kaldi truncates, as torchaudio does)."""
    return int(sample_rate * FRAME_MS * 0.001)


def frame_shift(sample_rate: int) -> int:
    return int(sample_rate * SHIFT_MS * 0.001)


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


@lru_cache(maxsize=32)
def _analysis_tensors(sample_rate: int, num_mel_bins: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(symmetric Hann window, mel matrix) for one configuration, built once per device."""
    length = frame_length(sample_rate)
    n_fft = 1 << (length - 1).bit_length()
    # Built on the CPU in float32 like torchaudio's, so every device sees the same window to the last bit.
    window = torch.hann_window(length, periodic=False, dtype=torch.float32).to(device)
    return window, kaldi_mel_matrix(sample_rate, n_fft, num_mel_bins).to(device)


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
    window, mel_matrix = _analysis_tensors(sample_rate, num_mel_bins, batch.device)
    frames = batch.unfold(-1, length, shift)  # [B, T, length] view, T = 1 + (N - length) // shift
    block = max(1, CPU_BLOCK_FRAMES // max(1, len(batch))) if batch.device.type == "cpu" else frames.shape[1]
    blocks = [_log_mel(part, window, mel_matrix) for part in frames.split(block, dim=1)]
    fbank = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    return fbank[0] if single else fbank


def _log_mel(frames: Tensor, window: Tensor, mel_matrix: Tensor) -> Tensor:
    """Frames [B, T, length] -> log-mel [B, T, mel]: one rfft and one matmul for the whole block."""
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi: the first sample is its own predecessor
    frames = (frames - PREEMPHASIS * previous) * window
    spectrum = torch.fft.rfft(frames, n=2 * (mel_matrix.shape[0] - 1))
    power = spectrum.real.square() + spectrum.imag.square()
    return torch.matmul(power, mel_matrix).clamp_min(LOG_FLOOR).log()


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
) -> Tensor:
    """Waveforms [B, N] or [N] -> the model's input [B, target_length, mel] float32, on the waveforms' device.

    Resamples to the model's rate when needed, then fbank, pad/trim (before normalising, as AST does), normalize.
    """
    batch, _ = _as_batch(waveforms)
    if not bool(torch.isfinite(batch).all()):
        raise InvalidAudioError("audio contains NaN or infinite samples")
    if sample_rate != model_sample_rate:
        resampled = resample(batch.cpu().numpy().T, sample_rate, model_sample_rate).T  # soxr: channels are columns
        batch = torch.from_numpy(np.ascontiguousarray(resampled)).to(batch.device)
    # Samples past the last kept frame cannot change the output: skip their fbank.
    needed = (target_length - 1) * frame_shift(model_sample_rate) + frame_length(model_sample_rate)
    fbank = kaldi_fbank(batch[:, :needed], model_sample_rate, num_mel_bins)
    return normalize(pad_or_trim(fbank, target_length), mean, std)
