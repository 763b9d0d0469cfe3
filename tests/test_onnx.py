"""ONNX export (one graph per r, ToMe inside) and the ONNX Runtime runner, against the PyTorch model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model_dir

from fastast.cli import main
from fastast.errors import CheckpointError, ExportError, FastASTError, InvalidRError
from fastast.export import onnx as onnx_export
from fastast.export.ort import CPU, CUDA, OnnxRunner, pick_providers
from fastast.export.spec import graph_file
from fastast.model import tome
from fastast.model.store import load_model

# 146 tokens: r=8 never clamps; r=50 is clamped to (t - 2) // 2 from the second block on.
R_VALUES = [0, 8, 50]
CLAMPED_R = 50


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    assert main(["export-onnx", "--model", str(tiny_model_dir), "--r", "50,0,8", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runner(onnx_dir: Path) -> OnnxRunner:
    return OnnxRunner(onnx_dir, device="cpu")


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def speech_features(model, speech_wav: Path) -> torch.Tensor:
    """Five rows of real speech, cut to different lengths so that each row has a different amount of padding."""
    from fastast.audio import load_audio

    wave = load_audio(speech_wav, model.card.input.sample_rate)
    return torch.cat([model.featurize(wave[i * 3000 : i * 3000 + 20000 - 3000 * i], 16000) for i in range(5)])


def test_export_writes_one_graph_per_r_and_lists_them_in_the_card(onnx_dir: Path, tiny_model_dir: Path):
    assert sorted(p.name for p in onnx_dir.glob("*.onnx")) == sorted(graph_file(r) for r in R_VALUES)
    card = json.loads((onnx_dir / "card.json").read_text())
    source = json.loads((tiny_model_dir / "card.json").read_text())
    assert card["onnx"]["r"] == R_VALUES
    assert card["onnx"]["opset"] == 18 and card["onnx"]["dtype"] == "fp32"
    assert set(card["onnx"]["max_abs_diff"]) == {str(r) for r in R_VALUES}
    assert {k: v for k, v in card.items() if k != "onnx"} == source
    assert not list(onnx_dir.glob(".export-*")), "the staging folder is removed"


def test_clamped_r_is_among_the_exported_values(model):
    config = model.net.config
    unclamped = [config.num_tokens - CLAMPED_R * (i + 1) for i in range(config.depth)]
    assert tome.token_schedule(config.num_tokens, [CLAMPED_R] * config.depth) != unclamped


@pytest.mark.parametrize("r", R_VALUES)
@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch(runner: OnnxRunner, model, speech_features: torch.Tensor, r: int, batch: int):
    random = torch.randn(5, 128, 128, generator=torch.Generator().manual_seed(r))
    for features in (random[:batch], speech_features[:batch]):
        with torch.inference_mode():
            expected = model(features, r)
        got = runner.run(features, r)
        assert got.shape == expected.shape == (batch, 35)
        assert (got - expected).abs().max().item() <= 1e-4
        assert torch.equal(runner.run(features.numpy(), r), got), "ndarray and Tensor inputs give the same logits"


def test_unexported_r_names_the_exported_values(runner: OnnxRunner):
    with pytest.raises(InvalidRError, match=r"r=20 .*exported r values: 0, 8, 50"):
        runner.run(torch.zeros(1, 128, 128), 20)


def test_active_provider_is_reported(runner: OnnxRunner):
    assert runner.provider == CPU
    assert runner.r_values == R_VALUES


def test_providers_prefer_cuda_only_where_onnxruntime_has_it():
    import onnxruntime

    assert pick_providers("cpu") == [CPU]
    if CUDA in onnxruntime.get_available_providers():
        assert pick_providers("auto")[0][0] == CUDA
        assert pick_providers("cuda:1")[0] == (CUDA, {"device_id": 1})
    else:
        assert pick_providers("auto") == [CPU]
        with pytest.raises(FastASTError, match="no CUDAExecutionProvider"):
            pick_providers("cuda")
    with pytest.raises(FastASTError, match="device must be"):
        pick_providers("gpu")


def test_corrupt_graph_fails_at_load_naming_the_file(onnx_dir: Path, tmp_path: Path):
    broken = shutil.copytree(onnx_dir, tmp_path / "broken")
    data = (broken / "r8.onnx").read_bytes()
    (broken / "r8.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"r8\.onnx: not a loadable ONNX graph"):
        OnnxRunner(broken, device="cpu")


def test_missing_graph_fails_at_load(onnx_dir: Path, tmp_path: Path):
    partial = shutil.copytree(onnx_dir, tmp_path / "partial")
    (partial / "r50.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"r50\.onnx: missing"):
        OnnxRunner(partial, device="cpu")


def test_graph_of_another_model_fails_at_load(onnx_dir: Path, tmp_path: Path):
    other = make_model_dir(tmp_path / "other", seed=1, target_length=96)
    onnx_export.export_onnx(other, tmp_path / "other_onnx", [8])
    mixed = shutil.copytree(onnx_dir, tmp_path / "mixed")
    shutil.copy(tmp_path / "other_onnx" / "r8.onnx", mixed / "r8.onnx")
    with pytest.raises(CheckpointError, match=r"r8\.onnx: graph input .* does not match the card .*128, 128"):
        OnnxRunner(mixed, device="cpu")


def test_folder_without_exported_graphs_is_refused(tiny_model_dir: Path):
    with pytest.raises(CheckpointError, match="lists no ONNX graphs"):
        OnnxRunner(tiny_model_dir, device="cpu")


def test_fp16_export_replaces_stale_graphs(onnx_dir: Path, tiny_model_dir: Path, model, tmp_path: Path):
    out = shutil.copytree(onnx_dir, tmp_path / "fp16")
    card = onnx_export.export_onnx(tiny_model_dir, out, [8], dtype="fp16")
    assert card.model_extra["onnx"]["dtype"] == "fp16"
    assert sorted(p.name for p in out.glob("*.onnx")) == ["r8.onnx"]
    features = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(3))
    got = OnnxRunner(out, device="cpu").run(features, 8)
    assert got.dtype == torch.float32
    with torch.inference_mode():
        expected = model(features, 8)
    assert np.allclose(got.numpy(), expected.numpy(), atol=2e-2, rtol=2e-2)


def test_differences_within_pytorchs_own_sensitivity_pass_with_a_warning(onnx_dir: Path, model, caplog, monkeypatch):
    """With no tolerance at all, ORT's rounding differences still pass: PyTorch moves as much for a 1e-6 nudge."""
    monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", (0.0, 0.0))
    inputs = {"random": torch.randn(5, 128, 128, generator=torch.Generator().manual_seed(7))}
    worst = onnx_export.check_graph(onnx_dir / "r8.onnx", model, 8, inputs, "fp32")
    assert 0 < worst < 1e-5
    assert "within PyTorch's own sensitivity" in caplog.text


