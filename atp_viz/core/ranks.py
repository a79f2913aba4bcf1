"""Ranks: the one place that reads a rank a user typed and turns it into a number of principal keys.

A rank is either an **int** (an absolute number of principal keys, ``64``) or a **float in (0, 1]**
(a share of the sequence length L, ``0.5`` = L/2). Text is parsed by :func:`parse_rank` (``"64"``,
``"0.5"``, ``"L/8"``); :func:`resolve_rank` turns a rank into ``r`` for one sequence. Every command,
page, URL parser and config in the project goes through these two. Where ATP runs is read here too:
per-layer ranks (:func:`parse_layer_shares`) and the layers that run it (:func:`parse_layers`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

Rank = int | float


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool) or type(x).__name__ in ("bool", "bool_")  # numpy's bool too


def check_rank(rank: Any) -> Rank:
    """Validate a rank without a sequence at hand: an int >= 1 or a float in (0, 1]; returns it.

    Raises TypeError for a bool or a non-number (``True`` would otherwise silently mean rank 1) and
    ValueError for a value out of range.
    """
    if _is_bool(rank):
        raise TypeError(
            "rank must be an int (number of principal keys) or a float fraction of L, not a bool."
        )
    if hasattr(rank, "__index__") and not isinstance(rank, float):
        r = rank.__index__()
        if r <= 0:
            raise ValueError(f"The rank must be at least 1 principal key, got {r}.")
        return r
    if hasattr(rank, "__float__") and not isinstance(rank, str):
        frac = float(rank)
        if not math.isfinite(frac) or frac <= 0.0 or frac > 1.0:
            raise ValueError(
                f"A fractional rank must lie in (0, 1] (a share of the sequence length L), got {rank}. "
                "Give an int for an absolute number of principal keys."
            )
        return frac
    raise TypeError(f"rank must be an int or a float in (0, 1], got {type(rank).__name__}.")


def resolve_rank(rank: Rank, L: int) -> tuple[int, str | None]:
    """Turn a rank into ``(r, notice)`` for a sequence of ``L`` tokens.

    - int: ``rank > L`` is clamped to ``L`` and ``notice`` says so;
    - float in (0, 1]: a share of ``L``, rounded half up, at least 1 (so ``1.0`` means all L tokens,
      while the int ``1`` means one principal key).

    Errors as in :func:`check_rank`.
    """
    if _is_bool(L) or not hasattr(L, "__index__") or L.__index__() < 1:
        raise ValueError(f"The sequence length L must be a positive int, got {L!r}.")
    L = L.__index__()
    rank = check_rank(rank)
    if isinstance(rank, int):
        if rank > L:
            return L, f"Rank {rank} exceeds the sequence length L = {L}; using r = {L} (full rank)."
        return rank, None
    return max(1, min(L, math.floor(rank * L + 0.5))), None


def parse_rank(text: str, *, check: bool = True) -> Rank:
    """``"64"`` -> 64 principal keys; ``"0.5"`` -> half of L; ``"L/8"`` -> 0.125 (an eighth of L).

    Raises ValueError with a sentence for the user. ``check=False`` only reads the number (a caller with
    a narrower range of its own, such as a slider, says what is wrong in its own terms).
    """
    raw = str(text).strip()
    try:
        if raw[:2].upper() == "L/":
            k = int(raw[2:])
            if k < 1:
                raise ValueError
            return 1.0 / k
        value: Rank = float(raw) if any(c in raw for c in ".eE") else int(raw)
    except (ValueError, ZeroDivisionError, IndexError):
        raise ValueError(
            f"Cannot read the rank {text!r}: give an int (principal keys, 64), a fraction of L (0.5) or L/k."
        ) from None
    return check_rank(value) if check else value


def parse_rank_list(text: str) -> list[Rank]:
    """``"4,16,0.25,L/8"`` -> ``[4, 16, 0.25, 0.125]`` (order kept); ValueError on any bad item."""
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("Give at least one rank (e.g. 16,64 or 0.25,0.5).")
    return [parse_rank(t) for t in items]


def parse_layer_shares(text: str) -> tuple[float, ...]:
    """Per-layer ranks typed by a user: shares of L, ``"0.375,0.125,..."`` or ``"L/8,..."``; ValueError
    for key counts (``"1"`` is one principal key: all of L is ``1.0``)."""
    shares = parse_rank_list(text)
    if not all(isinstance(x, float) for x in shares):
        raise ValueError(
            f"Per-layer ranks are shares of L (0.25 or L/4; 1.0 for all of L), not key counts: got {text!r}."
        )
    return tuple(shares)


def format_layer_shares(shares) -> str:
    """Per-layer ranks as a user types them back (:func:`parse_layer_shares`): ``'1.0,0.25,...'``."""
    return ",".join(repr(float(x)) for x in shares)


def describe_layer_shares(shares) -> str:
    """Per-layer ranks as they are printed in labels and tables: ``'0.25, 0.125, 0.5'``."""
    return ", ".join(f"{float(x):g}" for x in shares)


def parse_layers(spec: str, n_layers: int) -> Literal["all"] | tuple[int, ...]:
    """Which layers run ATP, as a user types them: 'all', '3', '0-5', '1,3,7' or a mix ('0-2,7') -> 'all'
    or a sorted tuple; a sentence in a ValueError otherwise."""
    spec = (spec or "").strip().lower()
    if spec in ("", "all"):
        return "all"
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(p) for p in part.split("-", 1))
                out.update(range(min(a, b), max(a, b) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"Cannot read layers {spec!r}: use 'all', '3', '0-5' or '1,3,7'.") from None
    bad = sorted(i for i in out if not 0 <= i < n_layers)
    if bad:
        raise ValueError(
            f"Layers {format_layers(tuple(bad))} do not exist: this model has layers 0-{n_layers - 1}."
        )
    return tuple(sorted(out))


def format_layers(layers: Literal["all"] | tuple[int, ...]) -> str:
    """Layers as :func:`parse_layers` reads them back, runs joined: ``(0, 1, 2, 7)`` -> ``'0-2,7'``."""
    if layers == "all":
        return "all"
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe(rank: Rank) -> str:
    """``r = 64`` or ``r = 0.5 L``: how a rank is printed everywhere."""
    return f"r = {rank:g} L" if isinstance(rank, float) else f"r = {rank}"


def describe_window(window: int, sinks: int = 0) -> str:
    """``exact window 512 + 4 sinks``: how the past tokens a chunk reads exactly next to its compressed
    middle (``serving.ExactKeep``) are printed everywhere; empty without a window."""
    if not window:
        return ""
    return f"exact window {window}" + (f" + {sinks} sinks" if sinks else "")


# Rank of a compressed past (decoders read in chunks). Two definitions, stated wherever a rank is shown:
# - "past": r is a share of the past only (round(f * n) of the n past tokens); the current chunk is
#   attended exactly on top, so each query attends to more than f of the tokens before it;
# - "effective": r is chosen so that, averaged over the chunk's queries, the attended share of the key
#   set, (r + j) / (n + j) for the chunk's j-th query, equals f: the paper's r = f L, where every query
#   attends to f of the keys. Where even r = 1 gives more (early chunks, f small), r = 1 and the share
#   achieved is reported.
RANK_MODES = ("past", "effective")
RANK_MODE_LABELS = {"past": "share of the past", "effective": "share of keys (the paper's r = f L)"}


def chunk_rank(rank: Rank, n_past: int, chunk_len: int, mode: str = "past") -> int:
    """Principal keys for a past of ``n_past`` tokens read by a chunk of ``chunk_len`` queries."""
    if mode not in RANK_MODES:
        raise ValueError(f"rank mode must be one of {', '.join(RANK_MODES)}, got {mode!r}.")
    if mode == "past" or isinstance(check_rank(rank), int):
        return resolve_rank(rank, n_past)[0]
    j = [i + 1 for i in range(chunk_len)]
    a = sum(1.0 / (n_past + x) for x in j) / chunk_len  # mean of 1 / (n + j)
    b = sum(x / (n_past + x) for x in j) / chunk_len  # mean of j / (n + j)
    r = round((float(rank) - b) / a)
    return max(1, min(n_past, r))


def attended_share(r: int, n_past: int, chunk_len: int) -> list[float]:
    """For each query j = 1..chunk_len of a chunk: the share of its keys it attends to, (r + j) / (n + j)
    (r principal keys for the n past tokens, the chunk's first j tokens exactly)."""
    return [(r + j) / (n_past + j) for j in range(1, chunk_len + 1)]
