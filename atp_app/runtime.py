"""What a Streamlit process shares: the deployment settings, the heavy-job slot, and the caches of
models, captures, tokenisations and dense runs (one copy per process, shared by all sessions; ATP
settings are per call, so sharing a model is safe)."""

from __future__ import annotations

import os

import streamlit as st
import torch

from atp_app.widgets import progress
from atp_viz.analysis import compare, spectra
from atp_viz.analysis.capture import Capture, capture
from atp_viz.deploy import jobs
from atp_viz.deploy.settings import Settings, SettingsError, load_settings
from atp_viz.hf.engine import ATPConfig
from atp_viz.hf.model_info import LoadedModel
from atp_viz.hf.models import load_model
from atp_viz.text.inputs import Tokenized, tokenize


def one_thread_per_call() -> None:
    """Run torch with one intra-op thread in the app's process (``ATP_VIZ_TORCH_THREADS`` to change it).

    Every browser session runs its script in its own thread, so sessions already use the cores side by
    side; torch's default (a thread per core, spinning while it waits for the others) makes concurrent
    calls, or any other busy process, stall each other. Measured on this project's 2-core machine with
    another job running: one ATP forward of SmolLM2 at 256 tokens took 4 to 71 s with 2 threads, 1.3 s
    with 1. Called by ``app.py`` (no import side effects); new threads inherit the setting.
    """
    torch.set_num_threads(max(1, int(os.environ.get("ATP_VIZ_TORCH_THREADS", "1"))))


def current_settings() -> Settings:
    """This process's deployment settings (environment and ``ATP_VIZ_CONFIG``; see atp_viz.settings).

    Read on every call (a small file at most), so the page always shows what is enforced. An invalid
    configuration stops the page with the reason: serving unrestricted instead would be worse.
    """
    try:
        return load_settings()
    except SettingsError as err:
        st.error(f"This server's configuration is invalid, so nothing is loaded: {err}")
        st.stop()


def heavy_job(name: str):
    """A slot for one heavy job (sweep, perplexity, generation, benchmark) across all sessions.

    Use as ``with heavy_job("rank sweep"):`` inside the cached function that does the work (a cached
    result then needs no slot) and catch :class:`BusyError` where the result is shown.
    """
    return jobs.heavy_job(name, current_settings().max_heavy_jobs)


def get_model(key: str) -> LoadedModel:
    """One copy of each model per server process, shared by all sessions (ATP settings are per call).

    Loaded under the deployment's settings: in server mode the library itself refuses a model that
    is not on the list, and caps the tokens per text.
    """
    return _load_model(key, current_settings())


_loaded: set[str] = set()  # model keys this process has loaded (the cache below may have evicted some)


def was_loaded(key: str) -> bool:
    """Whether this server process has loaded ``key`` before (so a switch to it is quick)."""
    return key in _loaded


@st.cache_resource(show_spinner=False, max_entries=3)
def _load_model(key: str, settings: Settings) -> LoadedModel:
    with progress(f"Loading {key}...") as bar:
        loaded = load_model(key, progress=bar, settings=settings, **settings.load_kwargs())
    _loaded.add(key)
    return loaded


# Captures are frozen dataclasses of read-only arrays, so they are shared (cache_resource) rather
# than copied on every rerun (cache_data pickles; SmolLM2 at 2k tokens would copy ~500 MB per rerun).
@st.cache_resource(show_spinner="Running the model and capturing every layer...", max_entries=8)
def get_capture(model_key: str, text: str, attentions: str | tuple[int, ...] = "auto") -> Capture:
    return capture(get_model(model_key), text, attentions=attentions)


@st.cache_resource(show_spinner="Singular values of every layer...", max_entries=16)
def layer_spectra(
    model_key: str, text: str, resid: bool, centered: bool, skip_first: bool
) -> tuple[spectra.Spectrum, ...]:
    """Every layer's spectrum of the attention input X (or of the residual stream): once per text and
    choice, not on every rerun (30 SVDs for SmolLM2), shared like the capture they come from."""
    cap = get_capture(model_key, text)
    xs = [layer.resid if resid else layer.x for layer in cap.layers]
    return tuple(spectra.layer_spectra(xs, centered=centered, skip_first=skip_first))


@st.cache_resource(show_spinner=False, max_entries=8)
def tokenized(model_key: str, text: str) -> Tokenized:
    """The text tokenised for the model (truncated to its limit, with a notice)."""
    m = get_model(model_key)
    return tokenize(m.tokenizer, text, m.info.max_tokens)


@st.cache_resource(show_spinner="Dense reference run...", max_entries=8)
def dense_forward(model_key: str, text: str) -> compare.Forward:
    """The dense run of a text, computed once per (model, text) and shared by every page and session
    while only the rank or the form changes."""
    return compare.forward(get_model(model_key), tokenized(model_key, text))


# Each entry holds every layer's output (SmolLM2 at 2k tokens: about 140 MB): few entries, and they
# expire, so a class trying many settings does not fill the server's memory.
@st.cache_resource(show_spinner=False, max_entries=8, ttl=900)
def atp_forward(model_key: str, text: str, config: ATPConfig, map_layers: tuple[int, ...]) -> compare.Forward:
    """The ATP run of a text at one setting, recording ``map_layers``' maps: shared, so clicking a query
    token, changing the colour scale or reopening a page does not run the model again. An error (a form
    that breaks down) is raised every time, never cached."""
    loaded, tok = get_model(model_key), tokenized(model_key, text)
    with progress(f"ATP run ({config.label()}) on {tok.n_tokens:,} tokens...") as bar:
        return compare.forward(loaded, tok, config, map_layers=list(map_layers), progress=bar)
