"""Token Merging (ToMe, Bolya et al. 2023) for AST: small pure functions, no model state.

The algorithm follows the reference ToMe implementation exactly (see
shared/reference/AST_TOME_REFERENCE.md, section 4): bipartite soft matching on the attention keys,
[CLS] (token 0) and the distillation token (token 1) protected, size-weighted averaging, and the
reference token order after each merge, so the two special tokens stay at indices 0 and 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastast.errors import InvalidRError

Merge = Callable[[Tensor, str], Tensor]

PROTECTED_TOKENS = 2  # [CLS] and the distillation token


def parse_r(r: int | Sequence[int], depth: int) -> list[int]:
    """Turn a ToMe setting into one r per block: an int applies to every block, a list is per block."""
    if isinstance(r, bool):
        raise InvalidRError(f"r must be an integer or a list of {depth} integers, got {r!r}")
    if isinstance(r, int):
        schedule = [r] * depth
    elif isinstance(r, Sequence) and not isinstance(r, str):
        schedule = list(r)
        if len(schedule) != depth:
            raise InvalidRError(f"a per-block r list needs {depth} entries (one per block), got {len(schedule)}")
    else:
        raise InvalidRError(f"r must be an integer or a list of {depth} integers, got {r!r}")
    for value in schedule:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRError(f"r values must be integers, got {value!r}")
        if value < 0:
            raise InvalidRError(f"r must be >= 0, got {value}")
    return schedule


def parse_r_values(text: str) -> list[int]:
    """A sweep of r values, '0,10,20' -> [0, 10, 20]: integers >= 0, duplicates dropped, order kept."""
    values: list[int] = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise InvalidRError(f"--r takes comma-separated integers >= 0, got {text!r}") from None
        if value < 0:
            raise InvalidRError(f"r must be >= 0, got {value}")
        if value not in values:
            values.append(value)
    return values


def clamp_r(r: int, num_tokens: int) -> int:
    """The r a block can actually merge: at most half of the unprotected tokens."""
    return max(0, min(r, (num_tokens - PROTECTED_TOKENS) // 2))


def token_schedule(num_tokens: int, schedule: Sequence[int]) -> list[int]:
    """Tokens left after each block (merging happens inside the block, before its MLP)."""
    counts = []
    for r in schedule:
        num_tokens -= clamp_r(r, num_tokens)
        counts.append(num_tokens)
    return counts


def bipartite_soft_matching(metric: Tensor, r: int) -> Merge | None:
    """Match the r most similar (A, B) token pairs; returns a merge function, or None if nothing merges.

    metric: [batch, tokens, channels]. Tokens alternate into sets A (even positions) and B (odd positions);
    every A token proposes its most similar B token, and the r strongest proposals are merged.
    The merge is one gather (kept A tokens and all B tokens, already in output order) and one in-place
    scatter of the merging A tokens: fewer passes over x and fewer kernels than gathering the parts and
    concatenating them, with bit-identical results.
    """
    num_tokens = metric.shape[1]
    r = clamp_r(r, num_tokens)
    if r <= 0:
        return None

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        set_a, set_b = metric[:, ::2], metric[:, 1::2]
        scores = set_a @ set_b.transpose(-1, -2)
        scores[:, 0, :] = -torch.inf  # [CLS] (A[0]) is never merged away
        scores[:, :, 0] = -torch.inf  # nothing is merged into the distillation token (B[0])

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        kept_idx = edge_idx[:, r:].sort(dim=1).values  # ascending, so [CLS] returns to the front
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
        # A token i sits at 2i in x, B token j at 2j + 1. The output is [kept A[0] (CLS), B[0] (dist),
        # kept A[1:], B[1:]], so B token j >= 1 (every destination: B[0] is protected) lands at |A| - r + j.
        batch, num_a = metric.shape[0], set_a.shape[1]
        kept_pos = 2 * kept_idx
        b_pos = torch.arange(1, num_tokens, 2, device=metric.device).view(1, -1, 1).expand(batch, -1, -1)
        order = torch.cat([kept_pos[:, :1], b_pos[:, :1], kept_pos[:, 1:], b_pos[:, 1:]], dim=1)
        src_pos = 2 * src_idx
        dst_pos = dst_idx + (num_a - r)

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        channels = x.shape[-1]
        merged = x.gather(dim=1, index=order.expand(-1, -1, channels))
        src = x.gather(dim=1, index=src_pos.expand(-1, -1, channels))
        return merged.scatter_reduce_(1, dst_pos.expand(-1, -1, channels), src, reduce=mode)

    return merge


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Merge tokens as an average weighted by how many input patches each token already stands for."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def merge_source(merge: Merge, x: Tensor, source: Tensor | None) -> Tensor:
    """Track which input tokens each current token covers: a 0/1 matrix [batch, tokens_now, tokens_in]."""
    if source is None:
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, device=x.device, dtype=x.dtype).expand(batch, num_tokens, num_tokens)
    return merge(source, "amax")
