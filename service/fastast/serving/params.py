"""Request parameters as the service accepts them: plain ASCII numbers of bounded length, anything else 422.

Python's int() and float() are too lenient for input from the network: they read Arabic-Indic and other Unicode
digits, underscores, surrounding whitespace, 'inf' and 'nan', and int() raises on more than 4,300 digits.
"""

from __future__ import annotations

import math
import re

from fastast.serving.errors import ServiceError

MAX_INT_DIGITS = 9  # every r and top_k a model can take, far below any integer-size limit
MAX_NUMBER_CHARS = 32
_INT = re.compile(rf"[0-9]{{1,{MAX_INT_DIGITS}}}")
_DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SHOWN_CHARS = 40  # how much of a refused value the error repeats
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def parse_int(raw: str | None, name: str) -> int | None:
    """A query parameter as a non-negative integer (None when absent); the caller checks the range."""
    if raw is None:
        return None
    if not _INT.fullmatch(raw):
        raise _invalid(f"{name} must be a whole number of at most {MAX_INT_DIGITS} digits 0-9, got {_shown(raw)}")
    return int(raw)


def parse_decimal(raw: str | None, name: str) -> float | None:
    """A query parameter as a finite non-negative decimal number (None when absent); the caller checks the range."""
    if raw is None:
        return None
    value = _decimal(raw)
    if not math.isfinite(value):
        raise _invalid(f"{name} must be a decimal number such as 0.5, got {_shown(raw)}")
    return value


def parse_bool(raw: str | None, name: str) -> bool:
    """A query switch: true/false or 1/0 (absent: false)."""
    if raw is None:
        return False
    if raw.lower() not in _BOOLS:
        raise _invalid(f"{name} must be true or false, got {_shown(raw)}")
    return _BOOLS[raw.lower()]


def parse_timeout_ms(raw: str | None, timeout_s: float) -> float | None:
    """X-Request-Timeout-Ms in seconds (None when absent): a finite number of ms from 1 to the server's timeout."""
    if raw is None:
        return None
    limit_ms = 1000 * timeout_s
    ms = _decimal(raw)
    if not (math.isfinite(ms) and 1 <= ms <= limit_ms):
        raise _invalid(
            f"X-Request-Timeout-Ms must be a number of milliseconds from 1 to {limit_ms:g} (the server's --timeout-s), "
            f"got {_shown(raw)}"
        )
    return ms / 1000


def _decimal(raw: str) -> float:
    """The value of a plain ASCII decimal of bounded length; NaN for anything else."""
    return float(raw) if len(raw) <= MAX_NUMBER_CHARS and _DECIMAL.fullmatch(raw) else math.nan


def _shown(raw: str) -> str:
    return repr(raw) if len(raw) <= _SHOWN_CHARS else f"{raw[:_SHOWN_CHARS]!r}... ({len(raw)} characters)"


def _invalid(detail: str) -> ServiceError:
    return ServiceError(422, "invalid_parameter", detail)
