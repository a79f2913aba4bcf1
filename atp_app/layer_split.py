"""The explorer's "ranks per layer" choice: the same r in every layer, or the same budget shared out over
the layers (from the spectra, by what each layer's rank costs the output, or as a tuned run was trained),
with the shares it chose said next to it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from atp_app import runtime, state, widgets
from atp_viz.analysis import allocation
from atp_viz.analysis.finetune.config import LAYER_RANK_SOURCES
from atp_viz.core.ranks import format_layer_shares
from atp_viz.deploy import urlstate
from atp_viz.deploy.jobs import BusyError
from atp_viz.hf import tuned
from atp_viz.hf.model_info import TUNED_PREFIX, ModelInfo, ModelLoadError

ONE, SPECTRUM, MEASURED, AS_TUNED = urlstate.SPLITS  # the radio's values are the link's words


@dataclass(frozen=True)
class Split:
    shares: tuple[float, ...] | None = None  # None: the slider's one rank in every layer
    note: str = ""  # the shares, said for the page
    budget: float | None = None  # the shares' mean, when it is not the slider's rank (as tuned, rounded)


def _trained_shares(model_key: str) -> tuple[float, ...]:
    """The per-layer shares a tuned run was trained with (empty for any other model)."""
    if not model_key.startswith(TUNED_PREFIX):
        return ()
    try:
        return tuple(
            tuned.read_settings(model_key.removeprefix(TUNED_PREFIX))["settings"].get("layer_ranks") or ()
        )
    except (ModelLoadError, KeyError):
        return ()


def _choices(info: ModelInfo, trained: tuple[float, ...]) -> dict[str, str]:
    out = {ONE: "the same r in every layer"}
    out[SPECTRUM] = f"one budget, {LAYER_RANK_SOURCES['spectrum'].split(' (')[0]}"
    if not info.is_decoder:  # the measured loss is the sentence embedding's cosine
        out[MEASURED] = f"one budget, {LAYER_RANK_SOURCES['measured'].split(' (')[0]}"
    if trained:
        out[AS_TUNED] = f"as this model was tuned ({format_layer_shares(trained)} of L)"
    return out


# Why a choice made on another model is not offered on this one.
_UNAVAILABLE = {
    MEASURED: "Measured per-layer ranks are for encoders (their loss is the sentence embedding's cosine)",
    AS_TUNED: "This model was not tuned with per-layer ranks",
}


@st.cache_resource(show_spinner=False, max_entries=16)
def _measurement(model_key: str, how: str, form: str, basis_source: str, centre: bool) -> np.ndarray:
    """The budget-free measurement a split is chosen from, once per server (and kept on disk by the
    library, so a restart reads it back)."""
    with (
        runtime.heavy_job("choosing per-layer ranks"),
        widgets.progress("Choosing per-layer ranks...") as bar,
    ):
        return allocation.split_measurement(
            how,
            runtime.get_model(model_key),
            form=form,
            basis_source=basis_source,
            centre_basis=centre,
            progress=bar,
        )


def layer_shares(
    column, model_key: str, info: ModelInfo, budget: float, form: str, basis_source: str, centre: bool
) -> Split:
    """The radio in ``column`` and what it chose. ``budget`` is the slider's rank as a share of L. A busy
    server is said on the page and falls back to one rank."""
    trained = _trained_shares(model_key)
    choices = _choices(info, trained)
    wanted = state.get("split") or ONE  # the view's: a link's, or chosen on another model
    if wanted not in choices:  # chosen on another model, which offered it
        column.info(f"{_UNAVAILABLE.get(wanted, 'That choice')}: one rank in every layer instead.")
        state.put("split", ONE)
        wanted = ONE
    how = column.radio(
        "Ranks per layer",
        list(choices),
        format_func=choices.get,
        **state.bind("layer_split", "split", wanted),
        help="The same budget (mean share of L over the layers) shared out where it costs least. "
        "'spectra': where each layer's attention input keeps the most energy (any model); 'measured': "
        "what each layer's rank costs the sentence embedding, each layer alone at 1/8 ... 1 of L on 32 "
        "training-split texts (encoders; about 40 s the first time on MiniLM per form and basis). Both are "
        "chosen on training text, never on the text shown.",
    )
    if how == ONE or how not in choices:
        return Split()
    if how == AS_TUNED:
        mean = float(np.mean(trained))
        note = (
            f"Each layer's share of L as tuned: {format_layer_shares(trained)} (mean {mean:.3g}); the rank "
        )
        return Split(trained, note + "slider is set aside.", mean)
    try:
        # The spectra do not depend on the form: one measurement serves every form.
        found = _measurement(model_key, how, form if how == MEASURED else "exact", basis_source, centre)
    except BusyError as err:
        st.warning(f"{err} Showing one rank in every layer meanwhile.")
        return Split()
    except ValueError as err:  # e.g. a model whose tokenizer leaves no calibration text
        st.error(f"Cannot choose per-layer ranks for this model: {err} Showing one rank in every layer.")
        state.put("split", ONE)  # so that a link shared now names what is shown
        return Split()
    shares = allocation.split_budget(how, found, budget)
    note = f"Each layer's share of L: {format_layer_shares(shares)} (mean {np.mean(shares):.3g})"
    mean = float(np.mean(shares))
    if abs(mean - budget) <= 1e-9:
        return Split(shares, note + ".")
    step = "1/8" if how == MEASURED else "1/64"
    note += f"; the split works in steps of {step} of L, so the budget {budget:.3g} became {mean:.3g}"
    return Split(shares, note + ".", mean)


def grid_choice(column, model_key: str, info: ModelInfo) -> tuple[str, float | None]:
    """The Serving page's "ranks per layer" for its perplexity grid, as the library's ``how`` and
    ``budget`` (:func:`atp_viz.analysis.allocation.budget_splitter`): "" (one rank), "spectrum" (every
    share of L split), or, for a run tuned per layer, its shares for the rank it was tuned at only."""
    trained = _trained_shares(model_key)
    choices = {k: v for k, v in _choices(info, trained).items() if k != MEASURED}
    how = column.radio(
        "Ranks per layer",
        list(choices),
        index=list(choices).index(AS_TUNED if trained else ONE),
        format_func=choices.get,
        key="ppl_layer_split",
        horizontal=True,
        help="For each rank given as a share of L: the same share in every layer, or that budget (the mean "
        "over the layers) shared out where each layer's past keeps the most energy (chosen on training "
        "text), or as a run tuned per layer was tuned (its own budget only; other ranks keep one share). "
        "Key counts keep one rank; each row lists the shares it used.",
    )
    if how == AS_TUNED:
        return format_layer_shares(trained), tuned.settings_of(model_key)["rank"]
    return (how if how == SPECTRUM else ""), None
