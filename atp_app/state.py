"""One view state for the whole app: model, text choice, rank, form, the basis (its source, method and
centring),
the ranks per layer, the layers that run ATP and whether the linear layers' inputs are low-rank, layer,
head, query token, the maps' colour scale and sink switch, and presenter mode. It persists across pages
within a session and sits in the URL of every page, so a link to any page reproduces the view. Typed or
uploaded text stays out of links (it is kept for the session only).

Where it lives: ``st.session_state["_view"]``, a plain dict under a non-widget key: a page switch drops
the URL's query parameters, pages draw different widgets for the same value (the explorer's and the
tour's layer), and one URL value can stand for several widgets. It is read from the URL on a session's
first run (:func:`view`), written into the URL on every run of every page (``app.py`` calls
:func:`sync_url` before the page; a fragment calls it after its widgets), and given to each widget before
the widget is declared, with an ``on_change`` callback that copies the new value back (:func:`bind`).
Streamlit's ``persist_state="session"`` keeps a widget's value while the widget is not drawn; values
kept for the session only (the text source, typed text, which views are open) use it alone. Parsing and
checking values is :mod:`atp_viz.deploy.urlstate`'s.

Why not Streamlit's ``bind="query-params"`` for the view: the URL's ``rank`` is served by three widgets
(a unit and two sliders) on the explorer and by the tour's token slider; a bad value in a link must be
named to the user, not dropped silently; values must be checked against the model and the text (layer,
head, rank and token ranges) before any widget sees them; and a link names the whole view, defaults
included, so it does not change meaning when a default does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from atp_viz import forms
from atp_viz.analysis.token_view import default_query
from atp_viz.core.basis import METHODS
from atp_viz.core.ranks import resolve_rank
from atp_viz.deploy import urlstate
from atp_viz.figures import maps
from atp_viz.hf.engine import BASIS_SOURCES

VIEW = "_view"
URL_PARAMS = (
    "model", "sample", "rank", "form", "basis", "method", "centre", "split", "layers", "lowrank", "layer",
    "head", "query", "scale", "sinks", "present",
)  # fmt: skip
RANK_UNITS = {"fraction": "fraction of L", "tokens": "tokens"}  # URL word -> the explorer's radio option
SAMPLE = "Sample"  # the text source whose choice (a sample's name) goes into links
OTHER = "__other__"  # the sidebar's "Other: a local folder or hub id" choice
_MISSING = object()
DEFAULTED = "_view_defaulted"  # the view's names that hold a default nobody chose (fit_view filled them in)


def view() -> dict[str, str]:
    """This session's view (the URL's strings); read from the URL on the session's first run."""
    ss = st.session_state
    if VIEW not in ss:
        qp = st.query_params
        ss[VIEW] = {name: qp[name] for name in URL_PARAMS if name in qp}
    return ss[VIEW]


def get(name: str) -> str | None:
    return view().get(name)


def put(name: str, value: Any) -> None:
    """Set one value of the view (None removes it); the URL follows at :func:`sync_url`. A value changed
    here is chosen: it no longer follows the model's or text's default (:func:`fit_view`). Setting the
    value the view holds changes nothing (clicking the selected query token again keeps the default)."""
    v = view()
    if value is not None and v.get(name) == str(value):
        return
    st.session_state.get(DEFAULTED, set()).discard(name)
    if value is None:
        v.pop(name, None)
    else:
        v[name] = str(value)


def set_url(**params: str | int | None) -> None:
    """Write values into the URL's query string (None removes a parameter); only changed values are
    sent to the browser."""
    for name, value in params.items():
        if value is None:
            if name in st.query_params:
                del st.query_params[name]
        elif st.query_params.get(name) != str(value):
            st.query_params[name] = str(value)


def sync_url() -> None:
    """The view into this page's URL: a page switch drops the query string, and a link must name the
    view on every page. A typed or uploaded text leaves no sample in the link; no "Other" model without
    its folder or hub id."""
    v = view()
    shown = {name: v.get(name) for name in URL_PARAMS}
    if st.session_state.get("text_source", SAMPLE) != SAMPLE:
        shown["sample"] = None
    if shown["model"] == OTHER:
        shown["model"] = None
    if shown["present"] != "1":
        shown["present"] = None
    set_url(**shown)


