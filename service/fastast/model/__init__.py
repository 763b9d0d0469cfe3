"""The AST network with Token Merging, its card, and the model store.

Every name loads on first use, so code that needs only the card (the service's API workers, which never import
torch) or only the network (fastast.bench, which needs no pydantic) pays for nothing else.
"""

import importlib

_LAZY = {
    "AST": "ast",
    "ASTConfig": "ast",
    "InputSpec": "card",
    "Label": "card",
    "ModelCard": "card",
    "FastASTModel": "store",
    "load_model": "store",
    "save_model": "store",
}

__all__ = ["AST", "ASTConfig", "FastASTModel", "InputSpec", "Label", "ModelCard", "load_model", "save_model"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastast.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastast.model' has no attribute {name!r}")
