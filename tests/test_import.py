"""Checkpoint import: Hugging Face folders (both key layouts, safetensors and .bin) and original AST .pth files
become model_store folders whose logits match transformers'; bad checkpoints fail with one clear error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ASTConfig as HFConfig
from transformers import ASTFeatureExtractor, ASTForAudioClassification

from conftest import SC_MEAN, SC_STD

from fastast.cli import main
from fastast.errors import CheckpointError, IntegrityError
from fastast.model import load_model
from fastast.model.card import bundled_labels
from fastast.model.importers import hf_labels, import_hf, import_original, to_hf_model
from fastast.model.store import sha256_file

DIM, HEADS, DEPTH, FRAMES = 128, 2, 2, 128  # head width 64, as original AST checkpoints assume
NAMES = ["dog bark", "siren", "rain", "speech", "music"]
P = "audio_spectrogram_transformer."
ATOL = 1e-4


def random_hf_model(names: list[str] = NAMES, **config) -> ASTForAudioClassification:
    hf_config = HFConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * DIM,
        max_length=FRAMES,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        **config,
    )
    model = ASTForAudioClassification(hf_config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "layernorm" in name and name.endswith("weight") else 0.1 * noise)
    return model


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 keys -> the Hub's (transformers < 5) keys, written independently of the importer."""
    qkv = {"q": "query", "k": "key", "v": "value"}
    rules = [
        (
            r"\.layers\.(\d+)\.attention\.([qkv])_proj\.",
            lambda m: f".encoder.layer.{m[1]}.attention.attention.{qkv[m[2]]}.",
        ),
        (r"\.layers\.(\d+)\.attention\.o_proj\.", lambda m: f".encoder.layer.{m[1]}.attention.output.dense."),
        (r"\.layers\.(\d+)\.mlp\.fc1\.", lambda m: f".encoder.layer.{m[1]}.intermediate.dense."),
        (r"\.layers\.(\d+)\.mlp\.fc2\.", lambda m: f".encoder.layer.{m[1]}.output.dense."),
        (r"\.layers\.(\d+)\.", lambda m: f".encoder.layer.{m[1]}."),
    ]
    out = {}
    for key, tensor in state.items():
        for pattern, replace in rules:
            if re.search(pattern, key):
                key = re.sub(pattern, replace, key)
                break
        out[key] = tensor
    return out


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 keys -> an original AST .pth state dict (module.v.*, qkv fused, unused DeiT heads)."""
    out = {
        "module.v.cls_token": state[P + "embeddings.cls_token"],
        "module.v.dist_token": state[P + "embeddings.distillation_token"],
        "module.v.pos_embed": state[P + "embeddings.position_embeddings"],
        "module.v.head.weight": torch.randn(1000, DIM),
        "module.v.head.bias": torch.randn(1000),
        "module.v.head_dist.weight": torch.randn(1000, DIM),
        "module.v.head_dist.bias": torch.randn(1000),
    }
    for p in ("weight", "bias"):
        out[f"module.v.patch_embed.proj.{p}"] = state[P + f"embeddings.patch_embeddings.projection.{p}"]
        out[f"module.v.norm.{p}"] = state[P + f"layernorm.{p}"]
        out[f"module.mlp_head.0.{p}"] = state[f"classifier.layernorm.{p}"]
        out[f"module.mlp_head.1.{p}"] = state[f"classifier.dense.{p}"]
        for i in range(DEPTH):
            layer, block = f"{P}layers.{i}.", f"module.v.blocks.{i}."
            out[block + f"attn.qkv.{p}"] = torch.cat([state[layer + f"attention.{x}_proj.{p}"] for x in "qkv"])
            out[block + f"attn.proj.{p}"] = state[layer + f"attention.o_proj.{p}"]
            out[block + f"norm1.{p}"] = state[layer + f"layernorm_before.{p}"]
            out[block + f"norm2.{p}"] = state[layer + f"layernorm_after.{p}"]
            out[block + f"mlp.fc1.{p}"] = state[layer + f"mlp.fc1.{p}"]
            out[block + f"mlp.fc2.{p}"] = state[layer + f"mlp.fc2.{p}"]
    return out


def write_folder(folder: Path, model: ASTForAudioClassification, state: dict | None, weights: str) -> Path:
    """config.json plus the given state dict as model.safetensors or pytorch_model.bin."""
    folder.mkdir(parents=True)
    model.config.to_json_file(folder / "config.json")
    if weights == "model.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


@pytest.fixture(scope="module")
def hf_model() -> ASTForAudioClassification:
    return random_hf_model(problem_type="single_label_classification")


@pytest.fixture(scope="module")
def sources(hf_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-sources")
    state = hf_model.state_dict()
    assert any(".layers.0.attention.q_proj." in key for key in state)  # transformers >= 5 in memory
    folders = {"save_pretrained": root / "save_pretrained"}
    hf_model.save_pretrained(folders["save_pretrained"])
    ASTFeatureExtractor(mean=SC_MEAN, std=SC_STD, max_length=FRAMES).save_pretrained(folders["save_pretrained"])
    folders["transformers5"] = write_folder(root / "transformers5", hf_model, state, "model.safetensors")
    folders["hub"] = write_folder(root / "hub", hf_model, hub_layout(state), "model.safetensors")
    folders["bin"] = write_folder(root / "bin", hf_model, hub_layout(state), "pytorch_model.bin")
    return folders


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return 0.5 * torch.randn(2, FRAMES, 128, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def original_pth(tmp_path_factory) -> tuple[Path, Path, ASTForAudioClassification]:
    """An original-layout .pth, its label CSV, and the transformers model that computes the same function
    (eps 1e-6 in the blocks and 1e-5 in the head LayerNorm, as in timm's DeiT and AST's mlp_head)."""
    model = random_hf_model(layer_norm_eps=1e-6)
    model.classifier.layernorm.eps = 1e-5
    root = tmp_path_factory.mktemp("original")
    pth = root / "audioset_like.pth"
    torch.save(original_layout(model.state_dict()), pth)
    csv = root / "labels.csv"
    csv.write_text("index,mid,display_name\n" + "".join(f"{i},/m/x{i},{n}\n" for i, n in enumerate(NAMES)))
    return pth, csv, model


def logits_of(folder: Path, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder)(features)


def expected_logits(model: ASTForAudioClassification, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(features).logits


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastast import: error: ") and "\n" not in err, err
    return err


LAYOUTS = {"save_pretrained": "hub", "transformers5": "transformers5", "hub": "hub", "bin": "hub"}


@pytest.mark.parametrize("variant", LAYOUTS)
def test_hf_import_matches_transformers(sources, hf_model, features, variant, tmp_path, capsys):
    out = tmp_path / "store" / "imported"
    assert main(["import", "--from", "hf", str(sources[variant]), "--out", str(out)]) == 0
    assert "imported imported" in capsys.readouterr().out
    torch.testing.assert_close(logits_of(out, features), expected_logits(hf_model, features), atol=ATOL, rtol=0)
    card = load_model(out).card
    assert card.provenance["layout"] == LAYOUTS[variant]
    assert card.provenance["format"] == ("hf-pytorch-bin" if variant == "bin" else "hf-safetensors")
    assert card.provenance["source"] == str(sources[variant].resolve())
    assert [(label.mid, label.display_name) for label in card.labels] == [(n, n) for n in NAMES]
    assert card.task == "single-label"
    assert card.arch["norm_eps"] == card.arch["head_norm_eps"] == 1e-12
    assert card.weights_sha256 == sha256_file(out / "model.safetensors")


def test_preprocessor_config_reaches_the_card(sources):
    _, card = import_hf(sources["save_pretrained"])
    assert (card.input.mean, card.input.std, card.input.target_length) == (SC_MEAN, SC_STD, FRAMES)
    _, plain = import_hf(sources["transformers5"])  # no preprocessor_config.json: AudioSet statistics
    assert (plain.input.mean, plain.input.std) == (-4.2677393, 4.5689974)


def test_multi_label_unless_config_says_single_label(tmp_path):
    model = random_hf_model()
    folder = tmp_path / "multi"
    model.save_pretrained(folder)
    assert import_hf(folder)[1].task == "multi-label"


def test_checkpoint_without_qkv_bias(tmp_path, features):
    model = random_hf_model(qkv_bias=False)
    model.save_pretrained(tmp_path / "no-qkv-bias")
    network, _ = import_hf(tmp_path / "no-qkv-bias")
    with torch.no_grad():
        torch.testing.assert_close(network(features), model(features).logits, atol=ATOL, rtol=0)


def test_hub_label_names_recover_bundled_mids():
    speech_commands = ["backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four"]
    labels = hf_labels({"id2label": {str(i): n for i, n in enumerate(speech_commands)}})
    assert [label.mid for label in labels] == speech_commands  # not a bundled set: the name stands in
    bundled = bundled_labels("speechcommands")
    recovered = hf_labels({"id2label": {str(i): label.display_name for i, label in enumerate(bundled)}})
    assert recovered == bundled


def test_original_pth_import_matches_transformers(original_pth, features, tmp_path, capsys):
    pth, csv, model = original_pth
    out = tmp_path / "ast-original"
    argv = ["import", "--from", "ast", str(pth), "--labels", str(csv), "--target-length", str(FRAMES)]
    assert main([*argv, "--out", str(out), "--mean", str(SC_MEAN), "--std", str(SC_STD), "--name", "orig"]) == 0
    capsys.readouterr()
    torch.testing.assert_close(logits_of(out, features), expected_logits(model, features), atol=ATOL, rtol=0)
    card = load_model(out).card
    assert card.name == "orig"
    assert (card.input.mean, card.input.std, card.input.target_length) == (SC_MEAN, SC_STD, FRAMES)
    assert card.arch["heads"] == DIM // 64 and card.arch["depth"] == DEPTH
    assert (card.arch["norm_eps"], card.arch["head_norm_eps"]) == (1e-6, 1e-5)
    assert [label.mid for label in card.labels] == [f"/m/x{i}" for i in range(len(NAMES))]
    assert card.provenance["format"] == "ast-pth"
    assert card.weights_sha256 == sha256_file(out / "model.safetensors")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_to_hf_model_computes_the_same_function(original_pth, sources, features, attn):
    """Both eps conventions (original 1e-6/1e-5 and HF 1e-12) survive the trip to transformers."""
    pth, csv, _ = original_pth
    for network, _ in (import_original(pth, csv, FRAMES), import_hf(sources["hub"])):
        hf = to_hf_model(network, attn_implementation=attn)
        assert hf.config._attn_implementation == attn
        with torch.no_grad():
            torch.testing.assert_close(hf(features).logits, network(features), atol=ATOL, rtol=0)


def test_bundled_label_set_by_name(tmp_path):
    """A 35-class original checkpoint takes the bundled Speech Commands labels by name."""
    bundled = bundled_labels("speechcommands")
    model = random_hf_model([label.display_name for label in bundled])
    pth = tmp_path / "sc.pth"
    torch.save(original_layout(model.state_dict()), pth)
    _, card = import_original(pth, "speechcommands", FRAMES)
    assert card.labels == bundled


def test_missing_and_unexpected_keys(sources, tmp_path):
    state = load_file(str(sources["transformers5"] / "model.safetensors"))
    config = json.loads((sources["transformers5"] / "config.json").read_text())

    def folder_with(name: str, weights: dict) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file(weights, str(folder / "model.safetensors"))
        return folder

    missing = folder_with("missing", {k: v for k, v in state.items() if k != "classifier.dense.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys head\.bias"):
        import_hf(missing)
    no_key = folder_with("no-key", {k: v for k, v in state.items() if k != P + "layers.1.attention.k_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.1\.attn\.qkv\.weight.*unexpected keys .*q_proj"):
        import_hf(no_key)
    extra = folder_with("extra", {**state, P + "pooler.dense.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys audio_spectrogram_transformer\.pooler\.dense\.weight"):
        import_hf(extra)


def test_original_errors(original_pth, tmp_path, capsys):
    pth, csv, _ = original_pth
    with pytest.raises(CheckpointError, match=r"pos_embed holds 146 tokens.*target_length 256.*needs 302"):
        import_original(pth, csv, 256)
    with pytest.raises(CheckpointError, match=r"head has 5 outputs but esc50 has 50 labels"):
        import_original(pth, "esc50", FRAMES)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        import_original(tmp_path / "nope.pth", csv, FRAMES)
    with pytest.raises(CheckpointError, match="unknown label set"):
        import_original(pth, "nosuchset", FRAMES)
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in torch.load(pth, weights_only=True).items() if "mlp_head" not in k}, headless)
    with pytest.raises(CheckpointError, match=r"not an original AST checkpoint \(no head\.weight"):
        import_original(headless, csv, FRAMES)
    not_a_checkpoint = tmp_path / "garbage.pth"
    not_a_checkpoint.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        import_original(not_a_checkpoint, csv, FRAMES)

    out = str(tmp_path / "out")
    base = ["import", "--from", "ast", "--out", out]
    assert "needs 302" in one_line_error(capsys, [*base, str(pth), "--labels", str(csv), "--target-length", "256"])
    err = one_line_error(capsys, [*base, str(pth), "--labels", "nosuchset", "--target-length", "128"])
    assert "unknown label set" in err
    err = one_line_error(capsys, [*base, str(tmp_path / "nope.pth"), "--labels", "esc50", "--target-length", "128"])
    assert "not found" in err
    assert "needs --labels" in one_line_error(capsys, [*base, str(pth)])
    err = one_line_error(capsys, [*base, str(pth), "--labels", str(csv), "--target-length", str(FRAMES), "--std", "0"])
    assert err.endswith(": std: Input should be greater than 0")
    assert not (tmp_path / "out").exists()


def test_hf_cli_errors(sources, tmp_path, capsys):
    elsewhere = ["--out", str(tmp_path / "o")]
    assert "not found" in one_line_error(capsys, ["import", "--from", "hf", str(tmp_path / "nope"), *elsewhere])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_line_error(capsys, ["import", "--from", "hf", str(empty), *elsewhere])
    src = str(sources["hub"])
    assert "only apply to --from ast" in one_line_error(
        capsys, ["import", "--from", "hf", src, "--labels", "audioset", "--out", str(tmp_path / "o")]
    )
    out = str(tmp_path / "taken")
    assert main(["import", "--from", "hf", src, "--out", out]) == 0
    assert "--force" in one_line_error(capsys, ["import", "--from", "hf", src, "--out", out])
    assert main(["import", "--from", "hf", src, "--out", out, "--force"]) == 0


def test_tampered_import_fails_integrity_check(sources, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", "--from", "hf", str(sources["hub"]), "--out", str(out)]) == 0
    load_model(out)  # intact: loads
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_model(tampered)
