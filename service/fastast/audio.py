"""Audio decoding: bytes or a file -> mono float32 at the model's rate; the one way audio enters the product.

Only numpy, soundfile, soxr and the standard library: the service's API workers decode with this module and never
import torch. The features computed from the decoded samples (Kaldi fbank, normalisation) live in
fastast.features.

libsndfile reads every format. The most common upload, a complete 16-bit PCM WAV in memory, is read instead by the
standard library's `wave` (its header) and numpy (its samples): about 9x less CPU for a 1 s clip, the service's
largest per-request cost after HTTP, and the same samples to the bit (libsndfile also scales by 1/32768).
"""

from __future__ import annotations

import io
import os
import re
import wave
from collections.abc import Iterator
from dataclasses import dataclass
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
PCM16_SCALE = np.float32(1 / 32768)  # libsndfile's int16 -> float scale: a power of two, so exact

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
    mono, _ = decode(source, max_seconds, max_channels=max_channels, max_sample_rate=max_sample_rate, sample_rate=sample_rate)
    if len(mono) < frame_length(sample_rate):
        raise InvalidAudioError(
            f"audio is {1000 * len(mono) / sample_rate:.1f} ms long, shorter than one {FRAME_MS:g} ms analysis frame"
        )
    return mono


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
    if isinstance(source, (bytes, bytearray, memoryview)):
        fast = _decode_pcm16_wav(source, max_seconds, max_channels, max_sample_rate, sample_rate)
        if fast is not None:
            return fast
    handle = _open_source(source)
    try:
        with sf.SoundFile(handle) as f:
            rate, declared = f.samplerate, (f.frames if f.frames < _UNKNOWN_FRAMES else None)
            if declared is None:
                _read_as_stream(f)
            limit = _check_header(f.channels, rate, declared, max_seconds, max_channels, max_sample_rate)
            _check_wav_complete(f)
            # Read at most one frame past the limit, so a header that understates the length costs no memory.
            mono, frames = _mono_at(_soundfile_blocks(f, None if limit is None else limit + 1), rate, sample_rate or rate)
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
    return mono, sample_rate or rate


@dataclass(frozen=True)
class _WavHeader:
    channels: int
    rate: int
    width: int  # bytes per sample
    compression: str
    frames: int  # as the data chunk's size declares them
    start: int  # offset of the first sample


def _wav_header(data: bytes | bytearray | memoryview) -> _WavHeader | None:
    """The header of a RIFF WAVE the stdlib's wave module reads (integer PCM); None for anything else."""
    if bytes(data[:4]) != b"RIFF" or bytes(data[8:12]) != b"WAVE":
        return None
    stream = io.BytesIO(data)
    try:
        with wave.open(stream) as f:
            # wave stops right after the data chunk's header: the samples start where the stream stands.
            return _WavHeader(f.getnchannels(), f.getframerate(), f.getsampwidth(), f.getcomptype(), f.getnframes(), stream.tell())
    except (wave.Error, EOFError, ValueError):
        return None


def wav_rate(data: bytes | bytearray | memoryview) -> int | None:
    """The sample rate of an integer-PCM WAV, read from its header alone; None for any other input."""
    header = _wav_header(data)
    return None if header is None else header.rate


def _decode_pcm16_wav(
    data: bytes | bytearray | memoryview,
    max_seconds: float | None,
    max_channels: int | None,
    max_sample_rate: int | None,
    sample_rate: int | None,
) -> tuple[np.ndarray, int] | None:
    """decode() of a complete, non-empty 16-bit PCM WAV; None for anything else, which libsndfile then reads (and
    refuses with its own reasons when it is broken)."""
    header = _wav_header(data)
    if header is None:
        return None
    channels, rate, frames = header.channels, header.rate, header.frames
    complete = (len(data) - header.start) // (2 * channels) >= frames
    if header.width != 2 or header.compression != "NONE" or rate <= 0 or frames == 0 or not complete:
        return None
    _check_header(channels, rate, frames, max_seconds, max_channels, max_sample_rate)
    pcm = np.frombuffer(data, dtype="<i2", count=frames * channels, offset=header.start).reshape(frames, channels)
    block = max(1, BLOCK_SAMPLES // channels)
    blocks = (pcm[i : i + block].astype(np.float32) * PCM16_SCALE for i in range(0, frames, block))
    try:
        mono, _ = _mono_at(blocks, rate, sample_rate or rate)
    except InvalidAudioError:
        raise
    except (ValueError, RuntimeError):
        return None  # a rate soxr refuses: libsndfile's path words the error
    return mono, sample_rate or rate


def _read_as_stream(f: sf.SoundFile) -> None:
    """Read a file whose header gives no length as a stream, without seeking.

    soundfile tracks its position by seeking after every read, and libsndfile cannot seek to the end of a FLAC of
    unknown length, so the last read would fail (libsndfile issues 806 and 835).
    """
    f._info.seekable = False  # soundfile's own flag, which has no public setter


def _check_header(
    channels: int,
    rate: int,
    declared: int | None,
    max_seconds: float | None,
    max_channels: int | None,
    max_sample_rate: int | None,
) -> int | None:
    """Refuse what the header alone shows to be over a limit; the most frames that may then be decoded."""
    if max_channels is not None and channels > max_channels:
        raise AudioLimitError(f"audio has {channels} channels; the limit is {max_channels}")
    if max_sample_rate is not None and rate > max_sample_rate:
        raise AudioLimitError(f"audio is sampled at {rate} Hz; the limit is {max_sample_rate} Hz")
    if max_seconds is None:
        return None
    limit = int(max_seconds * rate)
    if declared is not None and declared > limit:
        raise AudioTooLongError(f"audio is {declared / rate:.1f} s long; the limit is {max_seconds:g} s")
    return limit


def _soundfile_blocks(f: sf.SoundFile, max_frames: int | None) -> Iterator[np.ndarray]:
    """float32 [frames, channels] blocks of BLOCK_SAMPLES samples, up to max_frames frames (all when None)."""
    block, total = max(1, BLOCK_SAMPLES // f.channels), 0
    while max_frames is None or total < max_frames:
        samples = f.read(block if max_frames is None else min(block, max_frames - total), dtype="float32", always_2d=True)
        if len(samples) == 0:
            return
        total += len(samples)
        yield samples


def _mono_at(blocks: Iterator[np.ndarray], rate: int, to_rate: int) -> tuple[np.ndarray, int]:
    """The blocks mixed to mono and resampled to `to_rate` as they come (soxr's stream gives exactly the samples
    of resampling the whole signal at once), and how many native frames they held."""
    stream = None if to_rate == rate else soxr.ResampleStream(rate, to_rate, 1, dtype="float32")
    parts, total = [], 0
    for samples in blocks:
        if not np.isfinite(samples).all():
            raise InvalidAudioError("audio contains NaN or infinite samples")
        mono = to_mono(samples)
        parts.append(mono if stream is None else stream.resample_chunk(mono))
        total += len(samples)
    if stream is not None:
        parts.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(joined, dtype=np.float32), total


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


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """soxr at its high-quality default; [frames] or [frames, channels] float32."""
    if from_rate == to_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    try:
        out = soxr.resample(np.ascontiguousarray(samples, dtype=np.float32), from_rate, to_rate)
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
