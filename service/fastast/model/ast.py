"""The Audio Spectrogram Transformer (Gong et al. 2021) with Token Merging in every block.

Input: normalized log-mel features [batch, time, mel]. The spectrogram is cut into overlapping 16x16
patches (frequency is the image height, time the width), prefixed by a [CLS] and a distillation token,
and run through pre-norm transformer blocks. The logits come from the mean of the two special tokens.

`r` is an argument of every forward call (never hidden state): an int merges r tokens in each block,
a list gives one r per block, and r=0 runs no merge code at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastast.model import tome

SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


@dataclass(frozen=True)
class ASTConfig:
    """Architecture of one AST; the defaults are AST-base on AudioSet (stride 10, 1024 frames)."""

    num_classes: int
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    fstride: int = 10
    tstride: int = 10
    num_mel_bins: int = 128
    target_length: int = 1024
    norm_eps: float = 1e-6  # blocks and final norm (timm); Hugging Face checkpoints use 1e-12
    head_norm_eps: float = 1e-5  # the classifier LayerNorm

    @classmethod
    def preset(cls, size: str, num_classes: int, **overrides) -> ASTConfig:
        """tiny / small / base: 192 / 384 / 768 wide, 3 / 6 / 12 heads, 12 blocks."""
        if size not in SIZES:
            raise ValueError(f"unknown AST size {size!r}; choose one of {', '.join(SIZES)}")
        dim, heads = SIZES[size]
        return cls(num_classes=num_classes, dim=dim, heads=heads, **overrides)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along frequency and time."""
        f_dim = (self.num_mel_bins - self.patch_size) // self.fstride + 1
        t_dim = (self.target_length - self.patch_size) // self.tstride + 1
        return f_dim, t_dim

    @property
    def num_patches(self) -> int:
        f_dim, t_dim = self.grid
        return f_dim * t_dim

    @property
    def num_tokens(self) -> int:
        return self.num_patches + tome.PROTECTED_TOKENS

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head self-attention that also returns the ToMe metric (keys averaged over heads)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: Tensor | None, prop_attn: bool, metric: bool = True) -> tuple[Tensor, Tensor | None]:
        """Output and, when `metric` (the block will merge), the ToMe metric; skipping it keeps r=0 lean."""
        batch, num_tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # Proportional attention: a key that stands for s patches gets log(s) added to its logits.
        bias = size.log().to(x.dtype).view(batch, 1, 1, num_tokens) if prop_attn and size is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj(out), k.mean(dim=1) if metric else None


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class MergeState:
    """What ToMe carries from block to block within one forward call."""

    size: Tensor | None = None  # [batch, tokens, 1] input patches per token
    source: Tensor | None = None  # [batch, tokens, input tokens] when tracing
    prop_attn: bool = True
    trace_source: bool = False


class Block(nn.Module):
    """Pre-norm transformer block; tokens merge between the attention and the MLP branch."""

    def __init__(self, config: ASTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config.dim, config.heads)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = Mlp(config.dim, int(config.dim * config.mlp_ratio))

    def forward(self, x: Tensor, r: int, state: MergeState) -> Tensor:
        merging = tome.clamp_r(r, x.shape[1]) > 0
        attn_out, metric = self.attn(self.norm1(x), state.size, state.prop_attn, metric=merging)
        x = x + attn_out
        if merging:
            merge = tome.bipartite_soft_matching(metric, r)
            if state.trace_source:
                state.source = tome.merge_source(merge, x, state.source)
            x, state.size = tome.merge_wavg(merge, x, state.size)
        return x + self.mlp(self.norm2(x))


class AST(nn.Module):
    def __init__(self, config: ASTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embed = nn.Conv2d(
            1, dim, kernel_size=config.patch_size, stride=(config.fstride, config.tstride)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head_norm = nn.LayerNorm(dim, eps=config.head_norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def embed(self, features: Tensor) -> Tensor:
        """[batch, time, mel] -> [batch, 2 + patches, dim] with positions added."""
        x = self.patch_embed(features.unsqueeze(1).transpose(2, 3))  # [B, dim, freq, time]
        x = x.flatten(2).transpose(1, 2)
        batch = x.shape[0]
        special = torch.cat([self.cls_token, self.dist_token], dim=1).expand(batch, -1, -1)
        return torch.cat([special, x], dim=1) + self.pos_embed

    def encode(self, features: Tensor, r: int | Sequence[int] = 0, state: MergeState | None = None) -> Tensor:
        """Run the blocks and the final norm; returns the (merged) token sequence."""
        schedule = tome.parse_r(r, self.config.depth)
        state = state or MergeState()
        x = self.embed(features)
        for block, block_r in zip(self.blocks, schedule):
            x = block(x, block_r, state)
        return self.norm(x)

    def forward(self, features: Tensor, r: int | Sequence[int] = 0, prop_attn: bool = True) -> Tensor:
        """Logits [batch, classes] for normalized features [batch, time, mel]."""
        x = self.encode(features, r, MergeState(prop_attn=prop_attn))
        pooled = (x[:, 0] + x[:, 1]) / 2
        return self.head(self.head_norm(pooled))

    def merge_sources(self, features: Tensor, r: int | Sequence[int], prop_attn: bool = True) -> Tensor:
        """Which input tokens each output token covers: 0/1 [batch, tokens_out, 2 + patches]."""
        state = MergeState(prop_attn=prop_attn, trace_source=True)
        x = self.encode(features, r, state)
        if state.source is None:
            return torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        return state.source
