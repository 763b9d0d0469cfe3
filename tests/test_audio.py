"""The audio front end: decoding real files, and numerical parity of the fbank with the peers AST is judged by.

torchaudio's kaldi.fbank (AST's own call), kaldi-native-fbank and transformers' ASTFeatureExtractor are the
references; the signals are real-sounding (espeak-ng speech, noise, tones, silence, clipped speech).
"""

from __future__ import annotations

import io
import math
import struct
import tracemalloc

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as ta_kaldi
from conftest import SC_MEAN, SC_STD, tone, write_wav
from transformers import ASTFeatureExtractor

from fastast import audio, features
from fastast.audio import load_audio
from fastast.errors import AudioLimitError, AudioTooLongError, InvalidAudioError
from fastast.features import featurize, kaldi_fbank, normalize, pad_or_trim

# AST's exact call (src/dataloader.py); sample_frequency is added per use.
AST_FBANK = dict(htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
TOLERANCE = 1e-3
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)
# Below this log energy (about 86 dB under a full-scale tone's band energy) any float32 fbank is round-off:
# kaldi-native-fbank itself strays up to ~2e-2 from a float64 computation there on pure tones.
ROUND_OFF_LEVEL = -10.0
SIGNALS = ("speech", "white_noise", "tones", "silence", "clipped")


@pytest.fixture(scope="module")
def signals(speech_wav) -> dict[str, np.ndarray]:
    speech = load_audio(speech_wav)  # espeak-ng writes 22.05 kHz: this goes through our own resampler
    rng = np.random.default_rng(0)
    return {
        "speech": speech,
        "white_noise": (0.1 * rng.standard_normal(24000)).astype(np.float32),
        "tones": 0.5 * tone(1.5, freq=440.0) + 0.5 * tone(1.5, freq=3150.7),
        "silence": np.zeros(16000, dtype=np.float32),
        "clipped": np.clip(30.0 * speech, -1.0, 1.0),
    }


def torchaudio_fbank(wave: np.ndarray, sample_rate: int = 16000, **overrides) -> torch.Tensor:
    return ta_kaldi.fbank(torch.from_numpy(wave)[None], sample_frequency=sample_rate, **{**AST_FBANK, **overrides})


def knf_fbank(wave: np.ndarray, num_bins: int) -> torch.Tensor:
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.window_type = "hanning"
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wave.tolist())
    fbank.input_finished()
    return torch.from_numpy(np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))


def peak_hz(wave: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * sample_rate / len(wave))


# --- fbank parity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIGNALS)
def test_fbank_matches_torchaudio_kaldi_with_ast_options(signals, name):
    wave = signals[name]
    ours, reference = kaldi_fbank(torch.from_numpy(wave)), torchaudio_fbank(wave)
    assert ours.shape == reference.shape == (1 + (len(wave) - 400) // 160, 128)
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("num_bins", [80, 126])
@pytest.mark.parametrize("name", SIGNALS)
def test_fbank_matches_kaldi_native_fbank(signals, name, num_bins):
    """Kaldi (and kaldi-native-fbank) refuse 128 bins at 16 kHz / 512-point FFT: mel bin 3 covers no FFT bin
    (torchaudio lets it through as a constant log-floor column). 126 is the nearest count Kaldi accepts; every
    other stage (framing, DC, pre-emphasis, window, FFT, power, log floor) is the same code path."""
    wave = signals[name]
    ours, reference = kaldi_fbank(torch.from_numpy(wave), num_mel_bins=num_bins), knf_fbank(wave, num_bins)
    assert ours.shape == reference.shape
    above_round_off = reference > ROUND_OFF_LEVEL
    assert ((ours - reference) * above_round_off).abs().max().item() <= TOLERANCE
    assert (ours - reference).abs().max().item() <= 3e-2
    if name == "silence":
        assert torch.equal(ours, torch.full_like(ours, LOG_FLOOR)) and torch.equal(ours, reference)
    else:
        assert above_round_off.float().mean() > 0.2  # not vacuous: even pure tones light up a fifth of the cells


@pytest.mark.parametrize(("sample_rate", "num_mel_bins"), [(8000, 64), (22050, 128)])
def test_fbank_matches_torchaudio_at_other_rates(signals, sample_rate, num_mel_bins):
    wave = signals["white_noise"]
    ours = kaldi_fbank(torch.from_numpy(wave), sample_rate, num_mel_bins)
    reference = torchaudio_fbank(wave, sample_rate, num_mel_bins=num_mel_bins)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("sample_rate", "num_mel_bins"), [(16000, 128), (8000, 128), (22050, 64), (16000, 10)])
