"""The AST network with Token Merging, its card, and the model store."""

from fastast.model.ast import AST, ASTConfig
from fastast.model.card import InputSpec, Label, ModelCard
from fastast.model.store import FastASTModel, load_model, save_model

__all__ = ["AST", "ASTConfig", "FastASTModel", "InputSpec", "Label", "ModelCard", "load_model", "save_model"]
