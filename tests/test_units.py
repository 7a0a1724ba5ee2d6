import math

import pytest

from megarope.units import format_tokens, parse_tokens


def test_format_is_exact_never_rounded():
    assert format_tokens(131072) == "128K"
    assert format_tokens(2**20) == "1M"
    assert format_tokens(3 * 2**20) == "3M"
    assert format_tokens(129027) == "129,027"  # not "129K" beside a 128K that means 131,072
    assert format_tokens(1117.3) == "1,117"
    assert format_tokens(1000) == "1,000"
    assert format_tokens(128) == "128"
    assert format_tokens(None) == "none"
    assert format_tokens(math.inf) == "inf"


def test_parse_as_users_write_lengths():
    assert parse_tokens("4096") == 4096
    assert parse_tokens("4K") == 4096
    assert parse_tokens(" 16k ") == 16384
    assert parse_tokens("1M") == 2**20
    assert parse_tokens("1e6") == 1_000_000
    for bad in ("", "K", "abc", "-4K", "0", "1.5"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_round_trip():
    for n in (128, 4096, 131072, 2**20):
        assert parse_tokens(format_tokens(n)) == n
