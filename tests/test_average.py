"""`fastast average`: the mean of several runs' weights as one servable model, or a one-line refusal."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model_dir
from safetensors.torch import load_file

from fastast.cli import main
from fastast.model import load_model


@pytest.fixture
def runs(tmp_path):
    return [make_model_dir(tmp_path / f"run{seed}", seed=seed) for seed in (1, 2, 3)]


def test_every_tensor_is_the_mean_of_the_runs_and_the_model_loads_verified(tmp_path, runs, capsys):
    assert main(["average", *map(str, runs), "--out", str(tmp_path / "soup"), "--name", "soup"]) == 0
    assert "averaged 3 models" in capsys.readouterr().out
    states = [load_file(str(run / "model.safetensors")) for run in runs]
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert soup.keys() == states[0].keys()
    for key, tensor in soup.items():
        expected = sum(state[key].double() for state in states) / 3
        torch.testing.assert_close(tensor, expected.float(), rtol=0, atol=1e-7)
    assert not torch.equal(soup["head.weight"], states[0]["head.weight"])
    model = load_model(tmp_path / "soup")  # checks the sha256 the card records
    card = json.loads((tmp_path / "soup" / "card.json").read_text())
    assert card["name"] == "soup" and card["r_table"] == []
    assert card["provenance"]["source"] == "fastast average"
    assert [m["model"] for m in card["provenance"]["models"]] == list(map(str, runs))
    assert [m["weights_sha256"] for m in card["provenance"]["models"]] == [
        json.loads((run / "card.json").read_text())["weights_sha256"] for run in runs]
    with torch.no_grad():
        scores = model.scores(model(model.featurize(torch.randn(2, 16000).numpy(), 16000), r=4))
    assert scores.shape == (2, 35) and torch.allclose(scores.sum(dim=-1), torch.ones(2))


def test_a_model_with_a_different_architecture_is_refused_in_one_line(tmp_path, runs, capsys):
    other = make_model_dir(tmp_path / "deeper", seed=4, depth=5)
    assert main(["average", str(runs[0]), str(other), "--out", str(tmp_path / "soup")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastast average: error: {other} and {runs[0]} differ in their cards' arch: cannot average"
    assert not (tmp_path / "soup").exists()


def test_one_model_is_not_an_average(tmp_path, runs, capsys):
    assert main(["average", str(runs[0]), "--out", str(tmp_path / "soup")]) == 2
    assert capsys.readouterr().err.strip() == "fastast average: error: averaging needs at least two models, got 1"


def test_a_model_already_in_out_is_kept_unless_forced(tmp_path, runs, capsys):
    before = (runs[2] / "model.safetensors").read_bytes()
    assert main(["average", str(runs[0]), str(runs[1]), "--out", str(runs[2])]) == 2
    assert "already holds a model; use --force" in capsys.readouterr().err
    assert (runs[2] / "model.safetensors").read_bytes() == before
    assert main(["average", str(runs[0]), str(runs[1]), "--out", str(runs[2]), "--force"]) == 0
    assert (runs[2] / "model.safetensors").read_bytes() != before
