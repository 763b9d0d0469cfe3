"""Cards that cannot serve are refused when they are read, and weights load only when their sha256 is checked.

A card with std 0, a NaN mean, a sample rate of 0 or an input the network was not built for used to load and then
answer null scores, fail every request with a 400 blaming the client, or leave a server up at 503 forever; a card
without weights_sha256 loaded tampered weights silently. Every command that loads a model now stops with one line
and exit status 2 instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model_dir
from serverutil import start_server

from fastast.cli import main
from fastast.errors import CheckpointError, IntegrityError
from fastast.model import load_model
from fastast.model.card import ModelCard
from fastast.model.store import CARD, WEIGHTS, sha256_file


def edited(source: Path, directory: Path, edit) -> Path:
    """A copy of the model folder `source` whose card.json (as a dict) went through `edit`."""
    shutil.copytree(source, directory)
    card = json.loads((directory / CARD).read_text())
    edit(card)
    (directory / CARD).write_text(json.dumps(card))  # json writes NaN and Infinity, as a careless tool would
    return directory


def set_in(section: str | None, **values):
    return lambda card: (card[section] if section else card).update(values)


BAD_CARDS = {
    "std 0": (set_in("input", std=0), "input.std: Input should be greater than 0"),
    "negative std": (set_in("input", std=-1.0), "input.std: Input should be greater than 0"),
    "NaN mean": (set_in("input", mean=float("nan")), "input.mean: Input should be a finite number"),
    "infinite std": (set_in("input", std=float("inf")), "input.std: Input should be a finite number"),
    "sample rate 0": (set_in("input", sample_rate=0), "input.sample_rate: Input should be greater than or equal to 8"),
    "sample rate 384 kHz": (set_in("input", sample_rate=384000), "input.sample_rate: Input should be less than or"),
    "target length off": (
        set_in("input", target_length=100),
        "input.target_length is 100, but the ast network was built for 128 (arch.target_length)",
    ),
    "mel bins off": (
        set_in("input", num_mel_bins=64),
        "input.num_mel_bins is 64, but the ast network was built for 128 (arch.num_mel_bins)",
    ),
    "input smaller than a patch": (
        lambda card: (card["arch"].update(target_length=8), card["input"].update(target_length=8)),
        "an input of 8 frames x 128 mel bins is smaller than one 16 x 16 patch",
    ),
    "heads do not divide dim": (set_in("arch", heads=5), "arch.dim 64 is not a multiple of arch.heads 5"),
    "size not an integer": (set_in("arch", depth="four"), "arch sizes must be positive integers, got depth 'four'"),
    "unknown arch field": (set_in("arch", wings=2), "arch does not describe an AST"),
    "malformed sha256": (set_in(None, weights_sha256="abc123"), "weights_sha256: String should match pattern"),
}


@pytest.mark.parametrize("case", BAD_CARDS)
def test_a_card_that_cannot_serve_is_refused_when_read(tiny_model_dir, tmp_path, case):
    edit, message = BAD_CARDS[case]
    folder = edited(tiny_model_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as refused:
        ModelCard.load(folder / CARD)
    assert str(refused.value).startswith(f"invalid {folder / CARD}: ") and message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_an_unreadable_card_is_one_line_too(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    card = folder / CARD
    card.write_bytes(b'{"name": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(CheckpointError, match=r"card\.json is not UTF-8 text \(byte 13: invalid continuation byte\)"):
        ModelCard.load(card)
    card.write_text('{"name": ')
    with pytest.raises(CheckpointError, match="Invalid JSON"):
        ModelCard.load(card)
    card.unlink()
    card.mkdir()
    with pytest.raises(CheckpointError, match=r"cannot read .*card\.json: Is a directory"):
        ModelCard.load(card)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastast {argv[0]}: error: ") and "\n" not in err, err
    return err


def commands_loading(model: Path, tmp_path: Path, wav: Path) -> dict[str, list[str]]:
    """Every command that loads a model_store model, pointed at `model`."""
    return {
        "predict": ["predict", "--model", str(model), str(wav)],
        "bench": ["bench", "--model", str(model), "--r", "0", "--batch-size", "1", "--warmup", "0", "--runs", "1"],
        "evaluate": ["evaluate", "--model", str(model), "--data", str(tmp_path / "manifest.json"), "--r", "0"],
        "export-onnx": ["export-onnx", "--model", str(model), "--r", "0", "--out", str(tmp_path / "onnx")],
    }


@pytest.mark.parametrize("command", ["predict", "bench", "evaluate", "export-onnx"])
def test_every_command_that_loads_a_model_refuses_a_bad_card_on_one_line(
    tiny_model_dir, tmp_path, speech_wav, capsys, command
):
    folder = edited(tiny_model_dir, tmp_path / "std0", set_in("input", std=0))
    err = one_line_error(capsys, commands_loading(folder, tmp_path, speech_wav)[command])
    assert "input.std: Input should be greater than 0" in err


def run_serve(model: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FASTAST_")}
    command = [sys.executable, "-m", "fastast", "serve", "--model", str(model), "--port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_serve_exits_2_on_a_card_with_std_0_instead_of_serving_null_scores(tiny_model_dir, tmp_path):
    done = run_serve(edited(tiny_model_dir, tmp_path / "std0", set_in("input", std=0)))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("fastast serve: error: invalid ") and "\n" not in done.stderr.strip()
    assert "input.std: Input should be greater than 0" in done.stderr


# ---- the weights' sha256 ------------------------------------------------------------------------------------------


def unverifiable(tiny_model_dir: Path, directory: Path, hash_value: str | None) -> Path:
    """The tiny model with one byte of its weights flipped and the card's sha256 removed (None) or emptied."""
    folder = edited(
        tiny_model_dir,
        directory,
        (lambda card: card.pop("weights_sha256")) if hash_value is None else set_in(None, weights_sha256=hash_value),
    )
    weights = folder / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize("hash_value", [None, ""], ids=["absent", "empty"])
