"""Audio decoding: bytes or a file -> mono float32 at the model's rate; the one way audio enters the product.

Only numpy, soundfile and soxr: the service's API workers decode with this module and never import torch. The
features computed from the decoded samples (Kaldi fbank, normalisation) live in fastast.features.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fastast.errors import AudioTooLongError, InvalidAudioError

FRAME_MS = 25.0
SHIFT_MS = 10.0
# libsndfile's header log for a WAV whose data chunk promises more bytes than the file holds.
_WAV_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZE = 0x7FFF0000  # writers that cannot seek (pipes) leave a placeholder this large or larger

AudioSource = bytes | bytearray | memoryview | str | os.PathLike


def load_audio(source: AudioSource, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Decode any soundfile format, mix to mono and resample: the one way audio enters the service.

    Returns float32 samples in [-1, 1] at `sample_rate`; every problem with the input is an InvalidAudioError.
    """
    samples, rate = decode(source, max_seconds)
    wave = resample(to_mono(samples), rate, sample_rate)
    if len(wave) < frame_length(sample_rate):
        raise InvalidAudioError(
            f"audio is {1000 * len(wave) / sample_rate:.1f} ms long, shorter than one {FRAME_MS:g} ms analysis frame"
        )
    return wave


def decode(source: AudioSource, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Samples [frames, channels] float32 and their sample rate; too-long audio is refused before it is decoded."""
    handle = _open_source(source)
    try:
        with sf.SoundFile(handle) as f:
            rate, declared = f.samplerate, f.frames
            limit = None if max_seconds is None else int(max_seconds * rate)
            if limit is not None and declared > limit:
                raise AudioTooLongError(_too_long(declared / rate, max_seconds))
            _check_wav_complete(f)
            # Read at most one frame past the limit, so a header that understates the length costs no memory.
            samples = f.read(frames=-1 if limit is None else limit + 1, dtype="float32", always_2d=True)
    except InvalidAudioError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)
        raise InvalidAudioError(f"cannot decode audio (not an audio format, corrupt or truncated): {reason}") from None
    if limit is not None and len(samples) > limit:
        raise AudioTooLongError(_too_long(len(samples) / rate, max_seconds))
    if samples.size == 0:
        raise InvalidAudioError("audio contains no samples")
    if not np.isfinite(samples).all():
        raise InvalidAudioError("audio contains NaN or infinite samples")
    return samples, rate


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


def _too_long(seconds: float, max_seconds: float) -> str:
    return f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s"


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


def window_samples(target_length: int, sample_rate: int) -> int:
    """Samples that the model's window of `target_length` frames covers; later samples cannot change its input."""
    return (target_length - 1) * frame_shift(sample_rate) + frame_length(sample_rate)
