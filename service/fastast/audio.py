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

from fastast.errors import AudioLimitError, AudioTooLongError, InvalidAudioError

FRAME_MS = 25.0
SHIFT_MS = 10.0
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
    wave, _ = decode(source, max_seconds, max_channels=max_channels, max_sample_rate=max_sample_rate, sample_rate=sample_rate)
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
    sample_rate: int | None = None,
) -> tuple[np.ndarray, int]:
    """Mono float32 samples [frames] and their rate: `sample_rate` when given, else the native one.

    A few KB of compressed audio can declare hundreds of channels at a high rate: the header is checked against
    the limits first, then the audio is decoded in blocks and each block mixed to mono and resampled at once, so
    memory stays near the mono signal at the output rate, never channels x native rate x seconds of float32 (ten
    minutes at 192 kHz would be 460 MB mono, 38 MB at 16 kHz).
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
            wave, frames = _read_mono(f, None if limit is None else limit + 1, sample_rate or rate)
    except InvalidAudioError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)
        raise InvalidAudioError(f"cannot decode audio (not an audio format, corrupt or truncated): {reason}") from None
    if limit is not None and frames > limit:
        claim = "its header gives no length" if declared is None else f"its header says {declared / rate:.1f} s"
        raise AudioTooLongError(f"audio runs past the limit of {max_seconds:g} s ({claim})")
    if frames == 0:
        raise InvalidAudioError("audio contains no samples")
    return wave, sample_rate or rate


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


def _read_mono(f: sf.SoundFile, max_frames: int | None, to_rate: int) -> tuple[np.ndarray, int]:
    """Up to max_frames frames (all when None), decoded block by block, mixed to mono and resampled to `to_rate`
    as they come (soxr's stream gives exactly the samples of resampling the whole signal at once), and how many
    native frames were read."""
    block = max(1, BLOCK_SAMPLES // f.channels)
    stream = None if to_rate == f.samplerate else soxr.ResampleStream(f.samplerate, to_rate, 1, dtype="float32")
    parts, total = [], 0
    while max_frames is None or total < max_frames:
        frames = block if max_frames is None else min(block, max_frames - total)
        samples = f.read(frames, dtype="float32", always_2d=True)
        if len(samples) == 0:
            break
        if not np.isfinite(samples).all():
            raise InvalidAudioError("audio contains NaN or infinite samples")
        mono = to_mono(samples)
        parts.append(mono if stream is None else stream.resample_chunk(mono))
        total += len(samples)
    if stream is not None:
        parts.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    wave = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), total


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


def window_samples(target_length: int, sample_rate: int) -> int:
    """Samples that the model's window of `target_length` frames covers; later samples cannot change its input."""
    return (target_length - 1) * frame_shift(sample_rate) + frame_length(sample_rate)