def _page_id() -> str:
    """The page this run draws (its script's hash; Streamlit puts it in every widget's identity)."""
    ctx = get_script_run_ctx()
    return ctx.page_script_hash if ctx else ""


def give(widget_key: str, value: Any) -> dict:
    """Give widget ``widget_key`` the value ``value`` before it is declared; returns the widget's ``key``
    and ``persist_state`` arguments. ``value`` must be one the widget accepts.

    Streamlit's ``persist_state="session"`` keeps the widget's value while it is not drawn (presenter
    mode, a run stopped early) and gives it back to the browser when the widget returns. The value is
    written here on the first run of a page (Streamlit gives a widget on another page another identity,
    whatever its key) and when it differs (the view changed elsewhere: a link, the tour, a unit switch),
    not on every run: a write marks the value as set by the script and the browser moves the widget to
    it, which would undo a second move the user made while the run ran."""
    drawn_on = st.session_state.setdefault("_given_on", {})
    page = _page_id()
    if drawn_on.get(widget_key) != page or st.session_state.get(widget_key, _MISSING) != value:
        st.session_state[widget_key] = value
    drawn_on[widget_key] = page
    return {"key": widget_key, "persist_state": "session"}


def bind(widget_key: str, name: str, value: Any, save: Callable[[Any], Any] = lambda x: x) -> dict:
    """:func:`give` widget ``widget_key`` the view's ``value`` and return the widget's ``key``,
    ``persist_state`` and ``on_change`` arguments: the callback writes ``save(new value)`` into the
    view's ``name`` before the rerun. Fit the view first (:func:`fit_view`), so that the value is one the
    widget accepts."""

    def _save() -> None:
        put(name, save(st.session_state[widget_key]))

    return {**give(widget_key, value), "on_change": _save}


def fit_view(n_tokens: int, n_layers: int, n_heads: int, is_decoder: bool) -> None:
    """Check the view against the current model and text; a value that does not fit (a link's typo, a
    shorter text, a model with fewer layers or heads) is replaced by its default, saying why."""
    shape = urlstate.ViewShape(
        n_tokens=n_tokens,
        n_layers=n_layers,
        n_heads=n_heads,
        forms=forms.names(),
        scales=tuple(maps.SCALES),
        default_layer=n_layers // 2,
        default_query=default_query(n_tokens, is_decoder),
        default_form=forms.DEFAULT,
        default_scale=maps.DEFAULT_SCALE,
        bases=tuple(BASIS_SOURCES),
        methods=METHODS,
    )
    # A default nobody chose (the middle layer, the text's default query) follows the model and the text
    # silently; only a value from the link or the user is checked and, when it no longer fits, named.
    defaulted = st.session_state.setdefault(DEFAULTED, set())
    chosen = {name: value for name, value in view().items() if name not in defaulted}
    fitted, problems = urlstate.fit_view(chosen, shape)
    defaulted.update(name for name in fitted if name not in chosen)
    first = not st.session_state.get("_view_fitted")  # the values came from the link
    if first:
        # Every link names the whole view, defaults included (sync_url), so a link's value that is this
        # model's and text's default is taken as one: after a reload, the middle layer still follows the
        # model. (A link's layer that differs from the default stays chosen.)
        defaults = urlstate.fit_view({}, shape)[0]
        defaulted.update(name for name in chosen if fitted.get(name) == defaults.get(name))
    view().clear()
    view().update(fitted)
    st.session_state["_view_fitted"] = True
    if problems:
        # Later, a value stops fitting because the model or text changed (or was typed): not a link's fault.
        lead = "The link's values that do not fit: defaults used instead of" if first else "Reset to fit"
        st.info(f"{lead}: " + " ".join(problems))


def rank(n_tokens: int) -> tuple[str, float | int]:
    """The view's rank as ``("fraction", f)`` or ``("tokens", r)`` (the view fits: :func:`fit_view`)."""
    return urlstate.parse_rank(get("rank") or urlstate.DEFAULT_RANK, n_tokens)


def rank_tokens(n_tokens: int) -> int:
    """The view's rank in tokens for a text of ``n_tokens`` (a share of L resolved as ATP resolves it)."""
    return resolve_rank(rank(n_tokens)[1], n_tokens)[0]


def index(name: str) -> int:
    return int(get(name) or 0)