def test_weights_without_a_sha256_are_refused(tiny_model_dir, tmp_path, hash_value):
    folder = unverifiable(tiny_model_dir, tmp_path / "m", hash_value)
    with pytest.raises(IntegrityError, match=r"has no weights_sha256, so .* cannot be verified.*--allow-unverified"):
        load_model(folder)


def test_allow_unverified_loads_them_with_a_warning(tiny_model_dir, tmp_path, caplog):
    folder = unverifiable(tiny_model_dir, tmp_path / "m", None)
    with caplog.at_level(logging.WARNING, logger="fastast.model.store"):
        model = load_model(folder, allow_unverified=True)
    assert model.card.weights_sha256 == ""
    assert "unverified" in caplog.text and str(folder / WEIGHTS) in caplog.text


def test_serve_refuses_a_card_without_sha256_unless_allowed(tiny_model_dir, tmp_path):
    folder = unverifiable(tiny_model_dir, tmp_path / "m", None)
    done = run_serve(folder)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("fastast serve: error: ") and "\n" not in err and "has no weights_sha256" in err
    with start_server(folder, "--allow-unverified") as server:  # starts, and says what it skipped
        assert "loading" in server.log() and "unverified" in server.log()


def test_predict_refuses_a_card_without_sha256_unless_allowed(tiny_model_dir, tmp_path, speech_wav, capsys, caplog):
    folder = unverifiable(tiny_model_dir, tmp_path / "m", "")
    assert "has no weights_sha256" in one_line_error(capsys, ["predict", "--model", str(folder), str(speech_wav)])
    with caplog.at_level(logging.WARNING, logger="fastast.model.store"):
        assert main(["predict", "--allow-unverified", "--model", str(folder), str(speech_wav)]) == 0
    assert "unverified" in caplog.text


def test_saved_models_carry_the_sha256_of_their_weights(tmp_path):
    """save_model is how import, train and distill write a model folder."""
    folder = make_model_dir(tmp_path / "saved")
    assert ModelCard.load(folder / CARD).weights_sha256 == sha256_file(folder / WEIGHTS)
