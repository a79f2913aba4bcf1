"""Units for messages."""

from __future__ import annotations


def format_bytes(n: int) -> str:
    """1_000_000 -> '1 MB', 250_000 -> '250 kB' (decimal units, as file browsers show them)."""
    if n >= 1_000_000:
        return f"{n / 1e6:.3g} MB"
    if n >= 1_000:
        return f"{n / 1e3:.3g} kB"
    return f"{n} bytes"
