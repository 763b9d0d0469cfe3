"""`fastast train / distill / evaluate` end to end on a tiny generated set (tones), with tiny models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SC_MEAN, SC_STD, make_model_dir, tone, write_wav
from fastast.cli import main
from fastast.model.card import InputSpec, Label, ModelCard
from fastast.model.store import load_model, sha256_file
from fastast.training.data import Example, write_label_csv, write_manifest
from fastast.training.evaluate import average_precision
from fastast.training.loop import TrainConfig, Trainer, make_optimizer
from fastast.training.plot import MIN_METRIC_SPAN, metric_limits

FREQS = {"/m/low": 300.0, "/m/mid": 1000.0, "/m/high": 3000.0}
TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--target-length", "64", "--fstride", "16", "--tstride", "16"]
NO_AUG = ["--freqm", "0", "--timem", "0"]


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    """Three classes of noisy tones (0.6 s): train 24, val 9; manifests with relative paths, labels.csv."""
    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 9)):
        examples = []
        for i in range(count):
            mid = list(FREQS)[i % 3]
            wave = tone(0.6, freq=FREQS[mid] * (1 + 0.05 * rng.standard_normal()))
            wave = wave + 0.05 * rng.standard_normal(len(wave)).astype(np.float32)
            examples.append(Example(write_wav(root / f"{split}{i}.wav", wave), (mid,)))
        write_manifest(root / f"{split}.json", examples)
    write_label_csv(root / "labels.csv", [Label(index=i, mid=m, display_name=m[3:]) for i, m in enumerate(FREQS)])
    return root


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--train", str(data / "train.json"), "--val", str(data / "val.json"), "--labels", str(data / "labels.csv"),
            *TINY, "--out", str(out), "--workers", "0", "--batch-size", "8", "--threads", "1", *extra]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_servable_model(tones, tmp_path):
    out = tmp_path / "m"
    assert main(["train", *_args(tones, out, "--epochs", "6", "--lr", "3e-3", "--warmup-steps", "3", *NO_AUG)]) == 0
    log = _log(out)
    assert [row["epoch"] for row in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert max(row["val_metric"] for row in log) > 1 / 3  # better than chance on held-out tones
    model = load_model(out)
    card = model.card
    assert card.task == "single-label" and [lab.mid for lab in card.labels] == list(FREQS)
    assert card.arch["dim"] == 32 and card.input.target_length == 64
    assert card.provenance["command"].startswith("fastast train ") and card.provenance["best_epoch"] >= 1
    assert "--lr 0.003" in card.provenance["command"] and "--freqm 0" in card.provenance["command"]
    assert card.provenance["data"]["train_examples"] == 24
    assert card.input.std > 0  # measured on the training files
    assert card.weights_sha256 == sha256_file(out / "model.safetensors")
    assert (out / "checkpoint" / "optimizer.safetensors").is_file()


def test_resume_continues_from_the_saved_step(tones, tmp_path):
    out = tmp_path / "m"
    base = _args(tones, out, "--lr", "1e-3", "--mean", str(SC_MEAN), "--std", str(SC_STD))
    assert main(["train", *base, "--epochs", "1"]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 3  # 24 samples / batch 8
    assert main(["train", *base, "--epochs", "3", "--resume"]) == 0
    log = _log(out)
    assert [(row["epoch"], row["step"]) for row in log] == [(1, 3), (2, 6), (3, 9)]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 9


def test_resume_restores_weights_and_optimizer(tones, tmp_path):
    from fastast.training.checkpoint import load_checkpoint

    out = tmp_path / "m"
    assert main(["train", *_args(tones, out, "--epochs", "1", "--mean", "-6", "--std", "5")]) == 0
    config = TrainConfig(train=tones / "train.json", val=tones / "val.json", labels=tones / "labels.csv",
                         out=out, dim=32, depth=2, heads=2, target_length=64, fstride=16, tstride=16)
    trainer = Trainer(config)
    optimizer = make_optimizer(trainer.network, config)
    state = load_checkpoint(out / "checkpoint", trainer.network, optimizer)
    assert state["step"] == 3
    saved = load_model(out).net.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in trainer.network.state_dict().items())
    assert all(int(s["step"]) == 3 for s in optimizer.state.values())


def test_the_seed_fixes_the_initial_weights(tones, tmp_path):
    """--seed makes a run from scratch repeatable: the network is built from it, not from whatever state torch's
    default generator is in (torch seeds it differently in every process)."""
    config = TrainConfig(train=tones / "train.json", val=tones / "val.json", labels=tones / "labels.csv",
                         out=tmp_path / "m", dim=32, depth=2, heads=2, target_length=64, fstride=16, tstride=16, seed=3)
    weights = []
    for state in (1, 2):
        torch.manual_seed(state)
        weights.append(Trainer(config).network.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = Trainer(replace(config, seed=4)).network.state_dict()
    assert not torch.equal(weights[0]["pos_embed"], other["pos_embed"])


def test_train_with_tome_active(tones, tmp_path):
    out = tmp_path / "m"
    assert main(["train", *_args(tones, out, "--epochs", "1", "--r-train", "4", "--mean", "-6", "--std", "5")]) == 0
    assert load_model(out).card.provenance["training"]["r_train"] == 4


def test_teacher_gets_no_gradient_and_sees_the_students_augmented_input(tones, tmp_path):
    teacher_dir = make_model_dir(tmp_path / "teacher", dim=32, depth=1, heads=2, target_length=64)
    card = ModelCard.load(teacher_dir / "card.json")
    labels = [Label(index=i, mid=m, display_name=m) for i, m in enumerate(FREQS)]
    card = card.model_copy(update={"labels": labels, "input": card.input.model_copy(update={"mean": -3.0, "std": 2.0})})
    from fastast.model.store import build_network, save_model

    save_model(teacher_dir, build_network(card), card)
    config = TrainConfig(train=tones / "train.json", val=tones / "val.json", labels=tones / "labels.csv",
                         out=tmp_path / "s", dim=32, depth=2, heads=2, target_length=64, fstride=16, tstride=16,
                         teacher=teacher_dir, lam=0.1, tau=2.0)
    trainer = Trainer(config)
    from fastast.training.augment import AugmentConfig
    from fastast.training.data import AudioDataset, FeatureSpec, collate
    from fastast.training.loop import normalizer

    dataset = AudioDataset(trainer.train_examples, trainer.labels, FeatureSpec(64),
                           AugmentConfig(freqm=24, timem=12, mixup=1.0, noise=True, shift=5), seed=1)
    batch = collate([dataset[i] for i in range(4)])
    seen = {}
    trainer.network.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0]))
    trainer.teacher.net.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0]))
    student_spec = ModelCard.load(teacher_dir / "card.json").input.model_copy(update={"mean": SC_MEAN, "std": SC_STD})
    loss = trainer.loss(batch, normalizer(student_spec, trainer.device), normalizer(trainer.teacher.card.input, trainer.device))
    loss.backward()
    # both models got the same augmented fbank, each normalised with its own statistics
    assert torch.allclose(seen["student"] * 2 * SC_STD + SC_MEAN, batch.fbank, atol=1e-4)
    assert torch.allclose(seen["teacher"] * 2 * 2.0 - 3.0, batch.fbank, atol=1e-4)
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.network.parameters())
    assert not trainer.teacher.training


def test_distill_end_to_end(tones, tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", *_args(tones, teacher, "--epochs", "1", "--mean", "-6", "--std", "5")]) == 0
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--lambda", "0.1", "--tau", "1.0",
                 *_args(tones, out, "--epochs", "1", "--mean", "-6", "--std", "5")]) == 0
    card = load_model(out).card
    assert card.provenance["source"] == "fastast distill"
    assert card.provenance["teacher"]["lambda"] == 0.1


def test_efficientnet_teacher_outputs_logits_and_round_trips_the_store(tmp_path):
    from fastast.model.store import save_model
    from fastast.training.teacher import EfficientNetTeacher, teacher_arch

    torch.manual_seed(0)
    net = EfficientNetTeacher(num_classes=3).eval()
    card = ModelCard(name="t", arch=teacher_arch(64), input=InputSpec(target_length=64),
                     labels=[Label(index=i, mid=m, display_name=m) for i, m in enumerate(FREQS)], task="single-label")
    save_model(tmp_path / "t", net, card)
    model = load_model(tmp_path / "t")
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3) and torch.allclose(logits, net(x))
        # the head outputs logits, not probabilities: constant per-frame logits b give exactly b
        for cla in net.pool.cla:
            cla.weight.zero_()
            cla.bias.fill_(5.0)
        assert torch.allclose(net(x), torch.full((2, 3), 5.0), atol=1e-5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a, d: a.__setitem__(a.index("--train") + 1, str(d / "missing.json")), "manifest not found"),
        (lambda a, d: a.__setitem__(a.index("--arch") + 1, "resnet"), "unknown arch 'resnet'"),
        (lambda a, d: a.__setitem__(a.index("--labels") + 1, str(d / "nolabels.csv")), "label file not found"),
        (lambda a, d: a.extend(["--mean", "0", "--std", "0"]), "input spec (--mean/--std, or as measured on --train): std"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tones, tmp_path, capsys, mutate, message):
    args = ["train", *_args(tones, tmp_path / "m", "--arch", "tiny", "--epochs", "1")]
    mutate(args, tones)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not (tmp_path / "m" / "train_log.jsonl").exists()


def test_bad_data_files_are_refused_before_training(tones, tmp_path, capsys):
    write_manifest(tmp_path / "missing_wav.json", [Example(tmp_path / "gone.wav", ("/m/low",))])
    write_manifest(tmp_path / "unknown_label.json", [Example(tones / "train0.wav", ("/m/nope",))])
    (tmp_path / "empty.json").write_text('{"data": []}')
    for manifest, message in (("missing_wav.json", "audio file not found"), ("unknown_label.json", "/m/nope"),
                              ("empty.json", "empty")):
        args = _args(tones, tmp_path / "m", "--epochs", "1")
        args[args.index("--train") + 1] = str(tmp_path / manifest)
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err


def test_teacher_with_other_labels_is_refused(tones, tmp_path, capsys):
    teacher = make_model_dir(tmp_path / "teacher", dim=32, depth=1, heads=2, target_length=64)  # 35 SC labels
    args = ["distill", "--teacher", str(teacher), *_args(tones, tmp_path / "s", "--epochs", "1")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different label set" in err


def test_a_corrupt_file_in_the_manifest_is_skipped_and_reported(tones, tmp_path, capsys):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF0000WAVEfmt definitely not audio")
    rows = json.loads((tones / "train.json").read_text())["data"]
    examples = [Example(tones / r["wav"], (r["labels"],)) for r in rows] + [Example(bad, ("/m/low",))]
    write_manifest(tmp_path / "train.json", examples)
    args = _args(tones, tmp_path / "m", "--epochs", "1", "--mean", "-6", "--std", "5", *NO_AUG)
    args[args.index("--train") + 1] = str(tmp_path / "train.json")
    args[args.index("--workers") + 1] = "1"  # decoding happens in a worker process
    assert main(["train", *args]) == 0
    captured = capsys.readouterr()
    assert "skipped undecodable file" in captured.err and "corrupt.wav" in captured.err
    assert _log(tmp_path / "m")[0]["skipped"] == 1


def _without_strides(args: list[str]) -> list[str]:
    for flag in ("--fstride", "--tstride"):
        at = args.index(flag)
        args = args[:at] + args[at + 2:]
    return args


def test_fine_tune_from_init_resizes_pos_embed_and_replaces_head(tones, tmp_path):
    init = make_model_dir(tmp_path / "init", dim=32, depth=2, heads=2, target_length=128, fstride=16, tstride=16)
    out = tmp_path / "ft"
    args = _without_strides(_args(tones, out, "--epochs", "1", "--init", str(init), "--mean", "-6", "--std", "5"))
    assert main(["train", *args]) == 0
    card = load_model(out).card
    assert card.provenance["pos_embed"] == "(8, 8) -> (8, 4)" and "replaced" in card.provenance["head"]
    # Without --fstride/--tstride the strides are the init model's (16, not the CLI's 10), and the card records
    # none of the options the init model supplied.
    assert (card.arch["fstride"], card.arch["tstride"]) == (16, 16)
    assert "--fstride" not in card.provenance["command"] and "--tstride" not in card.provenance["command"]
    assert not {"dim", "depth", "heads", "fstride", "tstride"} & set(card.provenance["training"])


def test_fine_tune_from_init_on_a_finer_patch_grid(tones, tmp_path):
    """AST's fine-tuning choice: the init model's weights on overlapping patches (a new stride), position
    embeddings interpolated to the new grid; the width stays the init model's whatever --dim says."""
    init = make_model_dir(tmp_path / "init", dim=32, depth=2, heads=2, target_length=64, fstride=16, tstride=16)
    out = tmp_path / "ft"
    args = _without_strides(_args(tones, out, "--epochs", "1", "--init", str(init), "--mean", "-6", "--std", "5"))
    assert main(["train", *args, "--tstride", "8", "--dim", "64"]) == 0
    model = load_model(out)
    assert model.net.config.grid == (8, 7) and model.card.provenance["pos_embed"] == "(8, 4) -> (8, 7)"
    assert (model.card.arch["fstride"], model.card.arch["tstride"], model.card.arch["dim"]) == (16, 8, 32)
    assert "--tstride 8" in model.card.provenance["command"] and "--fstride" not in model.card.provenance["command"]
    assert model.card.provenance["training"]["tstride"] == 8 and "fstride" not in model.card.provenance["training"]


