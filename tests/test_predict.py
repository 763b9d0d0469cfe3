"""`fastast predict` on real audio (espeak-ng speech, a tone) with the conftest tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone, write_wav

from fastast.audio import load_audio, window_samples
from fastast.cli import main
from fastast.model import load_model

FASTAST = Path(sys.executable).parent / "fastast"


@pytest.fixture(scope="module")
def tone_wav(tmp_path_factory) -> Path:
    """A stereo 44.1 kHz tone: exercises the mono mix and the resampler too."""
    return write_wav(tmp_path_factory.mktemp("tone") / "tone.wav", tone(1.5, 44100, channels=2), 44100)


def predict_json(capsys, *argv: str) -> dict:
    assert main(["predict", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_table_lists_top_k_labels(tiny_model_dir, speech_wav, tone_wav, capsys):
    assert main(["predict", "--model", str(tiny_model_dir), "--top-k", "3", str(speech_wav), str(tone_wav)]) == 0
    out = capsys.readouterr().out
    names = {label.display_name for label in load_model(tiny_model_dir).card.labels}
    for wav in (speech_wav, tone_wav):
        section = out.split(str(wav), 1)[1].splitlines()[1:4]
        assert [line.split()[0] for line in section] == ["1", "2", "3"]
        assert all(line.split()[1] in names and 0 <= float(line.split()[2]) <= 1 for line in section)


def model_scores(model, waves: list[np.ndarray]) -> torch.Tensor:
    """The model's scores [len(waves), classes], each wave featurized alone."""
    rate = model.card.input.sample_rate
    with torch.no_grad():
        return model.scores(model(torch.cat([model.featurize(wave, rate) for wave in waves])))


def test_json_scores_match_the_model(tiny_model_dir, speech_wav, tone_wav, capsys):
    """Both files are longer than the model's 1.295 s window: their scores are the mean over half-hop windows."""
    doc = predict_json(capsys, "--model", str(tiny_model_dir), "--top-k", "100", str(speech_wav), str(tone_wav))
    assert doc["task"] == "single-label" and doc["r"] == 0
    assert [result["file"] for result in doc["results"]] == [str(speech_wav), str(tone_wav)]
    model = load_model(tiny_model_dir)
    spec = model.card.input
    window = window_samples(spec.target_length, spec.sample_rate)
    for result in doc["results"]:
        scores = [entry["score"] for entry in result["top"]]
        assert len(scores) == model.card.num_classes  # top-k clamps to the label count
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)  # softmax over all labels
        wave = load_audio(result["file"], spec.sample_rate)
        starts = range(0, len(wave) - window // 2, window // 2)  # half-window hop, until a window reaches the end
        assert result["windows"] == len(starts) > 1 and "timeline" not in result
        expected = model_scores(model, [wave[start : start + window] for start in starts]).mean(dim=0)
        top = result["top"][0]
        assert top["index"] == int(expected.argmax())
        assert top["score"] == pytest.approx(float(expected.max()), abs=1e-6)
        assert top["label"] == model.card.labels[top["index"]].display_name


def test_audio_within_one_window_is_one_window(tiny_model_dir, tmp_path, capsys):
    """A clip no longer than the window gets exactly what the model gives it alone, as before windows existed."""
    model = load_model(tiny_model_dir)
    spec = model.card.input
    wave = tone(window_samples(spec.target_length, spec.sample_rate) / spec.sample_rate)
    path = write_wav(tmp_path / "one-window.wav", wave)
    doc = predict_json(capsys, "--model", str(tiny_model_dir), "--top-k", "3", "--timeline", str(path))
    [result] = doc["results"]
    expected = model_scores(model, [load_audio(path, spec.sample_rate)])[0]
    assert result["windows"] == 1
    assert [entry["index"] for entry in result["top"]] == expected.topk(3).indices.tolist()
    assert [entry["score"] for entry in result["top"]] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-6)
    assert result["timeline"] == [{"start_s": 0.0, "end_s": result["seconds"], "labels": result["top"]}]


def scores_by_label(doc: dict) -> dict[str, float]:
    return {entry["label"]: entry["score"] for entry in doc["results"][0]["top"]}


@pytest.mark.parametrize("r", ["8", "4,0,2,100"])
def test_r_is_applied(tiny_model_dir, speech_wav, capsys, r):
    base = predict_json(capsys, "--model", str(tiny_model_dir), "--top-k", "35", str(speech_wav))
    merged = predict_json(capsys, "--model", str(tiny_model_dir), "--top-k", "35", "--r", r, str(speech_wav))
    assert merged["r"] == (int(r) if "," not in r else [int(x) for x in r.split(",")])
    base_scores, merged_scores = scores_by_label(base), scores_by_label(merged)
    assert max(abs(base_scores[k] - merged_scores[k]) for k in base_scores) > 1e-6


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fastast predict: error: ") and "\n" not in err, err
    assert captured.out == ""
    return err


def test_bad_audio_file(tiny_model_dir, speech_wav, tmp_path, capsys):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    err = one_line_error(capsys, ["predict", "--model", str(tiny_model_dir), str(speech_wav), str(bad)])
    assert str(bad) in err and "cannot decode" in err
    missing = tmp_path / "missing.wav"
    assert str(missing) in one_line_error(capsys, ["predict", "--model", str(tiny_model_dir), str(missing)])


def test_bad_r(tiny_model_dir, speech_wav, capsys):
    base = ["predict", "--model", str(tiny_model_dir), str(speech_wav)]
    assert "r must be >= 0" in one_line_error(capsys, [*base, "--r", "-1"])
    assert "needs 4 entries" in one_line_error(capsys, [*base, "--r", "4,4"])
    assert "comma-separated" in one_line_error(capsys, [*base, "--r", "fast"])


def test_bad_window_options(tiny_model_dir, speech_wav, capsys):
    base = ["predict", "--model", str(tiny_model_dir), str(speech_wav)]
    for hop in ("0", "-0.5", "1.3", "nan"):
        assert "hop must be above 0 s and at most the model's window (1.295 s)" in one_line_error(
            capsys, [*base, "--hop-s", hop]
        )
    assert "aggregate must be one of mean, max, got 'median'" in one_line_error(capsys, [*base, "--aggregate", "median"])
    assert "single-label models use the mean" in one_line_error(capsys, [*base, "--aggregate", "max"])


def test_table_timeline(tiny_model_dir, speech_wav, capsys):
    assert main(["predict", "--model", str(tiny_model_dir), "--top-k", "2", "--timeline", str(speech_wav)]) == 0
    out = capsys.readouterr().out
    header = out.split(str(speech_wav), 1)[1].splitlines()[0]
    windows = int(header.split(", ")[1].split()[0])
    lines = out.split("timeline (s)\n", 1)[1].splitlines()
    assert len(lines) == windows > 1
    spans = [line.split()[0] for line in lines]
    assert spans[0] == "0.000-1.295" and spans[1].startswith("0.64")
    assert all(line.count(",") == 1 for line in lines)  # two labels per window


def test_console_script_exit_code(tiny_model_dir, speech_wav, tmp_path):
    """The installed `fastast` script turns the error into exit status 2 and one line on stderr."""
    bad = subprocess.run(
        [str(FASTAST), "predict", "--model", str(tmp_path / "no-model"), str(speech_wav)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stdout == "" and bad.stderr.strip().count("\n") == 0 and "model folder not found" in bad.stderr
