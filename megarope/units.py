"""Token counts as people write them: 4K means 4,096, 1M means 1,048,576 (powers of two, as
context lengths are quoted), and any other count is written out in full.

A label never rounds: a bound of 129,027 tokens reads "129,027", not "129K" next to a "128K" that
means 131,072.
"""

from __future__ import annotations

import math

_SUFFIX = {"k": 2**10, "m": 2**20}


def format_tokens(n: float | None) -> str:
    """128K and 1M for exact multiples of 1024 and 2**20; otherwise the count itself (129,027)."""
    if n is None:
        return "none"
    if not math.isfinite(n):
        return str(n)
    if n == int(n):
        n = int(n)
        if n >= 2**20 and n % 2**20 == 0:
            return f"{n >> 20}M"
        if n >= 2**10 and n % 2**10 == 0:
            return f"{n >> 10}K"
    return f"{n:,.0f}"


def parse_tokens(text: str) -> int:
    """A positive token count: 4096, 4K (= 4096), 1M (= 1048576), 1e6. Raises ValueError."""
    t = text.strip()
    scale = _SUFFIX.get(t[-1:].lower(), 1)
    digits = t[:-1] if scale > 1 else t
    try:
        value = float(digits) if "e" in digits.lower() else int(digits)
    except ValueError:
        raise ValueError(f"not a token count: {text!r}") from None
    if value != int(value) or value <= 0:
        raise ValueError(f"not a positive whole token count: {text!r}")
    return int(value) * scale
