"""Import AST checkpoints from Hugging Face and from the original AST code into FastAST networks and cards.

Three key layouts are understood (reference sections 3.1-3.3):
- the Hub's `ASTForAudioClassification` layout (`...encoder.layer.N.attention.attention.query...`), which is
  also what transformers 5 still writes with save_pretrained;
- the transformers >= 5 in-memory layout (`...layers.N.attention.q_proj...`);
- original AST `.pth` files (`module.v.blocks.N.attn.qkv...`, saved from nn.DataParallel).
Separate q/k/v projections become one qkv matrix (rows q, k, v). Weights are read with safetensors, or with
torch.load(weights_only=True), never by unpickling arbitrary objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from fastast.errors import CheckpointError
from fastast.model.ast import AST, ASTConfig
from fastast.model.card import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    LABEL_SETS,
    InputSpec,
    Label,
    ModelCard,
    bundled_labels,
    card_errors,
    read_label_csv,
)
from fastast.model.store import card_arch, load_state_dict_checked

HF_PREFIX = "audio_spectrogram_transformer."
# Where one transformer layer lives, per Hugging Face layout.
HF_LAYER_PREFIX = {"hub": HF_PREFIX + "encoder.layer.{i}.", "transformers5": HF_PREFIX + "layers.{i}."}
# Our name inside a block -> the name inside an HF layer, per layout (weight and bias each).
HF_BLOCK_NAMES = {
    "norm1": {"hub": "layernorm_before", "transformers5": "layernorm_before"},
    "attn.proj": {"hub": "attention.output.dense", "transformers5": "attention.o_proj"},
    "norm2": {"hub": "layernorm_after", "transformers5": "layernorm_after"},
    "mlp.fc1": {"hub": "intermediate.dense", "transformers5": "mlp.fc1"},
    "mlp.fc2": {"hub": "output.dense", "transformers5": "mlp.fc2"},
}
# The three projections that make up our attn.qkv, in row order q, k, v.
HF_QKV_NAMES = {
    "hub": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "transformers5": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
}
# Keys outside the layers (identical in both layouts).
HF_TOP_NAMES = {
    "cls_token": HF_PREFIX + "embeddings.cls_token",
    "dist_token": HF_PREFIX + "embeddings.distillation_token",
    "pos_embed": HF_PREFIX + "embeddings.position_embeddings",
    "patch_embed.weight": HF_PREFIX + "embeddings.patch_embeddings.projection.weight",
    "patch_embed.bias": HF_PREFIX + "embeddings.patch_embeddings.projection.bias",
    "norm.weight": HF_PREFIX + "layernorm.weight",
    "norm.bias": HF_PREFIX + "layernorm.bias",
    "head_norm.weight": "classifier.layernorm.weight",
    "head_norm.bias": "classifier.layernorm.bias",
    "head.weight": "classifier.dense.weight",
    "head.bias": "classifier.dense.bias",
}

# Original AST (.pth) prefixes -> ours, after the DataParallel "module." is removed.
ORIGINAL_PREFIXES = {
    "v.cls_token": "cls_token",
    "v.dist_token": "dist_token",
    "v.pos_embed": "pos_embed",
    "v.patch_embed.proj.": "patch_embed.",
    "v.blocks.": "blocks.",
    "v.norm.": "norm.",
    "mlp_head.0.": "head_norm.",
    "mlp_head.1.": "head.",
}
ORIGINAL_UNUSED = ("v.head.", "v.head_dist.")  # DeiT's ImageNet heads, never used by AST
ORIGINAL_HEAD_DIM = 64  # every DeiT size (tiny/small/base) has 64-wide heads


def hf_key_map(depth: int, layout: str) -> dict[str, tuple[str, int | None]]:
    """HF key -> (our key, which third of qkv it fills, or None for a plain copy)."""
    names: dict[str, tuple[str, int | None]] = {hf: (ours, None) for ours, hf in HF_TOP_NAMES.items()}
    for i in range(depth):
        layer = HF_LAYER_PREFIX[layout].format(i=i)
        for param in ("weight", "bias"):
            for ours, theirs in HF_BLOCK_NAMES.items():
                names[f"{layer}{theirs[layout]}.{param}"] = (f"blocks.{i}.{ours}.{param}", None)
            for third, theirs in enumerate(HF_QKV_NAMES[layout]):
                names[f"{layer}{theirs}.{param}"] = (f"blocks.{i}.attn.qkv.{param}", third)
    return names


def detect_hf_layout(state: Mapping[str, Tensor], source: str = "checkpoint") -> str:
    """'hub' or 'transformers5', by the first layer key found."""
    for key in state:
        if key.startswith(HF_PREFIX + "layers."):
            return "transformers5"
        if key.startswith(HF_PREFIX + "encoder.layer."):
            return "hub"
    raise CheckpointError(f"{source}: no AST transformer layers (expected audio_spectrogram_transformer.* keys)")


def hf_state_to_fastast(
    state: Mapping[str, Tensor], depth: int, layout: str, qkv_bias: bool = True
) -> dict[str, Tensor]:
    """Rename an HF state dict to our keys; keys we do not know keep their name (reported as unexpected)."""
    names = hf_key_map(depth, layout)
    out: dict[str, Tensor] = {}
    thirds: dict[str, dict[int, tuple[str, Tensor]]] = {}
    for key, tensor in state.items():
        ours, third = names.get(key, (key, None))
        if third is None:
            out[ours] = tensor
        else:
            thirds.setdefault(ours, {})[third] = (key, tensor)
    for ours, parts in thirds.items():
        if len(parts) == 3:
            out[ours] = torch.cat([parts[i][1] for i in range(3)], dim=0)
        else:  # an incomplete q/k/v set: keep the pieces under their own names so the error shows them
            out.update(dict(parts.values()))
    if not qkv_bias:  # HF can drop the q/k/v biases; ours always has them, so zeros are exact
        for i in range(depth):
            weight = out.get(f"blocks.{i}.attn.qkv.weight")
            if weight is not None:
                out.setdefault(f"blocks.{i}.attn.qkv.bias", weight.new_zeros(weight.shape[0]))
    return out


def fastast_state_to_hf(state: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Our state dict in the transformers >= 5 layout (the inverse of hf_state_to_fastast)."""
    out: dict[str, Tensor] = {}
    for hf_key, (ours, third) in hf_key_map(depth, "transformers5").items():
        tensor = state[ours]
        out[hf_key] = tensor if third is None else tensor.chunk(3, dim=0)[third]
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def torch_load_tensors(path: Path) -> dict[str, Tensor]:
    """A pickled state dict, read with weights_only=True (tensors and plain containers only)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage input surfaces as any of a dozen exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({first_line})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return dict(state)


def _read_hf_weights(folder: Path) -> tuple[dict[str, Tensor], str]:
    safetensors_path, bin_path = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_path.is_file():
        try:
            return load_file(str(safetensors_path)), "hf-safetensors"
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{safetensors_path}: not a readable safetensors file ({exc})") from None
    if bin_path.is_file():
        return torch_load_tensors(bin_path), "hf-pytorch-bin"
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _mlp_ratio(hidden: int, dim: int, source: Path) -> float:
    """hidden / dim, checked to give back exactly `hidden` the way ASTConfig rounds it."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise CheckpointError(f"{source}: MLP width {hidden} is not representable for width {dim}")
    return ratio


