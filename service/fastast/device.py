"""Device and dtype names shared by every command and the service (torch only, so the bench can use it)."""

from __future__ import annotations

import torch

from fastast.errors import FastASTError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when one is present, else cpu; an absent or unknown device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FastASTError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastASTError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FastASTError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device
