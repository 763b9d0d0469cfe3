"""Request parameters: ASCII digits of bounded length for r and top_k, a finite bounded X-Request-Timeout-Ms."""

from __future__ import annotations

import pytest

from fastast.serving.errors import ServiceError
from fastast.serving.params import MAX_INT_DIGITS, parse_int, parse_timeout_ms


def refused(call, *args) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        call(*args)
    assert (info.value.status, info.value.code) == (422, "invalid_parameter")
    return info.value


@pytest.mark.parametrize(
    ("raw", "value"), [(None, None), ("0", 0), ("7", 7), ("072", 72), ("9" * MAX_INT_DIGITS, 10**MAX_INT_DIGITS - 1)]
)
def test_parse_int_reads_ascii_digits(raw, value):
    assert parse_int(raw, "r") == value


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "٣",  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
        "１",  # FULLWIDTH DIGIT ONE
        "1_0",  # int() reads it as 10
        " 5",
        "5 ",
        "+5",
        "-1",
        "2.5",
        "0x10",
        "abc",
        "1" * (MAX_INT_DIGITS + 1),
        "1" * 4301,  # past Python's int-digit limit: int() would raise ValueError
    ],
)
def test_parse_int_refuses_everything_else(raw):
    error = refused(parse_int, raw, "top_k")
    assert error.detail.startswith("top_k must be a whole number")


def test_a_long_value_is_not_echoed_whole():
    error = refused(parse_int, "1" * 4301, "r")
    assert "4301 characters" in error.detail and len(error.detail) < 200


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(None, None), ("1", 0.001), ("250", 0.25), ("2500.5", 2.5005), ("1e3", 1.0), (".5e4", 5.0), ("30000", 30.0)],
)
def test_parse_timeout_ms_reads_finite_numbers_within_the_server_timeout(raw, seconds):
    assert parse_timeout_ms(raw, timeout_s=30.0) == seconds


@pytest.mark.parametrize(
    "raw",
    ["inf", "Infinity", "nan", "1e400", "5e-324", "0", "0.5", "-5", "30000.001", "1e9", "", " 5", "1_000", "soon"]
    + ["٣٠٠", "1" * 40],  # Arabic-Indic 300, which float() reads; longer than any number worth reading
)
def test_parse_timeout_ms_refuses_the_rest(raw):
    error = refused(parse_timeout_ms, raw, 30.0)
    assert "from 1 to 30000" in error.detail