def hf_arch(config: Mapping[str, Any], source: Path) -> ASTConfig:
    """Our ASTConfig for a Hugging Face ASTConfig (config.json)."""
    if config.get("model_type", "audio-spectrogram-transformer") != "audio-spectrogram-transformer":
        raise CheckpointError(f"{source}: model_type {config['model_type']!r} is not an Audio Spectrogram Transformer")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only exact 'gelu')")
    try:
        dim = int(config.get("hidden_size", 768))
        patch = config.get("patch_size", 16)
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise CheckpointError(f"{source}: non-square patch_size {patch} is not supported")
            patch = patch[0]
        eps = float(config.get("layer_norm_eps", 1e-12))
        return ASTConfig(
            num_classes=len(config.get("id2label") or {}) or int(config["num_labels"]),
            dim=dim,
            depth=int(config.get("num_hidden_layers", 12)),
            heads=int(config.get("num_attention_heads", 12)),
            mlp_ratio=_mlp_ratio(int(config.get("intermediate_size", 4 * dim)), dim, source),
            patch_size=int(patch),
            fstride=int(config.get("frequency_stride", 10)),
            tstride=int(config.get("time_stride", 10)),
            num_mel_bins=int(config.get("num_mel_bins", 128)),
            target_length=int(config.get("max_length", 1024)),
            norm_eps=eps,  # HF uses one eps for every LayerNorm, the classifier's included
            head_norm_eps=eps,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: incomplete or invalid AST config ({exc})") from None


def hf_labels(config: Mapping[str, Any]) -> list[Label]:
    """Labels from id2label; mids come from a bundled label set whose names match, else the name itself."""
    id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(config.get("num_labels", 0)))}
    try:
        by_index = {int(key): str(name) for key, name in id2label.items()}
    except ValueError:
        raise CheckpointError(f"config id2label keys must be integers, got {sorted(id2label)[:4]}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise CheckpointError(f"config id2label must number its labels 0..{len(by_index) - 1} without gaps")
    names = [by_index[i] for i in range(len(by_index))]
    for set_name in LABEL_SETS:
        known = bundled_labels(set_name)
        if [label.display_name for label in known] == names:
            return known
    return [Label(index=i, mid=name, display_name=name) for i, name in enumerate(names)]


def hf_input_spec(folder: Path, arch: ASTConfig) -> InputSpec:
    """Input spec from preprocessor_config.json when present, else AudioSet statistics."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return InputSpec(num_mel_bins=arch.num_mel_bins, target_length=arch.target_length)
    pre = _read_json(path)
    for field, model_value in (("max_length", arch.target_length), ("num_mel_bins", arch.num_mel_bins)):
        if field in pre and int(pre[field]) != model_value:
            raise CheckpointError(f"{path}: {field} {pre[field]} differs from the model's {model_value} in config.json")
    if pre.get("do_normalize", True):
        mean, std = float(pre.get("mean", AUDIOSET_MEAN)), float(pre.get("std", AUDIOSET_STD))
    else:  # (x - 0) / (2 * 0.5) = x: features reach the model unnormalized
        mean, std = 0.0, 0.5
    return InputSpec(
        num_mel_bins=arch.num_mel_bins,
        target_length=arch.target_length,
        mean=mean,
        std=std,
        sample_rate=int(pre.get("sampling_rate", 16000)),
    )


def import_hf(folder: str | Path) -> tuple[AST, ModelCard]:
    """An ASTForAudioClassification folder (config.json + weights) as our network and card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Hugging Face model folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    config = _read_json(config_path)
    arch = hf_arch(config, config_path)
    state, fmt = _read_hf_weights(folder)
    layout = detect_hf_layout(state, str(folder))
    network = AST(arch)
    renamed = hf_state_to_fastast(state, arch.depth, layout, bool(config.get("qkv_bias", True)))
    load_state_dict_checked(network, renamed, str(folder))
    with card_errors(folder):
        card = ModelCard(
            name=folder.resolve().name,
            arch=card_arch(arch),
            input=hf_input_spec(folder, arch),
            labels=hf_labels(config),
            task="single-label" if config.get("problem_type") == "single_label_classification" else "multi-label",
            provenance={
                "source": str(folder.resolve()),
                "format": fmt,
                "layout": layout,
                "transformers_version": config.get("transformers_version"),
            },
        )
    return network.eval(), card


def resolve_labels(labels: str | Path) -> list[Label]:
    """A bundled label set name (audioset, esc50, speechcommands) or a CSV path in AST's format."""
    text = str(labels)
    if text in LABEL_SETS:
        return bundled_labels(text)
    path = Path(text)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return read_label_csv(path)
    return bundled_labels(text)  # raises: unknown set name


def _original_state_to_fastast(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        if name.startswith(ORIGINAL_UNUSED):
            continue
        for prefix, ours in ORIGINAL_PREFIXES.items():
            if name.startswith(prefix):
                out[ours + name[len(prefix) :]] = tensor
                break
        else:
            out[key] = tensor  # unknown: reported under its own name
    return out


def _original_arch(state: Mapping[str, Tensor], source: Path, **input_arch: Any) -> ASTConfig:
    """Width, depth and heads read off the weights (heads = dim // 64, as in every DeiT size)."""
    needed = ("cls_token", "patch_embed.weight", "blocks.0.mlp.fc1.weight", "head.weight")
    missing = [key for key in needed if key not in state]
    if missing:
        raise CheckpointError(f"{source}: not an original AST checkpoint (no {', '.join(missing)} after renaming)")
    dim = state["cls_token"].shape[-1]
    if dim % ORIGINAL_HEAD_DIM:
        raise CheckpointError(f"{source}: width {dim} is not a multiple of the head size {ORIGINAL_HEAD_DIM}")
    depth = len({int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
    return ASTConfig(
        num_classes=state["head.weight"].shape[0],
        dim=dim,
        depth=depth,
        heads=dim // ORIGINAL_HEAD_DIM,
        mlp_ratio=_mlp_ratio(state["blocks.0.mlp.fc1.weight"].shape[0], dim, source),
        patch_size=state["patch_embed.weight"].shape[-1],
        **input_arch,
    )


def import_original(
    pth: str | Path,
    labels: str | Path,
    target_length: int,
    fstride: int = 10,
    tstride: int = 10,
    mean: float = AUDIOSET_MEAN,
    std: float = AUDIOSET_STD,
    task: str = "multi-label",
) -> tuple[AST, ModelCard]:
    """An original AST .pth (module.v.* keys) as our network and card; eps 1e-6 in the blocks, 1e-5 in the head."""
    pth = Path(pth)
    label_list = resolve_labels(labels)
    state = _original_state_to_fastast(torch_load_tensors(pth))
    arch = _original_arch(state, pth, fstride=fstride, tstride=tstride, target_length=target_length)
    if arch.num_classes != len(label_list):
        raise CheckpointError(
            f"{pth}: the head has {arch.num_classes} outputs but {labels} has {len(label_list)} labels"
        )
    tokens = state["pos_embed"].shape[1] if "pos_embed" in state else None
    if tokens is not None and tokens != arch.num_tokens:
        f_dim, t_dim = arch.grid
        raise CheckpointError(
            f"{pth}: pos_embed holds {tokens} tokens, but target_length {target_length} with strides "
            f"{fstride}/{tstride} needs {arch.num_tokens} ({f_dim}x{t_dim} patches + 2)"
        )
    network = AST(arch)
    load_state_dict_checked(network, state, str(pth))
    with card_errors(pth):
        card = ModelCard(
            name=pth.stem,
            arch=card_arch(arch),
            input=InputSpec(num_mel_bins=arch.num_mel_bins, target_length=target_length, mean=mean, std=std),
            labels=label_list,
            task=task,
            provenance={"source": str(pth.resolve()), "format": "ast-pth", "labels": str(labels)},
        )
    return network.eval(), card


def to_hf_model(network: AST, attn_implementation: str = "sdpa") -> Any:
    """A transformers ASTForAudioClassification with our weights (needs transformers, a dev dependency).

    HF has one LayerNorm eps; the classifier LayerNorm's is set afterwards, so networks imported from the
    original AST (1e-6 / 1e-5) compute the same function too.
    """
    from transformers import ASTConfig as HFConfig
    from transformers import ASTForAudioClassification

    c = network.config
    hf_config = HFConfig(
        hidden_size=c.dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.heads,
        intermediate_size=int(c.dim * c.mlp_ratio),
        hidden_act="gelu",
        layer_norm_eps=c.norm_eps,
        patch_size=c.patch_size,
        qkv_bias=True,
        frequency_stride=c.fstride,
        time_stride=c.tstride,
        max_length=c.target_length,
        num_mel_bins=c.num_mel_bins,
        num_labels=c.num_classes,
        attn_implementation=attn_implementation,
    )
    hf = ASTForAudioClassification(hf_config)
    hf.classifier.layernorm.eps = c.head_norm_eps
    hf.load_state_dict(fastast_state_to_hf(network.state_dict(), c.depth), strict=True)
    param = next(network.parameters())
    return hf.to(device=param.device, dtype=param.dtype).eval()
