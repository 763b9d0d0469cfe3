"""Typed errors: every problem a user can cause maps to one of these, never to a deep torch traceback."""


class FastASTError(Exception):
    """Base class; the CLI prints its message on one line and exits non-zero."""


class InvalidAudioError(FastASTError, ValueError):
    """Audio that cannot be decoded, is empty, or holds NaN/Inf samples."""


class AudioLimitError(InvalidAudioError):
    """Audio past one of the caller's limits (length, channels, sample rate): the service answers 413, not 400."""

    code = "audio_too_large"


class AudioTooLongError(AudioLimitError):
    """Audio longer than the caller's limit."""

    code = "audio_too_long"


class InvalidRError(FastASTError, ValueError):
    """A token-merging schedule that is negative, not an integer, or of the wrong length."""


class InvalidWindowError(FastASTError, ValueError):
    """A window hop outside 1..window, or an aggregation the model's task cannot do."""


class CheckpointError(FastASTError):
    """A checkpoint or model folder that is missing, malformed, or whose keys do not match the architecture."""


class IntegrityError(CheckpointError):
    """Weights whose sha256 differs from the one recorded in the model card."""


class ExportError(FastASTError):
    """An export whose graph fails the ONNX checker or disagrees with the PyTorch model it came from."""
