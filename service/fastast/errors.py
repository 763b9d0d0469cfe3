"""Typed errors: every problem a user can cause maps to one of these, never to a deep torch traceback."""


class FastASTError(Exception):
    """Base class; the CLI prints its message on one line and exits non-zero."""


class InvalidAudioError(FastASTError, ValueError):
    """Audio that cannot be decoded, is empty, or holds NaN/Inf samples."""


class AudioTooLongError(InvalidAudioError):
    """Audio longer than the caller's limit (the service answers 413 rather than 400)."""


class InvalidRError(FastASTError, ValueError):
    """A token-merging schedule that is negative, not an integer, or of the wrong length."""


class CheckpointError(FastASTError):
    """A checkpoint or model folder that is missing, malformed, or whose keys do not match the architecture."""


class IntegrityError(CheckpointError):
    """Weights whose sha256 differs from the one recorded in the model card."""


class ExportError(FastASTError):
    """An export whose graph fails the ONNX checker or disagrees with the PyTorch model it came from."""
