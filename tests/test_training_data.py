"""Training data: manifests, label CSVs, the dataset (skipping undecodable files), augmentation, preparers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tone, write_wav
from fastast.model.card import Label, bundled_labels
from fastast.training import prepare
from fastast.training.augment import AugmentConfig, augment_fbank, mask_axis, mix_waveforms
from fastast.training.data import (
    AudioDataset,
    DataError,
    Example,
    FeatureSpec,
    LabelSet,
    check_examples,
    collate,
    infer_task,
    read_manifest,
    scan_class_folders,
    write_label_csv,
    write_manifest,
)

LABELS = [Label(index=0, mid="/m/a", display_name="a"), Label(index=1, mid="/m/b", display_name="b")]


def test_manifest_paths_resolve_relative_to_manifest_folder_or_absolute(tmp_path):
    (tmp_path / "clips").mkdir()
    wav = write_wav(tmp_path / "clips" / "x.wav", tone(0.2))
    other = write_wav(tmp_path / "y.wav", tone(0.2))
    manifest = tmp_path / "sub" / "m.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"data": [
        {"wav": "../clips/x.wav", "labels": "/m/a"},
        {"wav": str(other), "labels": "/m/a, /m/b"},
    ]}))
    examples = read_manifest(manifest)
    assert examples[0].path.resolve() == wav.resolve()
    assert examples[1].path == other and examples[1].labels == ("/m/a", "/m/b")
    assert infer_task(examples) == "multi-label" and infer_task(examples[:1]) == "single-label"
    # written back: inside the folder -> relative, outside -> absolute; reads back to the same files
    out = write_manifest(tmp_path / "m2.json", examples)
    rows = json.loads(out.read_text())["data"]
    assert rows[0]["wav"] == "clips/x.wav" and rows[1]["wav"] == "y.wav"
    assert [e.path.resolve() for e in read_manifest(out)] == [wav.resolve(), other.resolve()]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "manifest not found"),
        ("not json", "not a JSON manifest"),
        ('{"data": []}', "empty"),
        ('{"rows": []}', '"data"'),
        ('{"data": [{"wav": "a.wav"}]}', "'wav' and 'labels'"),
    ],
)
def test_bad_manifests_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_manifest(path)


def test_check_examples_reports_missing_files_and_unknown_labels(tmp_path):
    labels = LabelSet(LABELS)
    present = write_wav(tmp_path / "a.wav", tone(0.2))
    with pytest.raises(DataError, match="audio file not found: .*nope.wav"):
        check_examples([Example(tmp_path / "nope.wav", ("/m/a",))], labels, "m.json")
    with pytest.raises(DataError, match="labels not in the label CSV: /m/zzz"):
        check_examples([Example(present, ("/m/zzz",))], labels, "m.json")
    check_examples([Example(present, ("/m/b",))], labels, "m.json")


def test_label_csv_round_trip_and_encoding(tmp_path):
    path = write_label_csv(tmp_path / "labels.csv", LABELS + [Label(index=2, mid="/m/c", display_name='Say "hi", ok')])
    labels = LabelSet.from_csv(path)
    assert [lab.display_name for lab in labels.labels][2] == 'Say "hi", ok'
    assert labels.encode(["/m/a", "/m/c"]).tolist() == [1.0, 0.0, 1.0]


def test_folder_per_class_layout(tmp_path):
    for name in ("dog", "cat"):
        (tmp_path / name).mkdir()
        write_wav(tmp_path / name / "1.wav", tone(0.2))
    (tmp_path / "_background_noise_").mkdir()
    write_wav(tmp_path / "_background_noise_" / "n.wav", tone(0.2))
    examples, labels = scan_class_folders(tmp_path)
    assert [lab.mid for lab in labels] == ["cat", "dog"]
    assert sorted(ex.labels[0] for ex in examples) == ["cat", "dog"]


def test_dataset_skips_and_names_a_corrupt_file(tmp_path):
    good = write_wav(tmp_path / "good.wav", tone(1.0))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    dataset = AudioDataset([Example(good, ("/m/a",)), Example(bad, ("/m/b",))], LabelSet(LABELS), FeatureSpec(128))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate)
    (batch,) = list(loader)
    assert batch.fbank.shape == (1, 128, 128) and batch.target.tolist() == [[1.0, 0.0]]
    assert len(batch.failed) == 1 and "bad.wav" in batch.failed[0]


def test_dataset_is_deterministic_per_epoch_and_augments_only_when_asked(tmp_path):
    wav = write_wav(tmp_path / "a.wav", tone(1.0))
    examples = [Example(wav, ("/m/a",)), Example(write_wav(tmp_path / "b.wav", tone(1.0, freq=900)), ("/m/b",))]
    plain = AudioDataset(examples, LabelSet(LABELS), FeatureSpec(128))
    aug = AugmentConfig(freqm=48, timem=48, mixup=1.0, noise=True, noise_scale=11.0, shift=10)
    augmented = AudioDataset(examples, LabelSet(LABELS), FeatureSpec(128), aug, seed=3)
    assert torch.equal(plain[0].fbank, plain[0].fbank)
    first = augmented[0]
    assert torch.equal(first.fbank, augmented[0].fbank)  # same (seed, epoch, index) -> same draw
    assert not torch.equal(first.fbank, plain[0].fbank)
    assert 0 < first.target.sum() <= 2 and first.target[0] > 0  # mixup: lambda on the sample, 1 - lambda on a partner
    augmented.set_epoch(1)
    assert not torch.equal(first.fbank, augmented[0].fbank)


def test_spec_augment_has_torchaudio_semantics():
    fbank = torch.ones(100, 128)
    # width = floor(U * param), start = floor(U * (size - width)); masked cells are 0
    rng = np.random.default_rng(0)
    u1, u2 = np.random.default_rng(0).random(2)
    masked = mask_axis(fbank, 1, 48, rng)
    width = int(u1 * 48)
    start = int(u2 * (128 - width))
    expected = fbank.clone()
    expected[:, start : start + width] = 0
    assert torch.equal(masked, expected)
    assert torch.equal(mask_axis(fbank, 0, 0, rng), fbank)
    for seed in range(50):  # never wider than param - 1
        assert (mask_axis(fbank, 0, 5, np.random.default_rng(seed))[:, 0] == 0).sum() <= 4


def test_mixup_pads_partner_and_removes_means():
    first, second = np.full(10, 2.0, np.float32), np.arange(4, dtype=np.float32)
    mixed = mix_waveforms(first, second, 0.75)
    partner = np.concatenate([second, np.zeros(6)])
    expected = 0.25 * (partner - partner.mean())
    assert np.allclose(mixed, expected - expected.mean(), atol=1e-6)


def test_noise_matches_ast_after_normalisation():
    """Raw-domain noise scaled by 2*std equals AST's U*u/10 added after normalisation."""
    fbank = torch.zeros(20, 8)
    config = AugmentConfig(noise=True, noise_scale=2 * 5.0)
    noisy = augment_fbank(fbank, config, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    cells = rng.random((20, 8), dtype=np.float32)
    u = rng.random()
    assert torch.allclose(noisy / (2 * 5.0), torch.from_numpy(cells) * u / 10, atol=1e-6)


# ---- preparers on tiny fixtures in the official layouts ----


def test_prepare_esc50(tmp_path):
    root = tmp_path / "ESC-50-master"
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in ((0, "dog"), (1, "rooster")):
            name = f"{fold}-100{target}-A-{target}.wav"
            write_wav(root / "audio" / name, tone(0.2))
            rows.append(f"{name},{fold},{target},{category},True,100{target},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    result = prepare.prepare_esc50(root, tmp_path / "out")
    assert result.manifests["fold3_train"] == 8 and result.manifests["fold3_eval"] == 2
    ev = read_manifest(tmp_path / "out" / "fold3_eval.json")
    esc = bundled_labels("esc50")
    assert {e.path.name for e in ev} == {"3-1000-A-0.wav", "3-1001-A-1.wav"}
    assert {e.labels[0] for e in ev} == {esc[0].mid, esc[1].mid}
    assert len(LabelSet.from_csv(tmp_path / "out" / "labels.csv")) == 50


def test_prepare_speechcommands(tmp_path):
    root = tmp_path / "speech_commands_v0.02"
    for word in ("yes", "no"):
        (root / word).mkdir(parents=True)
        for i in range(3):
            write_wav(root / word / f"spk{i}_nohash_0.wav", tone(0.2))
    (root / "_background_noise_").mkdir()
    write_wav(root / "_background_noise_" / "white.wav", tone(0.2))
    (root / "validation_list.txt").write_text("yes/spk1_nohash_0.wav\nno/spk1_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/spk2_nohash_0.wav\n")
    result = prepare.prepare_speechcommands(root, tmp_path / "out")
    assert result.manifests == {"train": 3, "val": 2, "test": 1}
    test = read_manifest(tmp_path / "out" / "test.json")
    yes = next(lab.mid for lab in bundled_labels("speechcommands") if lab.display_name == "yes")
    assert test == [Example(test[0].path, (yes,))] and test[0].path.name == "spk2_nohash_0.wav"


def test_prepare_audioset(tmp_path):
    csv_path = tmp_path / "balanced_train_segments.csv"
    csv_path.write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
        '--ZhevVpy1s, 50.000, 60.000, "/m/012xff"\n'
        '--aE2O5G5WE, 0.000, 10.000, "/m/03fwl,/m/04rlf"\n'
    )
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "--PJHxphWEs.wav", tone(0.2))
    write_wav(audio / "Y--ZhevVpy1s.wav", tone(0.2))
    result = prepare.prepare_audioset(csv_path, audio, tmp_path / "out", "balanced")
    assert result.manifests == {"balanced": 2} and result.missing == ["--aE2O5G5WE"]
    examples = read_manifest(tmp_path / "out" / "balanced.json")
    assert examples[0].labels == ("/m/09x0r", "/t/dd00088") and examples[1].labels == ("/m/012xff",)


def test_prepare_errors_on_wrong_layout(tmp_path):
    with pytest.raises(DataError, match="meta/esc50.csv"):
        prepare.prepare_esc50(tmp_path, tmp_path / "o")
    with pytest.raises(DataError, match="validation_list.txt"):
        prepare.prepare_speechcommands(tmp_path, tmp_path / "o")
    with pytest.raises(DataError, match="segment CSV not found"):
        prepare.prepare_audioset(tmp_path / "x.csv", tmp_path, tmp_path / "o")


def test_prepare_data_cli(tmp_path, capsys):
    from fastast.cli import main

    for name in ("left", "right"):
        (tmp_path / "data" / name).mkdir(parents=True)
        write_wav(tmp_path / "data" / name / "1.wav", tone(0.2))
    assert main(["prepare-data", "folder", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    assert "train 2" in capsys.readouterr().out
    assert Path(tmp_path / "out" / "labels.csv").is_file()
    assert main(["prepare-data", "esc50", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "meta/esc50.csv" in err
