"""The view in the URL: written back whenever it changes, read on a session's first run, so a copied
link reproduces the view. Parsing and validation are :mod:`atp_viz.deploy.urlstate`'s."""

from __future__ import annotations

import streamlit as st

from atp_viz import forms
from atp_viz.deploy import urlstate


def set_url(**params: str | int | None) -> None:
    """Write the view into the URL's query string (None removes a parameter), so that a copied link
    reproduces it; only changed values are sent to the browser."""
    for name, value in params.items():
        if value is None:
            if name in st.query_params:
                del st.query_params[name]
        elif st.query_params.get(name) != str(value):
            st.query_params[name] = str(value)


RANK_UNITS = {"fraction": "fraction of L", "tokens": "tokens"}  # URL word -> the explorer's radio option


def explorer_state_from_url(n_tokens: int, n_layers: int, n_heads: int) -> None:
    """Give the explorer's widgets their values before they are declared (they take no default).

    On the page's first run in a session: ?rank= (0.25 is a fraction of L, 64 a number of tokens),
    ?form=, ?layer= and ?head= from the link; an unusable value is named in an st.info and the
    default is used. On every run, values that no longer fit (a shorter text, a model with fewer
    layers) are reset, saying so, instead of making a widget fail.
    """
    ss = st.session_state
    problems: list[str] = []
    if not ss.get("_explorer_url_read"):
        ss["_explorer_url_read"] = True
        qp = st.query_params
        parsers = {
            "rank": lambda raw: urlstate.parse_rank(raw, n_tokens),
            "form": lambda raw: urlstate.parse_choice(raw, forms.names(), "form"),
            "layer": lambda raw: urlstate.parse_index(raw, n_layers, "layer", "this model's layer list"),
            "head": lambda raw: urlstate.parse_index(raw, n_heads, "head", "each layer's query head list"),
        }
        for name, parse in parsers.items():
            if name not in qp:
                continue
            try:
                value = parse(qp[name])
            except ValueError as err:
                problems.append(str(err))
                continue
            if name == "rank":
                unit, r = value
                ss["rank_unit"] = RANK_UNITS[unit]
                ss["rank_frac" if unit == "fraction" else "rank_tokens"] = r
            else:
                ss[{"form": "form", "layer": "map_layer", "head": "map_head"}[name]] = value
    ss.setdefault("rank_frac", 0.5)
    # The token slider's range is 1..L, and Streamlit resets a slider whose range changed: on a new
    # text, carry the rank over (when it still fits) by setting it again before the slider exists.
    r = ss.get("rank_tokens")
    fits = isinstance(r, int) and 1 <= r <= n_tokens
    if r is not None and not fits:
        problems.append(f"r = {r} tokens does not fit this text of {n_tokens} tokens.")
    if not fits or ss.get("_rank_tokens_L") != n_tokens:
        ss["rank_tokens"] = r if fits else max(1, n_tokens // 2)
        ss["_rank_tokens_L"] = n_tokens
    for key, n, what in (("map_layer", n_layers, "layer"), ("map_head", n_heads, "query head")):
        if key in ss and ss[key] not in range(n):
            problems.append(f"This model has no {what} {ss[key]} (it has {n}).")
            ss[key] = 0
    if problems:
        st.info("Defaults used instead of: " + " ".join(problems))


def rank_param(unit: str, rank: float | int) -> str:
    """The explorer's rank as it goes in the URL (see :func:`atp_viz.urlstate.format_rank`)."""
    return urlstate.format_rank("tokens" if unit == RANK_UNITS["tokens"] else "fraction", rank)