def test_banded_mel_projection_equals_the_dense_matrix(sample_rate, num_mel_bins):
    """The CPU skips the mel matrix's zeros band by band; what it computes must be the dense product (8 kHz with
    128 filters has empty filters, 10 filters make one band)."""
    n_fft = 1 << (features.frame_length(sample_rate) - 1).bit_length()
    matrix = features.kaldi_mel_matrix(sample_rate, n_fft, num_mel_bins)
    banded = features.MelProjection.build(matrix, banded=True)
    assert len(banded.bands) == -(-num_mel_bins // features.MEL_BAND_FILTERS)
    if num_mel_bins >= 64:  # where banding pays: a small fraction of the dense multiplications
        assert sum((end - first) * weights.shape[1] for first, end, weights in banded.bands) < matrix.numel() / 2
    power = torch.rand(3, 50, matrix.shape[0]) * torch.logspace(-6, 2, matrix.shape[0])
    torch.testing.assert_close(banded(power), power @ matrix, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cpu_block_frames", [features.CPU_BLOCK_FRAMES, 7])  # 7 // 5 clips: one frame per block
def test_batched_call_equals_per_item_calls(signals, monkeypatch, cpu_block_frames):
    length = min(len(w) for w in signals.values())
    batch = torch.from_numpy(np.stack([signals[name][:length] for name in SIGNALS]))
    monkeypatch.setattr(features, "CPU_BLOCK_FRAMES", cpu_block_frames)
    batched = kaldi_fbank(batch)
    monkeypatch.undo()
    assert batched.shape == (len(SIGNALS), 1 + (length - 400) // 160, 128)
    for i in range(len(SIGNALS)):
        torch.testing.assert_close(batched[i], kaldi_fbank(batch[i]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [400, 559, 560, 16000, 160000])
def test_frame_count_follows_snip_edges(samples):
    fbank = kaldi_fbank(torch.zeros(2, samples))
    assert fbank.shape == (2, 1 + (samples - 400) // 160, 128)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_fbank_computes_in_float32_for_any_input_dtype(signals, dtype):
    wave = torch.from_numpy(signals["speech"][:16000])
    fbank = kaldi_fbank(wave.to(dtype))
    assert fbank.dtype == torch.float32 and torch.isfinite(fbank).all()
    if dtype == torch.float64:
        torch.testing.assert_close(fbank, kaldi_fbank(wave), rtol=0, atol=1e-5)


def test_fbank_follows_the_input_device():
    """Nothing is pinned to the CPU: shapes propagate on the meta device (what cuda:N would get)."""
    fbank = kaldi_fbank(torch.zeros(3, 16000, device="meta"))
    assert fbank.device.type == "meta" and fbank.shape == (3, 98, 128)


def test_fbank_rejects_unusable_input():
    with pytest.raises(InvalidAudioError, match="fewer than one 25 ms frame"):
        kaldi_fbank(torch.zeros(399))
    with pytest.raises(InvalidAudioError, match="must be float"):
        kaldi_fbank(torch.zeros(16000, dtype=torch.int16))
    with pytest.raises(InvalidAudioError, match="must be float"):
        kaldi_fbank(torch.zeros(1, 2, 16000))


# --- featurize ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_length", "stats"),
    [(128, {"mean": SC_MEAN, "std": SC_STD}), (1024, {})],  # Speech Commands; AudioSet (extractor defaults)
)
def test_featurize_matches_transformers_ast_feature_extractor(signals, max_length, stats):
    extractor = ASTFeatureExtractor(max_length=max_length, **stats)
    rng = np.random.default_rng(1)
    long_noise = (0.05 * rng.standard_normal(16000 * (max_length // 100 + 1))).astype(np.float32)
    for waves in ([signals["speech"]], [signals["clipped"][:16000], signals["white_noise"][:16000]], [long_noise]):
        reference = extractor(waves, sampling_rate=16000, return_tensors="np")["input_values"]
        ours = featurize(
            np.stack(waves),
            16000,
            target_length=max_length,
            mean=extractor.mean,
            std=extractor.std,
        )
        assert ours.shape == reference.shape == (len(waves), max_length, 128)
        assert np.abs(ours.numpy() - reference).max() <= TOLERANCE


def test_featurize_accepts_arrays_and_tensors_one_or_many(signals):
    wave = signals["speech"][:16000]
    spec = dict(target_length=128, mean=SC_MEAN, std=SC_STD)
    single = featurize(wave, 16000, **spec)
    assert single.shape == (1, 128, 128) and single.dtype == torch.float32
    torch.testing.assert_close(featurize(torch.from_numpy(wave), 16000, **spec), single, rtol=0, atol=0)
    batch = featurize(np.stack([wave, wave[::-1]]).astype(np.float64), 16000, **spec)
    assert batch.shape == (2, 128, 128) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[:1], single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("target_length", [128, 64])
def test_clips_of_different_lengths_in_one_batch_get_their_solo_features(signals, target_length):
    """The engine pads a batch of clips to its longest and passes their lengths: each row equals the clip alone."""
    speech = signals["speech"]
    clips = [speech[:400], speech[:5_003], signals["white_noise"][:16_000], speech[3_000:26_000]]
    padded = np.full((len(clips), max(map(len, clips))), np.nan, dtype=np.float32)  # a reused buffer: stale data
    lengths = features.pad_rows(clips, padded)
    assert lengths == [len(clip) for clip in clips]
    spec = dict(target_length=target_length, mean=SC_MEAN, std=SC_STD)
    batched = featurize(padded, 16000, **spec, lengths=lengths)
    for row, clip in zip(batched, clips):
        torch.testing.assert_close(row, featurize(clip, 16000, **spec)[0], rtol=0, atol=1e-5)
    unmasked = featurize(padded, 16000, **spec)  # without lengths, frames that reach into the padding differ
    assert not torch.allclose(unmasked[1], batched[1], atol=1e-3)
    with pytest.raises(ValueError, match="model's sample rate"):
        featurize(padded, 8000, **spec, lengths=[len(clip) for clip in clips])


def test_padding_is_zero_log_mel_before_normalization_and_trimming_keeps_the_start(signals):
    fbank = kaldi_fbank(torch.from_numpy(signals["speech"][:16000]))  # 98 frames
    padded = pad_or_trim(fbank, 128)
    assert padded.shape == (128, 128)
    assert torch.equal(padded[:98], fbank) and torch.equal(padded[98:], torch.zeros(30, 128))
    assert torch.equal(pad_or_trim(fbank[None], 40), fbank[None, :40])
    features = featurize(signals["speech"][:16000], 16000, target_length=128, mean=SC_MEAN, std=SC_STD)
    torch.testing.assert_close(features[0, 98:], torch.full((30, 128), -SC_MEAN / (2 * SC_STD)))
    torch.testing.assert_close(normalize(fbank, SC_MEAN, SC_STD), (fbank - SC_MEAN) / (2 * SC_STD))


def test_featurize_resamples_to_the_model_rate():
    at_8k = featurize(tone(1.0, 8000, freq=1000.0), 8000, target_length=128, mean=0.0, std=0.5)
    at_16k = featurize(tone(1.0, 16000, freq=1000.0), 16000, target_length=128, mean=0.0, std=0.5)
    assert at_8k.shape == at_16k.shape == (1, 128, 128)
    assert torch.equal(at_8k[0, :98].argmax(-1), at_16k[0, :98].argmax(-1))
    # The loudest band holds the same energy (the 8 kHz copy just lacks content above 4 kHz).
    torch.testing.assert_close(at_8k[0, 5:90].amax(-1), at_16k[0, 5:90].amax(-1), rtol=0, atol=0.02)


def test_featurize_rejects_non_finite_samples():
    wave = tone(1.0)
    wave[100] = np.nan
    with pytest.raises(InvalidAudioError, match="NaN or infinite"):
        featurize(wave, 16000, target_length=128, mean=SC_MEAN, std=SC_STD)


# --- decoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "subtype", "max_error"),
    [
        ("WAV", "PCM_16", 1 / 32768),
        ("WAV", "FLOAT", 0.0),
        ("FLAC", "PCM_16", 1 / 32768),
        ("OGG", "VORBIS", None),
        ("MP3", "MPEG_LAYER_III", None),
    ],
)
def test_decodes_common_formats_from_path_and_bytes(tmp_path, fmt, subtype, max_error):
    original = tone(1.0, 16000, freq=440.0)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(str(path), original, 16000, format=fmt, subtype=subtype)
    from_path, from_bytes = load_audio(path), load_audio(path.read_bytes())
    assert from_path.dtype == np.float32 and from_path.ndim == 1
    np.testing.assert_array_equal(from_path, from_bytes)
    assert abs(len(from_path) - 16000) <= 1600  # lossy codecs may add or trim a few ms of priming
    assert abs(peak_hz(from_path, 16000) - 440.0) <= 2.0
    if max_error is not None:
        assert len(from_path) == 16000 and np.abs(from_path - original).max() <= max_error


def test_stereo_is_mixed_to_mono_as_the_mean_of_channels(tmp_path):
    left, right = tone(1.0, freq=440.0), tone(1.0, freq=1000.0)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("sample_rate", [44100, 8000])
def test_resamples_to_16k_keeping_duration_and_pitch(tmp_path, sample_rate):
    path = write_wav(tmp_path / f"tone_{sample_rate}.wav", tone(1.0, sample_rate, freq=1000.0), sample_rate)
    wave = load_audio(path)
    assert len(wave) == 16000
    assert abs(peak_hz(wave, 16000) - 1000.0) <= 1.0


def test_espeak_speech_keeps_its_duration(speech_wav):
    info = sf.info(str(speech_wav))
    assert info.samplerate == 22050
    assert abs(len(load_audio(speech_wav)) - info.frames * 16000 / 22050) <= 1


def test_streamed_wav_with_placeholder_sizes_is_not_called_truncated():
    """Writers on a pipe cannot seek back, so they leave 0xFFFFFFFF as the RIFF and data sizes."""
    data = bytearray(wav_bytes(tone(1.0)))
    data[4:8] = b"\xff\xff\xff\xff"
    at = data.find(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"
    assert len(load_audio(bytes(data))) == 16000


PCM16_CASES = {  # (channels, rate, seconds, format): mono at the model's rate, resampled, several blocks, WAVEX
    "mono 16 kHz": (1, 16000, 1.0, "WAV"),
    "stereo 44.1 kHz": (2, 44100, 1.5, "WAV"),
    "3 channels 8 kHz over several blocks": (3, 8000, 2 * audio.BLOCK_SAMPLES / 8000 / 3 + 0.3, "WAV"),
    "WAVE_FORMAT_EXTENSIBLE": (2, 22050, 1.0, "WAVEX"),
}


@pytest.mark.parametrize("case", PCM16_CASES)
def test_pcm16_wav_bytes_decode_to_libsndfiles_samples(tmp_path, case):
    """Uploads of 16-bit WAV skip libsndfile (the stdlib's wave reads the header): the samples must not change."""
    channels, rate, seconds, fmt = PCM16_CASES[case]
    rng = np.random.default_rng(channels)
    wave = (0.3 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    path = tmp_path / "clip.wav"
    sf.write(str(path), wave, rate, format=fmt, subtype="PCM_16")
    for to_rate in (None, 16000):
        expected, _ = audio.decode(path, sample_rate=to_rate)  # a path: always libsndfile
        decoded, out_rate = audio.decode(path.read_bytes(), sample_rate=to_rate)
        assert out_rate == (to_rate or rate)
        np.testing.assert_array_equal(decoded, expected)


def test_pcm16_wav_bytes_are_read_without_libsndfile_and_keep_every_limit(monkeypatch):
    data = wav_bytes(np.stack([tone(2.0, 44100), tone(2.0, 44100, freq=880.0)], axis=1), 44100)
    expected = load_audio(data)

    def no_libsndfile(*args, **kwargs):
        raise AssertionError("libsndfile was used")

    monkeypatch.setattr(audio.sf, "SoundFile", no_libsndfile)
    np.testing.assert_array_equal(load_audio(data), expected)
    with pytest.raises(AudioTooLongError, match=r"audio is 2\.0 s long; the limit is 1\.5 s"):
        load_audio(data, max_seconds=1.5)
    with pytest.raises(AudioLimitError, match="audio has 2 channels; the limit is 1"):
        load_audio(data, max_channels=1)
    with pytest.raises(AudioLimitError, match="audio is sampled at 44100 Hz; the limit is 16000 Hz"):
        load_audio(data, max_sample_rate=16000)


def test_wav_rate_reads_integer_pcm_headers_only():
    """The worker decodes small WAVs at the model's rate on its event loop; wav_rate decides that from the header."""
    assert audio.wav_rate(wav_bytes(tone(1.0, 22050), 22050)) == 22050
    assert audio.wav_rate(wav_bytes(tone(1.0), subtype="PCM_24")) == 16000
    assert audio.wav_rate(wav_header_only(2, 48000, 1.0)) == 48000  # the header alone suffices
    for other in (wav_bytes(tone(1.0), subtype="FLOAT"), wav_bytes(tone(1.0), fmt="FLAC"), b"RIFF" + bytes(40), b""):
        assert audio.wav_rate(other) is None


def test_max_seconds_accepts_audio_within_the_limit(tmp_path):
    assert len(load_audio(write_wav(tmp_path / "one_second.wav", tone(1.0)), max_seconds=1.0)) == 16000


def wav_bytes(wave: np.ndarray, sample_rate: int = 16000, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def with_sample(value: float) -> np.ndarray:
    wave = tone(1.0)
    wave[1234] = value
    return wave


BAD_INPUTS = {
    "empty bytes": (lambda: b"", "empty"),
    "text, not audio": (lambda: b"this is certainly not audio, just text. " * 20, "cannot decode"),
    "RIFF header then garbage": (lambda: b"RIFF" + np.random.default_rng(0).bytes(2000), "cannot decode"),
    "truncated WAV": (lambda: wav_bytes(tone(1.0))[:16000], "truncated"),
    "truncated FLAC": (lambda: wav_bytes(tone(1.0), fmt="FLAC")[:3000], "cannot decode"),
    "truncated OGG": (lambda: wav_bytes(tone(1.0), fmt="OGG", subtype="VORBIS")[:2000], "cannot decode"),
    "zero-length WAV": (lambda: wav_bytes(np.zeros(0, dtype=np.float32)), "no samples"),
    "shorter than a frame": (lambda: wav_bytes(tone(0.01)), "shorter than one 25 ms"),
    "NaN sample": (lambda: wav_bytes(with_sample(np.nan), subtype="FLOAT"), "NaN or infinite"),
    "Inf sample": (lambda: wav_bytes(with_sample(np.inf), subtype="FLOAT"), "NaN or infinite"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_invalid_audio_with_a_useful_message(case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(InvalidAudioError, match=message):
        load_audio(make())


def test_too_long_audio_is_refused_with_its_own_error(tmp_path):
    """AudioTooLongError is an InvalidAudioError the service can answer with 413 instead of 400."""
    path = write_wav(tmp_path / "two_seconds.wav", tone(2.0))
    with pytest.raises(AudioTooLongError, match=r"audio is 2\.0 s long; the limit is 1\.5 s"):
        load_audio(path, max_seconds=1.5)
    with pytest.raises(AudioTooLongError, match="limit is 0.5 s"):
        load_audio(path.read_bytes(), max_seconds=0.5)


def test_missing_or_empty_files_are_invalid_audio(tmp_path):
    with pytest.raises(InvalidAudioError, match="no audio file"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InvalidAudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")


# --- limits on what a header may ask for, and decoding in blocks --------------------------------------------


def wav_header_only(channels: int, sample_rate: int, seconds: float) -> bytes:
    """A 16-bit PCM WAV header that promises `seconds` of audio, followed by only 1 KB of it."""
    data_bytes = int(seconds * sample_rate) * channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    return header + b"data" + struct.pack("<I", data_bytes) + bytes(1024)


def test_channels_and_sample_rate_are_refused_from_the_header_before_decoding():
    """The file holds 1 KB of its promised samples: a limit error (not 'truncated') shows nothing was decoded."""
    with pytest.raises(AudioLimitError, match="audio has 255 channels; the limit is 8"):
        load_audio(wav_header_only(255, 96000, 29.0), max_channels=8)
    with pytest.raises(AudioLimitError, match="audio is sampled at 655350 Hz; the limit is 192000 Hz"):
        load_audio(wav_header_only(1, 655350, 1.0), max_sample_rate=192000)
    with pytest.raises(InvalidAudioError, match="truncated"):  # within every limit: now it is read, and found short
        load_audio(wav_header_only(2, 48000, 1.0), max_seconds=30, max_channels=8, max_sample_rate=48000)


def test_flac_at_the_highest_rate_flac_allows_is_refused():
    data = wav_bytes(np.zeros((65535, 8), dtype=np.float32), 655350, fmt="FLAC")
    with pytest.raises(AudioLimitError, match="655350 Hz") as refused:
        load_audio(data, max_seconds=30, max_channels=8, max_sample_rate=192000)
    assert refused.value.code == "audio_too_large"


def test_blocks_are_mixed_to_mono_exactly_as_a_whole_read_would_be(tmp_path):
    rng = np.random.default_rng(3)
    frames = audio.BLOCK_SAMPLES  # three channels: the audio spans three blocks
    wave = (0.3 * rng.standard_normal((frames, 3))).astype(np.float32)
    path = tmp_path / "three.wav"
    sf.write(str(path), wave, 48000, subtype="FLOAT")
    mono, rate = audio.decode(path)
    assert rate == 48000 and mono.dtype == np.float32
    np.testing.assert_array_equal(mono, wave.mean(axis=1, dtype=np.float32))


def test_decoding_holds_the_mono_signal_never_every_channel(tmp_path):
    """8 channels of 20 s at 48 kHz: decoded whole that is 31 MB of float32, mixed block by block about 4 MB."""
    channels, rate, seconds = 8, 48000, 20
    frames = rate * seconds
    wave = tone(seconds, rate, freq=440.0, channels=channels) * np.linspace(0.2, 1.0, channels, dtype=np.float32)
    path = tmp_path / "eight.flac"
    sf.write(str(path), wave, rate, format="FLAC", subtype="PCM_16")
    del wave
    mono_bytes, block_bytes = 4 * frames, 4 * audio.BLOCK_SAMPLES
    bound = 2 * mono_bytes + 2 * block_bytes  # the pieces and their concatenation, plus one block and its mean
    assert 4 * frames * channels > bound  # a decoder that held every channel could not pass
    tracemalloc.start()
    try:
        mono, _ = audio.decode(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(mono) == frames
    assert peak < bound, f"peak {peak / 1e6:.1f} MB"


def test_long_high_rate_audio_is_held_at_the_model_rate(tmp_path):
    """60 s at 96 kHz: 23 MB of float32 mono at its native rate, 3.8 MB at 16 kHz; resampled block by block, the
    native signal is never whole in memory, and the samples equal those of resampling it at once."""
    rate, seconds = 96000, 60
    path = tmp_path / "long.flac"
    sf.write(str(path), tone(seconds, rate, freq=440.0), rate, format="FLAC", subtype="PCM_16")
    native, _ = audio.decode(path)
    bound = 2 * 4 * seconds * 16000 + 2 * 4 * audio.BLOCK_SAMPLES  # the output and its pieces, plus one block
    assert 4 * len(native) > bound  # a decoder that held the native signal could not pass
    tracemalloc.start()
    try:
        wave, out_rate = audio.decode(path, sample_rate=16000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out_rate == 16000 and len(wave) == seconds * 16000
    assert peak < bound, f"peak {peak / 1e6:.1f} MB"
    np.testing.assert_array_equal(wave, audio.resample(native, rate, 16000))


def unknown_length_flac(seconds: float) -> bytes:
    """A FLAC whose STREAMINFO gives no sample count, as an encoder writing to a pipe leaves it."""
    data = bytearray(wav_bytes(tone(seconds), fmt="FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    # STREAMINFO starts at byte 8; its total-samples field is the low 4 bits of byte 13 and bytes 14-17.
    data[8 + 13] &= 0xF0
    data[8 + 14 : 8 + 18] = bytes(4)
    return bytes(data)


def test_flac_of_unknown_length_is_read_to_its_end():
    data = unknown_length_flac(2.0)
    assert sf.info(io.BytesIO(data)).frames >= 2**63 - 1  # libsndfile's "unknown"
    assert len(load_audio(data, max_seconds=30)) == 32000


def test_flac_of_unknown_length_past_the_limit_says_so_without_a_made_up_duration():
    with pytest.raises(AudioTooLongError) as too_long:
        load_audio(unknown_length_flac(3.0), max_seconds=2)
    message = str(too_long.value)
    assert message == "audio runs past the limit of 2 s (its header gives no length)"
