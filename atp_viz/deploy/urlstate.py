"""The view in the URL: parsing and formatting the query parameters a shared link carries.

``?model=minilm&sample=04_attention_explainer&rank=0.25&form=exact&basis=input&method=exact&split=one
&centre=0&layers=all&lowrank=0&layer=3&head=5&query=84&scale=log&sinks=show`` (and ``present=1`` for presenter
mode). Every parser raises :class:`ValueError` with a sentence for the user when a value cannot be used
(the app then shows it and falls back to the default); the pages only read and write ``st.query_params``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from atp_viz.core import ranks

FRACTION_STEP = 0.05  # the explorer's "Rank r / L" slider step
# The explorer's "ranks per layer": one rank, or the budget split from the spectra, measured, or as tuned
# (which of these a model offers is the page's to say: atp_app.layer_split).
SPLITS = ("one", "spectrum", "measured", "tuned")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _not_a_rank(raw: str) -> ValueError:
    return ValueError(f"rank={raw!r} is neither a fraction of L (like 0.25) nor a token count (like 64).")


def format_rank(unit: str, value: float | int) -> str:
    """A fraction of L keeps its decimal point ("0.25", "1.00"); a number of tokens has none ("83")."""
    return f"{float(value):.2f}" if unit == "fraction" else str(int(value))


def parse_rank(raw: str, n_tokens: int) -> tuple[str, float | int]:
    """``("fraction", f)`` for "0.25" (a multiple of 0.05 in [0.05, 1], the slider's values) or
    ``("tokens", r)`` for "83" (1 <= r <= the text's tokens). Read by the project's one rank parser
    (:func:`atp_viz.core.ranks.parse_rank`), then checked against what the explorer's widgets offer. Any
    other share of L the command line takes ("L/8", "0.333") is this text's r in tokens, as ATP resolves
    it, so a link gives the numbers ``compare --rank`` gives."""
    raw = raw.strip()
    try:
        value = ranks.parse_rank(raw, check=False)
    except (ValueError, TypeError):
        raise _not_a_rank(raw) from None
    if isinstance(value, float):
        steps = round(value / FRACTION_STEP)
        if not 0 < value <= 1 + 1e-9:
            raise ValueError(f"rank={raw} is not a share of L between 0 and 1.")
        if value < FRACTION_STEP - 1e-9 or abs(steps * FRACTION_STEP - value) > 1e-6:
            return "tokens", ranks.resolve_rank(value, n_tokens)[0]  # off the slider's steps: in tokens
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


def parse_layers(raw: str, n_layers: int) -> str:
    """The layers that run ATP ("all", "0-5", "1,3,7"), written back in one form ("0-2,7")."""
    try:
        return ranks.format_layers(ranks.parse_layers(raw, n_layers))
    except ValueError as err:
        raise ValueError(f"layers={raw.strip()!r}: {err}") from None


def looks_like_model_id(raw: str) -> bool:
    """A hub id ("org/name") or a local path: what the sidebar's "Other" model field takes."""
    raw = raw.strip()
    return bool(_HUB_ID.match(raw)) or raw.startswith(("/", "./", "../", "~"))


# ---- the whole view --------------------------------------------------------------------------------

DEFAULT_RANK = "0.50"
SINKS = ("show", "hide")  # the maps' attention-sink columns: drawn, or left out
LOWRANK = ("0", "1")  # the linear layers' inputs: as they are, or projected onto U_r (the paper's claim 3)
CENTRE = ("0", "1")  # the basis: plain, or centred (the mean token first; core.basis.principal_basis)


@dataclass(frozen=True)
class ViewShape:
    """What a view's values must fit: the text's tokens, the model's layers and query heads, the
    registered forms and the maps' colour scales, with the defaults used where a value does not fit."""

    n_tokens: int
    n_layers: int
    n_heads: int
    forms: Sequence[str]
    scales: Sequence[str]
    default_layer: int
    default_query: int
    default_form: str
    default_scale: str
    bases: Sequence[str]  # where the basis comes from (attention inputs first: the paper's)
    methods: Sequence[str]  # how it is computed (exact SVD first)


def tuned_view(settings: Mapping, n_tokens: int) -> dict[str, str] | None:
    """The view of the ATP setting a tuned run trained at (``settings``: its ``atp_tuning.json``'s), for a
    text of ``n_tokens``: its form, basis and centring, its rank (the mean share, with its own per-layer
    ranks when it has them), on every layer, by exact SVD, linear layers dense, as tuning runs ATP. None
    for a run trained at a fixed number of principal keys (behind an exact window or not): the
    explorer's rank is a share of the whole text, so it cannot show that setting."""
    rank = settings["rank"]
    if settings.get("window") or isinstance(rank, int):
        return None
    return {
        "form": settings["form"],
        "basis": settings.get("basis_from", "input"),
        "centre": CENTRE[1] if settings.get("centre_basis") else CENTRE[0],
        "rank": format_rank(*parse_rank(f"{rank:g}", n_tokens)),
        "split": "tuned" if settings.get("layer_ranks") else "one",
        "layers": "all",
        "method": "exact",
        "lowrank": LOWRANK[0],
    }


def fit_view(view: Mapping[str, str], shape: ViewShape) -> tuple[dict[str, str], list[str]]:
    """``view`` (the URL's strings: rank, form, basis, method, centre, split, layers (which run ATP), lowrank,
    layer (the one shown), head, query, scale, sinks, and others passed through) with every value that
    does not fit ``shape`` replaced by its default, with a sentence per replaced value saying why, and
    missing values filled in, so that a link names the whole view."""
    parsers = {
        "rank": (lambda raw: format_rank(*parse_rank(raw, shape.n_tokens)), DEFAULT_RANK),
        "form": (lambda raw: parse_choice(raw, shape.forms, "form"), shape.default_form),
        "basis": (lambda raw: parse_choice(raw, shape.bases, "basis"), shape.bases[0]),
        "method": (lambda raw: parse_choice(raw, shape.methods, "method"), shape.methods[0]),
        "split": (lambda raw: parse_choice(raw, SPLITS, "split"), SPLITS[0]),
        "layers": (lambda raw: parse_layers(raw, shape.n_layers), "all"),
        "lowrank": (lambda raw: parse_choice(raw, LOWRANK, "lowrank"), LOWRANK[0]),
        "centre": (lambda raw: parse_choice(raw, CENTRE, "centre"), CENTRE[0]),
        "layer": (
            lambda raw: str(parse_index(raw, shape.n_layers, "layer", "this model's layer list")),
            str(shape.default_layer),
        ),
        "head": (
            lambda raw: str(parse_index(raw, shape.n_heads, "head", "each layer's query head list")),
            "0",
        ),
        "query": (
            lambda raw: str(parse_index(raw, shape.n_tokens, "query", "this text's token list")),
            str(shape.default_query),
        ),
        "scale": (lambda raw: parse_choice(raw, shape.scales, "scale"), shape.default_scale),
        "sinks": (lambda raw: parse_choice(raw, SINKS, "sinks"), SINKS[0]),
    }
    out, problems = dict(view), []
    for name, (parse, default) in parsers.items():
        raw = out.get(name)
        if raw is None:
            out[name] = default
            continue
        try:
            out[name] = parse(raw)
        except ValueError as err:
            problems.append(str(err))
            out[name] = default
    return out, problems
