"""torch.compile for AST+ToMe: one static graph per r, since r changes every token count downstream of block one.

r is a plain int argument, so dynamo specialises on it and each r gets its own graph (and another per batch-size
class, unless the caller marks the batch dimension dynamic). Past dynamo's recompile limit it would quietly run
eager instead, so the limit is raised to the number of graphs the caller expects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def compile_model(network: nn.Module, graphs: int) -> Callable[[Tensor, int], Tensor]:
    """`network` under torch.compile (inductor); `graphs`: how many (r, shape) graphs it may build."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; both exist in some versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs + 1))
    return torch.compile(network, dynamic=False)