def test_resize_pos_embed_cut_and_interpolate():
    from fastast.training.init import resize_pos_embed

    grid = torch.arange(2 * 6, dtype=torch.float32).view(1, 1, 2, 6)  # [1, D=1, F=2, T=6]
    pos = torch.cat([torch.tensor([[[-1.0], [-2.0]]]), grid.flatten(2).transpose(1, 2)], dim=1)
    cut = resize_pos_embed(pos, (2, 6), (2, 2))
    assert cut[0, :2, 0].tolist() == [-1.0, -2.0]
    assert cut[0, 2:, 0].tolist() == [2.0, 3.0, 8.0, 9.0]  # centred: columns 6//2 - 2//2 = 2 and 3
    grown = resize_pos_embed(pos, (2, 6), (2, 12))
    assert grown.shape == (1, 2 + 24, 1)
    expected = torch.nn.functional.interpolate(grid, size=(2, 12), mode="bilinear")
    assert torch.equal(grown[0, 2:, 0], expected.flatten())


def test_evaluate_table_matches_hand_computation(tones, tmp_path, capsys):
    from fastast.audio import load_audio

    model_dir = make_model_dir(tmp_path / "m", dim=32, depth=2, heads=2, target_length=64, fstride=16, tstride=16)
    card = ModelCard.load(model_dir / "card.json")
    labels = [Label(index=i, mid=m, display_name=m) for i, m in enumerate(FREQS)]
    from fastast.model.store import build_network, save_model

    torch.manual_seed(3)
    save_model(model_dir, build_network(card.model_copy(update={"labels": labels})), card.model_copy(update={"labels": labels}))
    model = load_model(model_dir)
    examples = [Example(tones / f"val{i}.wav", (list(FREQS)[i % 3],)) for i in range(9)]
    truth = torch.tensor([i % 3 for i in range(9)])
    waves = np.stack([load_audio(e.path) for e in examples])
    with torch.no_grad():
        features = model.featurize(waves, 16000)
        expected = {r: (model(features, r).argmax(-1) == truth).float().mean().item() for r in (0, 4, 8)}
    assert main(["evaluate", "--model", str(model_dir), "--data", str(tones / "val.json"), "--r", "0,4,8",
                 "--json", "--workers", "0", "--batch-size", "4", "--write-card", "--variant", "Inf",
                 "--plot", str(tmp_path / "r.png")]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["r"] for row in rows] == [0, 4, 8]
    for row in rows:
        assert row["metric"] == "accuracy" and row["value"] == pytest.approx(expected[row["r"]], abs=1e-6)
        assert row["drop"] == pytest.approx(expected[0] - expected[row["r"]], abs=1e-6)
        assert row["samples_per_s"] > 0
    written = load_model(model_dir)  # sha still matches: the weights were not touched
    assert [row.r for row in written.card.r_table] == [0, 4, 8] and written.card.r_table[0].variant == "Inf"
    points = [(row.value, row.samples_per_s) for row in written.card.r_table]
    for row, point in zip(written.card.r_table, points):  # each row is marked: dominated by another row or not
        dominated = any(v >= point[0] and s >= point[1] and (v, s) != point for v, s in points)
        assert row.pareto is (not dominated)
    assert (tmp_path / "r.png").stat().st_size > 0
    # a sibling's rows (e.g. Train+Inf weights) go into this card, naming the weights they were measured on
    sibling = tmp_path / "m2"
    save_model(sibling, build_network(written.card), written.card.model_copy(update={"name": "m2", "r_table": []}))
    assert main(["evaluate", "--model", str(sibling), "--data", str(tones / "val.json"), "--r", "0,4",
                 "--workers", "0", "--write-card", "--card", str(model_dir), "--variant", "Train+Inf"]) == 0
    table = load_model(model_dir).card.r_table
    assert [(row.variant, row.r) for row in table] == [("Inf", 0), ("Inf", 4), ("Inf", 8), ("Train+Inf", 0), ("Train+Inf", 4)]
    assert table[-1].model_extra["model"] == "m2" and "model" not in table[0].model_extra


