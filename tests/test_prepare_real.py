"""`fastast prepare-data` for the real recordings: splits are deterministic, speaker-disjoint and stable.

The folders are tiny fakes with the layout of shared/data/real/ (clips.csv + audio), so CI needs no data set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tone, write_wav

from fastast.cli import main
from fastast.model.card import bundled_labels
from fastast.training.data import DataError, read_manifest
from fastast.training.prepare_real import prepare_esc10, prepare_real_speechcommands, split_speakers

WORDS = ("yes", "no", "up", "marvin", "seven")


def write_clips(root: Path, header: list[str], rows: list[list]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "clips.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return root


def fake_speech_commands(root: Path, speakers: int = 24) -> Path:
    """Every speaker says every word once, plus three _silence_ clips (no speaker); paths only, no audio."""
    rows = [[f"{w}/{s:08x}_nohash_0.flac", w, w, f"{s:08x}"] for s in range(speakers) for w in WORDS]
    rows += [[f"_silence_/{i}.flac", "_silence_", "_silence_", ""] for i in range(3)]
    return write_clips(root, ["path", "word", "category", "speaker"], rows)


def speakers_of(out: Path) -> dict[str, set[str]]:
    return {split: {ex.speaker for ex in read_manifest(out / f"{split}.json")} for split in ("train", "val", "test")}


def test_speech_commands_split_is_speaker_disjoint_and_deterministic(tmp_path):
    root = fake_speech_commands(tmp_path / "sc")
    prepare_real_speechcommands(root, tmp_path / "a", seed=0, test_speakers=6, val_speakers=4)
    prepare_real_speechcommands(root, tmp_path / "b", seed=0, test_speakers=6, val_speakers=4)
    for name in ("train.json", "val.json", "test.json", "noise.txt", "speakers.json", "labels.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    split = speakers_of(tmp_path / "a")
    assert (len(split["test"]), len(split["val"]), len(split["train"])) == (6, 4, 14)
    assert not (split["test"] & split["val"]) and not (split["test"] | split["val"]) & split["train"]
    assert len((tmp_path / "a" / "noise.txt").read_text().splitlines()) == 3  # _silence_ is noise, not a word
    mids = {label.display_name: label.mid for label in bundled_labels("speechcommands")}
    test = read_manifest(tmp_path / "a" / "test.json")
    assert {ex.labels[0] for ex in test} == {mids[w] for w in WORDS} and len(test) == 6 * len(WORDS)


def test_a_speakers_split_depends_on_seed_and_ids_not_on_file_order():
    speakers = [f"s{i}" for i in range(20)]
    split = split_speakers(speakers, 0, 5, 3)
    assert split_speakers(reversed(speakers * 2), 0, 5, 3) == split
    assert sorted(split.values()).count("test") == 5 and sorted(split.values()).count("val") == 3
    other = split_speakers(speakers, 1, 5, 3)
    assert {s for s, k in other.items() if k == "test"} != {s for s, k in split.items() if k == "test"}
    with pytest.raises(DataError, match="cannot give"):
        split_speakers(["a", "b"], 0, 1, 1)


def test_fsdd_digits_become_16_khz_one_second_words(tmp_path):
    root = tmp_path / "fsdd"
    (root / "recordings").mkdir(parents=True)
    rows = []
    for speaker in ("ann", "bob", "cy"):
        for digit in (0, 7):
            name = f"recordings/{digit}_{speaker}_0.wav"
            write_wav(root / name, tone(0.4, sample_rate=8000), sample_rate=8000)
            rows.append([name, digit, speaker, 0, "test"])
    write_clips(root, ["path", "digit", "speaker", "index", "official_split"], rows)
    assert main(["prepare-data", "fsdd", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    mids = {label.mid: label.display_name for label in bundled_labels("speechcommands")}
    examples = [ex for split in ("train", "val", "test") for ex in read_manifest(tmp_path / "out" / f"{split}.json")]
    assert sorted(mids[ex.labels[0]] for ex in examples) == ["seven", "seven", "seven", "zero", "zero", "zero"]
    info = sf.info(str(examples[0].path))
    assert (info.samplerate, info.frames) == (16000, 16000)
    wave, _ = sf.read(str(examples[0].path))
    assert np.abs(wave[:2000]).max() == 0 and np.abs(wave[7000:9000]).max() > 0.1  # centred in the second
    assert len(json.loads((tmp_path / "out" / "speakers.json").read_text())["test"]) == 1


def test_esc10_folds(tmp_path):
    names = ["Dog bark", "Rain"]
    rows = [[f"audio/{fold}-{i}-A-{k}.ogg", names[k], k, fold, i, "A"] for fold in range(1, 6) for k in (0, 1)
            for i in range(2)]
    root = write_clips(tmp_path / "esc10", ["path", "label", "label_idx", "fold", "freesound_id", "take"], rows)
    prepare_esc10(root, tmp_path / "out")
    for fold in range(1, 6):
        test = read_manifest(tmp_path / "out" / f"fold{fold}_eval.json")
        train = read_manifest(tmp_path / "out" / f"fold{fold}_train.json")
        assert len(test) == 4 and len(train) == 16
        assert all(ex.path.name.startswith(f"{fold}-") for ex in test)
        assert not {ex.path for ex in test} & {ex.path for ex in train}
    held_out = {split: {ex.path.name[0] for ex in read_manifest(tmp_path / "out" / f"{split}.json")}
                for split in ("train", "val", "test")}
    assert held_out == {"train": {"1", "2", "3"}, "val": {"4"}, "test": {"5"}}
    assert (tmp_path / "out" / "labels.csv").read_text().splitlines()[1:] == ["0,dog_bark,Dog bark", "1,rain,Rain"]
    # Another test fold: the fold before it validates (fold 5 before fold 1), the other three train.
    prepare_esc10(root, tmp_path / "fold1", test_fold=1)
    held_out = {split: {ex.path.name[0] for ex in read_manifest(tmp_path / "fold1" / f"{split}.json")}
                for split in ("train", "val", "test")}
    assert held_out == {"train": {"2", "3", "4"}, "val": {"5"}, "test": {"1"}}
    with pytest.raises(DataError, match="test fold must be 1..5"):
        prepare_esc10(root, tmp_path / "fold6", test_fold=6)
