"""FastAST: the Audio Spectrogram Transformer with Token Merging, as a library, a CLI and a service.

`from fastast import load_model` is the stable entry point; torch is imported only when it is used.
"""

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_model":
        from fastast.model.store import load_model

        return load_model
    raise AttributeError(f"module 'fastast' has no attribute {name!r}")