def test_the_plot_keeps_a_flat_accuracy_line_flat():
    # Half a point between r=0 and r=48 (the ESC-10 cross-validation): a tight axis would draw it as a cliff.
    low, high = metric_limits([0.595, 0.5925, 0.59])
    assert high - low >= MIN_METRIC_SPAN and low < 0.59 and high > 0.595
    assert (low + high) / 2 == pytest.approx(0.5925)
    low, high = metric_limits([0.24, 0.81])  # a real trade-off keeps its own range, with a little room
    assert (low, high) == pytest.approx((0.23, 0.82))


def test_evaluate_map_for_multi_label(tones, tmp_path, capsys):
    from fastast.audio import load_audio

    labels = [Label(index=i, mid=m, display_name=m) for i, m in enumerate(FREQS)]
    model_dir = make_model_dir(tmp_path / "m", task="multi-label", dim=32, depth=1, heads=2, target_length=64)
    card = ModelCard.load(model_dir / "card.json").model_copy(update={"labels": labels})
    from fastast.model.store import build_network, save_model

    torch.manual_seed(5)
    save_model(model_dir, build_network(card), card)
    model = load_model(model_dir)
    rows = json.loads((tones / "val.json").read_text())["data"]
    waves = np.stack([load_audio(tones / r["wav"]) for r in rows])
    with torch.no_grad():
        scores = model(model.featurize(waves, 16000)).sigmoid()
    truth = torch.tensor([[1.0 if r["labels"] == m else 0.0 for m in FREQS] for r in rows])

    def brute_ap(s: torch.Tensor, y: torch.Tensor) -> float:
        """Precision at the rank of each positive (no ties in random float scores)."""
        order = s.argsort(descending=True)
        hits = y[order].cumsum(0)
        return float(sum(hits[k] / (k + 1) for k in range(len(s)) if y[order][k] > 0) / y.sum())

    expected = sum(brute_ap(scores[:, c], truth[:, c]) for c in range(3)) / 3
    assert brute_ap(scores[:, 0], truth[:, 0]) == pytest.approx(average_precision(scores[:, 0], truth[:, 0]))
    assert main(["evaluate", "--model", str(model_dir), "--data", str(tones / "val.json"), "--r", "0",
                 "--json", "--workers", "0"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["metric"] == "mAP" and row["value"] == pytest.approx(expected, abs=1e-5)


def test_learning_rate_warmup_then_cosine_or_step():
    from fastast.training.loop import learning_rate

    config = TrainConfig(train=Path("t"), val=Path("v"), labels=Path("l"), out=Path("o"), lr=1e-3)
    assert learning_rate(config, 0, 0, 100, 10) == pytest.approx(1e-4)  # linear warm-up
    assert learning_rate(config, 9, 0, 100, 10) == pytest.approx(1e-3)
    assert learning_rate(config, 55, 0, 100, 10) == pytest.approx(0.5e-3)  # half-way down the cosine
    assert learning_rate(config, 100, 0, 100, 10) == pytest.approx(0.0)
    step = TrainConfig(train=Path("t"), val=Path("v"), labels=Path("l"), out=Path("o"), lr=1e-3,
                       schedule="step", step_start=5, gamma=0.5)
    assert [learning_rate(step, 50, e, 100, 0) for e in (4, 5, 6)] == pytest.approx([1e-3, 0.5e-3, 0.25e-3])
