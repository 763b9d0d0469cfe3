"""Numerical parity: our AST against transformers' ASTForAudioClassification, and our ToMe against an
independent reference forward written here from the ToMe paper's algorithm (reference section 4).

The reference deliberately does not import fastast.model.tome: it runs transformers' own modules by hand
(embeddings, layer norms, q/k/v/output projections, MLP) and merges tokens with its own bipartite matching.
"""

from __future__ import annotations

import pytest
import torch
from transformers import ASTConfig as HFConfig
from transformers import ASTForAudioClassification

from fastast.model.importers import import_hf

DEPTH, DIM, HEADS, FRAMES = 4, 96, 4, 128
TOKENS = 2 + 12 * 12  # cls, dist and a 12 x 12 patch grid (128 mel bins, 128 frames, stride 10)
ATOL = 1e-4


def random_hf_model(attn_implementation: str, seed: int = 0) -> ASTForAudioClassification:
    """Every parameter random (LayerNorms too, and the zero-initialised tokens), so a wrong mapping shows."""
    config = HFConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=2 * DIM,
        max_length=FRAMES,
        num_mel_bins=128,
        num_labels=7,
        attn_implementation=attn_implementation,
    )
    model = ASTForAudioClassification(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)
    return model


@pytest.fixture(scope="module")
def hf_models() -> dict[str, ASTForAudioClassification]:
    return {impl: random_hf_model(impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def ours(hf_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "random-ast"
    hf_models["sdpa"].save_pretrained(folder)
    network, card = import_hf(folder)
    assert card.arch["norm_eps"] == card.arch["head_norm_eps"] == 1e-12
    return network


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    """Two different inputs, so each sample merges differently."""
    return 0.5 * torch.randn(2, FRAMES, 128, generator=torch.Generator().manual_seed(1))


# ---- reference ToMe (reference section 4), independent of fastast.model.tome --------------------------------


def reference_matching(metric: torch.Tensor, r: int):
    """Bipartite soft matching with cls (A row 0) and dist (B column 0) protected; None when nothing merges."""
    tokens = metric.shape[1]
    r = min(r, (tokens - 2) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        a, b = unit[:, 0::2, :], unit[:, 1::2, :]
        similarity = torch.einsum("nic,njc->nij", a, b)
        similarity[:, 0, :] = float("-inf")
        similarity[:, :, 0] = float("-inf")
        best_score, best_partner = similarity.max(dim=2)
        order = torch.argsort(best_score, dim=1, descending=True)
        merged_a = order[:, :r]
        kept_a = torch.sort(order[:, r:], dim=1).values
        target_b = torch.gather(best_partner, 1, merged_a)

    def merge(x: torch.Tensor, mode: str) -> torch.Tensor:
        channels = x.shape[-1]
        x_a, x_b = x[:, 0::2, :], x[:, 1::2, :]
        kept = torch.gather(x_a, 1, kept_a.unsqueeze(-1).expand(-1, -1, channels))
        moving = torch.gather(x_a, 1, merged_a.unsqueeze(-1).expand(-1, -1, channels))
        x_b = x_b.scatter_reduce(1, target_b.unsqueeze(-1).expand(-1, -1, channels), moving, reduce=mode)
        return torch.cat([kept[:, :1], x_b[:, :1], kept[:, 1:], x_b[:, 1:]], dim=1)

    return merge


def reference_forward(
    hf: ASTForAudioClassification, features: torch.Tensor, schedule: list[int], prop_attn: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' AST modules driven by hand with ToMe between attention and MLP; (logits, source)."""
    backbone = hf.audio_spectrogram_transformer
    x = backbone.embeddings(features)
    batch = x.shape[0]
    size = None
    source = torch.eye(x.shape[1]).expand(batch, -1, -1)
    for layer, r in zip(backbone.layers, schedule):
        attention = layer.attention
        tokens = x.shape[1]
        h = layer.layernorm_before(x)

        def heads(projection):
            return projection(h).view(batch, tokens, HEADS, DIM // HEADS).transpose(1, 2)

        q, k, v = heads(attention.q_proj), heads(attention.k_proj), heads(attention.v_proj)
        logits = q @ k.transpose(-1, -2) * (DIM // HEADS) ** -0.5
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        context = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        x = x + attention.o_proj(context)
        merge = reference_matching(k.mean(dim=1), r)
        if merge is not None:
            source = merge(source, "amax")
            weights = torch.ones(batch, tokens, 1) if size is None else size
            total = merge(weights, "sum")
            x = merge(x * weights, "sum") / total
            size = total
        x = x + layer.mlp(layer.layernorm_after(x))
    x = backbone.layernorm(x)
    return hf.classifier((x[:, 0] + x[:, 1]) / 2), source


# ---- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_r0_matches_transformers(hf_models, ours, features, attn):
    with torch.no_grad():
        expected = hf_models[attn](features).logits
        got = ours(features, r=0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_reference_without_merging_matches_transformers(hf_models, features):
    """The hand-driven reference is itself exact at r=0, so it can judge the merged runs."""
    with torch.no_grad():
        logits, _ = reference_forward(hf_models["eager"], features, [0] * DEPTH)
        expected = hf_models["eager"](features).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


SCHEDULES = {
    "r4": 4,
    "r16": 16,
    "per-block": [5, 0, 23, 9],  # odd counts, a block that skips merging
    "clamped": 100,  # beyond (t - 2) // 2 in every block: 146 -> 74 -> 38 -> 20 -> 11 tokens
}


def expand(r: int | list[int]) -> list[int]:
    return [r] * DEPTH if isinstance(r, int) else list(r)


@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop-attn", "plain-attn"])
@pytest.mark.parametrize("r", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_tome_matches_reference(hf_models, ours, features, r, prop_attn):
    with torch.no_grad():
        expected, _ = reference_forward(hf_models["eager"], features, expand(r), prop_attn)
        got = ours(features, r=r, prop_attn=prop_attn)
        unmerged = ours(features, r=0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - unmerged).abs().max() > 1e-3, "merging must change the result, or this test proves nothing"


def test_clamp_takes_effect(ours, features):
    with torch.no_grad():
        torch.testing.assert_close(ours(features, r=100), ours(features, r=10_000), atol=0, rtol=0)
        assert ours.merge_sources(features, 100).shape[1] == 11


@pytest.mark.parametrize("r", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_merge_sources_partition_the_input(hf_models, ours, features, r):
    with torch.no_grad():
        sources = ours.merge_sources(features, r)
        _, expected = reference_forward(hf_models["eager"], features, expand(r))
    tokens_out = TOKENS
    for block_r in expand(r):
        tokens_out -= min(block_r, (tokens_out - 2) // 2)
    assert sources.shape == (features.shape[0], tokens_out, TOKENS)
    assert set(sources.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(sources.sum(dim=1), torch.ones(features.shape[0], TOKENS))  # each input token exactly once
    assert bool((sources.sum(dim=2) >= 1).all())  # no empty output token
    identity = torch.eye(TOKENS)
    assert torch.equal(sources[:, 0], identity[0].expand_as(sources[:, 0]))  # cls alone, at index 0
    assert torch.equal(sources[:, 1], identity[1].expand_as(sources[:, 1]))  # dist alone, at index 1
    torch.testing.assert_close(sources, expected, atol=0, rtol=0)
    assert not torch.equal(sources[0], sources[1]), "the two samples should merge differently"
