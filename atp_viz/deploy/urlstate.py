"""The view in the URL: parsing and formatting the query parameters a shared link carries.

``?model=minilm&sample=04_attention_explainer&rank=0.25&form=exact&layer=3&head=5``. Every parser
raises :class:`ValueError` with a sentence for the user when a value cannot be used (the app then
shows it and falls back to the default); the pages only read and write ``st.query_params``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from atp_viz.core import ranks

FRACTION_STEP = 0.05  # the explorer's "Rank r / L" slider step
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _not_a_rank(raw: str) -> ValueError:
    return ValueError(f"rank={raw!r} is neither a fraction of L (like 0.25) nor a token count (like 64).")


def format_rank(unit: str, value: float | int) -> str:
    """A fraction of L keeps its decimal point ("0.25", "1.00"); a number of tokens has none ("83")."""
    return f"{float(value):.2f}" if unit == "fraction" else str(int(value))


def parse_rank(raw: str, n_tokens: int) -> tuple[str, float | int]:
    """``("fraction", f)`` for "0.25" (a multiple of 0.05 in [0.05, 1], the slider's values) or
    ``("tokens", r)`` for "83" (1 <= r <= the text's tokens). Read by the project's one rank parser
    (:func:`atp_viz.core.ranks.parse_rank`), then checked against what the explorer's widgets offer."""
    raw = raw.strip()
    try:
        value = ranks.parse_rank(raw, check=False)
    except (ValueError, TypeError):
        raise _not_a_rank(raw) from None
    if isinstance(value, float):
        steps = round(value / FRACTION_STEP)
        if not (FRACTION_STEP - 1e-9 <= value <= 1 + 1e-9) or abs(steps * FRACTION_STEP - value) > 1e-6:
            raise ValueError(f"rank={raw} is not a fraction of L between 0.05 and 1 in steps of 0.05.")
        return "fraction", round(steps * FRACTION_STEP, 2)
    if not 1 <= value <= n_tokens:
        raise ValueError(f"rank={value} is out of range: this text has {n_tokens} tokens (r from 1 to L).")
    return "tokens", value


def parse_choice(raw: str, choices: Sequence[str], name: str) -> str:
    value = raw.strip()
    if value not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}.")
    return value


def parse_index(raw: str, n: int, name: str, what: str) -> int:
    """An index in [0, n): ``name`` is the parameter, ``what`` says what has n of them."""
    try:
        i = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number.") from None
    if not 0 <= i < n:
        raise ValueError(f"{name}={i} does not exist: {what} has {n} (0 to {n - 1}).")
    return i


def looks_like_model_id(raw: str) -> bool:
    """A hub id ("org/name") or a local path: what the sidebar's "Other" model field takes."""
    raw = raw.strip()
    return bool(_HUB_ID.match(raw)) or raw.startswith(("/", "./", "../", "~"))
