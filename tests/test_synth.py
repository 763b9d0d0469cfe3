"""`fastast synth-commands`: real espeak-ng speech, checked on disk through the trainer's manifest reader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fastast.cli import main
from fastast.model.card import bundled_labels, read_label_csv
from fastast.training import synth
from fastast.training.data import read_manifest

LABELS = bundled_labels("speechcommands")
PER_WORD = 3


def _generate(out: Path, seed: int, workers: int = 2, per_word: int = PER_WORD, *extra: str) -> Path:
    argv = ["synth-commands", "--out", str(out), "--per-word", str(per_word), "--seed", str(seed), *extra]
    assert main([*argv, "--workers", str(workers), "--val-speakers", "2", "--test-speakers", "2"]) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth") / "sc", seed=0)


def test_manifests_point_to_one_second_16k_mono_wavs(dataset):
    mids = {label.mid for label in LABELS}
    counts = synth.split_counts(PER_WORD)
    for split in synth.SPLITS:
        examples = read_manifest(dataset / f"{split}.json")
        assert len(examples) == counts[split] * len(LABELS)
        assert {ex.labels for ex in examples} == {(mid,) for mid in mids}  # every word in every split
        for ex in examples:
            assert ex.path.is_file() and ex.path.is_relative_to(dataset / split)
            info = sf.info(str(ex.path))
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
    rows = json.loads((dataset / "train.json").read_text())["data"]
    assert not Path(rows[0]["wav"]).is_absolute()  # relative to the manifest's folder
    assert [(lab.index, lab.mid, lab.display_name) for lab in read_label_csv(dataset / "labels.csv")] == [
        (lab.index, lab.mid, lab.display_name) for lab in LABELS
    ]


def test_splits_share_no_speaker_voice_or_variant(dataset):
    record = json.loads((dataset / "speakers.json").read_text())
    splits = record["splits"]
    for held in ("val", "test"):
        assert len(splits[held]["speakers"]) <= 2
        for other in set(synth.SPLITS) - {held}:
            assert not set(splits[held]["speakers"]) & set(splits[other]["speakers"])
            assert not set(splits[held]["voices"]) & set(splits[other]["voices"])
            assert not set(splits[held]["variants"]) & set(splits[other]["variants"])
    assert any(v.startswith("en") for v in splits["train"]["voices"])
    for path, speaker in record["clips"].items():
        split = path.split("/")[0]
        assert speaker in splits[split]["speakers"]
        assert speaker.split("+")[0] in splits[split]["voices"]
    assert sum(sum(s["speakers"].values()) for s in splits.values()) == PER_WORD * len(LABELS)


def test_same_seed_gives_identical_bytes_whatever_the_workers(dataset, tmp_path):
    first = _files(dataset)
    assert _files(_generate(tmp_path / "again", seed=0, workers=1)) == first
    other = _files(_generate(tmp_path / "other", seed=1))
    assert other.keys() == first.keys()
    wavs = [name for name in first if name.endswith(".wav")]
    assert sum(first[name] != other[name] for name in wavs) == len(wavs)
    assert first["speakers.json"] != other["speakers.json"]


def test_clips_hold_the_word_inside_the_window_at_the_planned_snr(dataset):
    record = json.loads((dataset / "speakers.json").read_text())
    voices, variants = synth.espeak_voices(), synth.espeak_variants()
    plan = synth.plan(0, PER_WORD, synth.split_speakers(voices, variants, 0, 2, 2))
    assert {u.path: u.speaker.name for u in plan} == record["clips"]
    assert all(synth.SNR_DB[0] <= u.snr_db <= synth.SNR_DB[1] for u in plan)
    assert {u.noise for u in plan} == set(synth.NOISE_SLOPES)
    checked = 0
    for utt in plan:
        clip = synth.render(utt)
        on_disk, _ = sf.read(str(dataset / utt.path), dtype="int16")
        np.testing.assert_array_equal(on_disk, np.round(clip.wave * 32767).astype(np.int16))
        assert 0 <= clip.onset < clip.offset <= synth.CLIP_SAMPLES
        wave = clip.wave.astype(np.float64)
        inside = np.mean(wave[clip.onset : clip.offset] ** 2)
        outside = np.concatenate([wave[: clip.onset], wave[clip.offset :]])
        assert np.sqrt(inside) > 1e-3  # not silent
        # White noise is stationary, so the part outside the word measures the noise power and the SNR.
        if utt.noise == "white" and len(outside) >= 4000:
            noise = np.mean(outside**2)
            assert inside > noise
            assert abs(10 * np.log10((inside - noise) / noise) - utt.snr_db) < 1.5
            checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_noise_colours_fall_off_as_planned():
    rng = np.random.default_rng(0)
    low_share = {}
    for colour, slope in synth.NOISE_SLOPES.items():
        noise = synth.colored_noise(16000, slope, rng)
        assert np.mean(noise**2) == pytest.approx(1.0)
        power = np.abs(np.fft.rfft(noise)) ** 2
        low_share[colour] = power[:500].sum() / power.sum()  # below 500 Hz
    assert low_share["white"] < 0.1 < low_share["pink"] < low_share["brown"]


def test_a_word_too_long_for_the_window_is_said_faster():
    speakers = synth.split_speakers(synth.espeak_voices(), synth.espeak_variants(), 0, 2, 2)
    utt = synth.plan(0, PER_WORD, speakers)[0]
    slow = dataclasses.replace(utt, word="backward forward visual", speed=80)
    assert len(synth.speak(slow.word, slow.speaker, slow.pitch, slow.speed, slow.amplitude)) > synth.CLIP_SAMPLES
    clip = synth.render(slow)
    assert clip.wave.shape == (synth.CLIP_SAMPLES,)
    assert 0.5 * synth.CLIP_SAMPLES < clip.offset - clip.onset <= synth.CLIP_SAMPLES


def test_trim_silence_keeps_the_loud_part():
    wave = np.zeros(8000, dtype=np.float32)
    wave[2000:5000] = np.sin(np.arange(3000) / 5.0)
    trimmed = synth.trim_silence(wave)
    assert 3000 <= len(trimmed) <= 3000 + 2 * 80
    assert synth.trim_silence(np.zeros(800, dtype=np.float32)).size == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--per-word", "0"], "per-word must be at least 3"),
        (["--test-speakers", "200"], "too few voices"),
        (["--workers", "0"], "workers must be at least 1"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(["synth-commands", "--out", str(tmp_path / "new"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("fastast synth-commands: error:")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["file", "non-empty folder"])
def test_bad_out_gives_one_line_and_exit_2(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main(["synth-commands", "--out", str(out), "--per-word", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err
    assert out.is_file() if kind == "file" else [p.name for p in out.iterdir()] == ["keep.txt"]


ENGINES = "espeak-ng,flite,festival"


def test_flite_and_festival_voices_speak_a_share_of_train_only(tmp_path):
    out = _generate(tmp_path / "engines", 0, 2, 5, "--engines", ENGINES)
    record = json.loads((out / "speakers.json").read_text())
    assert record["engines"] == sorted(ENGINES.split(","))
    by_split = {split: [s for p, s in record["clips"].items() if p.startswith(f"{split}/")] for split in synth.SPLITS}
    other = [s for s in by_split["train"] if s.split(":")[0] in ("flite", "festival")]
    # A third of the 105 training clips, give or take the binomial spread (sd 4.8).
    assert 20 <= len(other) <= 50
    assert {s.split(":")[0] for s in other} == {"flite", "festival"}
    for held in ("val", "test"):
        assert all(":" not in s for s in by_split[held])
    for ex in read_manifest(out / "train.json"):
        info = sf.info(str(ex.path))
        assert (info.samplerate, info.frames) == (16000, 16000)


OTHER_VOICES = [synth.Speaker(f"{engine}:{name}") for engine, names in synth.ENGINE_VOICES.items() for name in names]


def test_the_other_engines_voices_are_installed():
    assert synth.engine_speakers(tuple(synth.ENGINES)) == sorted(OTHER_VOICES)
    assert synth.engine_speakers(("espeak-ng",)) == []


@pytest.mark.parametrize("speaker", OTHER_VOICES, ids=lambda s: s.name)
def test_every_other_engine_voice_follows_the_planned_speed_and_is_repeatable(speaker):
    slow = synth.speak("seven", speaker, pitch=40, speed=100, amplitude=100)
    fast = synth.speak("seven", speaker, pitch=40, speed=180, amplitude=100)
    assert np.sqrt(np.mean(slow.astype(np.float64) ** 2)) > 1e-2  # speech, not silence
    assert len(fast) / len(slow) == pytest.approx(100 / 180, rel=0.15)
    np.testing.assert_array_equal(synth.speak("seven", speaker, pitch=40, speed=100, amplitude=100), slow)


@pytest.mark.parametrize(
    ("engines", "message"),
    [("espeak-ng,nope", "unknown TTS engine 'nope'"), ("flite", "must include espeak-ng")],
)
def test_bad_engines_give_one_line_and_exit_2(tmp_path, capsys, engines, message):
    assert main(["synth-commands", "--out", str(tmp_path / "new"), "--engines", engines]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "new").exists()
