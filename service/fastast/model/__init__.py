"""The AST network with Token Merging, its card, and the model store.

The card and store (pydantic, safetensors) load on first use, so torch-only code such as fastast.bench
imports fastast.model.ast without them.
"""

import importlib

from fastast.model.ast import AST, ASTConfig

_LAZY = {"InputSpec": "card", "Label": "card", "ModelCard": "card", "FastASTModel": "store", "load_model": "store", "save_model": "store"}

__all__ = ["AST", "ASTConfig", "FastASTModel", "InputSpec", "Label", "ModelCard", "load_model", "save_model"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastast.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastast.model' has no attribute {name!r}")