def test_parity_failure_writes_nothing(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", (0.0, 0.0))
    monkeypatch.setitem(onnx_export.NUDGE, "fp32", 0.0)
    with pytest.raises(ExportError, match=r"r=8: ONNX Runtime and PyTorch disagree on random input at batch 1"):
        onnx_export.export_onnx(tiny_model_dir, tmp_path / "out", [8])
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--r", "0,-4"], "r must be >= 0"),
        (["--r", "10,x"], "comma-separated integers"),
        (["--r", "10", "--opset", "13"], "--opset must be between 16 and 20"),
    ],
)
def test_cli_refuses_bad_arguments(tiny_model_dir: Path, tmp_path: Path, capsys, args: list[str], message: str):
    assert main(["export-onnx", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err


# ---- fastast bench --backend ------------------------------------------------------------------------------------


def bench_json(capsys, *args: str) -> dict:
    common = ["bench", "--batch-size", "2", "--warmup", "0", "--runs", "1", "--device", "cpu", "--json"]
    code = main([*common, *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_bench_times_onnxruntime_next_to_torch(capsys, tiny_model_dir: Path, onnx_dir: Path):
    args = ["--model", str(tiny_model_dir), "--onnx", str(onnx_dir), "--backend", "onnxruntime,torch", "--r", "8,50"]
    report = bench_json(capsys, *args)
    assert report["backend"] == "onnxruntime"
    assert [row["r"] for row in report["results"]] == [0, 8, 50]
    assert [(b["backend"], b["r"]) for b in report["baselines"]] == [("torch", 0), ("torch", 8), ("torch", 50)]
    assert all(b["max_abs_diff"] <= 1e-4 and b["samples_per_s"] > 0 for b in report["baselines"])


def test_bench_exports_for_the_run_when_the_model_has_no_graphs(capsys, tiny_model_dir: Path):
    report = bench_json(capsys, "--model", str(tiny_model_dir), "--backend", "torch,onnxruntime", "--r", "8")
    assert [(b["backend"], b["r"]) for b in report["baselines"]] == [("onnxruntime", 0), ("onnxruntime", 8)]
    assert all(b["max_abs_diff"] <= 1e-4 for b in report["baselines"])


def test_bench_refuses_an_unexported_r(capsys, tiny_model_dir: Path, onnx_dir: Path):
    code = main(["bench", "--model", str(tiny_model_dir), "--onnx", str(onnx_dir), "--backend", "onnxruntime", "--r", "9"])
    assert code == 2
    assert "no exported ONNX graph for r=[9]" in capsys.readouterr().err


# ---- fastast serve --backend onnxruntime ------------------------------------------------------------------------


def test_served_scores_agree_between_backends(tiny_model_dir: Path, onnx_dir: Path, speech_wav: Path):
    """Two real servers on the same weights: torch on the model folder, onnxruntime on its exported graphs."""
    import httpx
    from serverutil import metric, running_server, scrape

    args = ("--max-batch-size", "2", "--max-wait-ms", "50")
    speech = speech_wav.read_bytes()
    scores = {}
    onnx_env = {"FASTAST_BACKEND": "onnxruntime"}
    with running_server(tiny_model_dir, *args) as torch_url, running_server(onnx_dir, *args, env=onnx_env) as ort_url:
        for name, url in (("torch", torch_url), ("onnxruntime", ort_url)):
            for r in R_VALUES:
                response = httpx.post(f"{url}/classify", params={"r": r, "top_k": 35}, content=speech, timeout=30.0)
                assert response.status_code == 200, response.text
                scores[name, r] = {entry["index"]: entry["score"] for entry in response.json()["labels"]}
        refused = httpx.post(f"{ort_url}/classify", params={"r": 20}, content=speech, timeout=30.0)
        info = httpx.get(f"{ort_url}/models", timeout=10.0).json()["models"][0]["backend"]
        samples = scrape(ort_url)
    for r in R_VALUES:
        assert scores["torch", r].keys() == scores["onnxruntime", r].keys()
        assert max(abs(scores["torch", r][i] - scores["onnxruntime", r][i]) for i in scores["torch", r]) <= 1e-4
    assert refused.status_code == 422
    assert refused.json()["error"] == "invalid_parameter" and "exported r values: 0, 8, 50" in refused.json()["detail"]
    assert info == {"name": "onnxruntime", "device": "cpu/CPUExecutionProvider", "dtype": "fp32"}
    assert metric(samples, "fastast_model_info", backend="onnxruntime", device="cpu/CPUExecutionProvider") == 1


def test_serving_refuses_a_default_r_without_a_graph(onnx_dir: Path):
    from fastast.serving.app import create_app
    from fastast.serving.settings import ServeSettings

    with pytest.raises(InvalidRError, match="r=20 has no exported ONNX graph"):
        create_app(ServeSettings(model=onnx_dir, backend="onnxruntime", default_r=20, device="cpu"))
