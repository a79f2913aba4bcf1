"""What every page shares: cached model/capture loaders and the sidebar's model and text pickers.

Lives beside app.py, not in pages/ (one file per view). Only widgets, caching and library calls here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import streamlit as st

from atp_viz import models, texts
from atp_viz.capture import Capture, capture
from atp_viz.models import LoadedModel, ModelLoadError
from atp_viz.texts import TextError

OTHER = "__other__"


def use_this_navigation() -> None:
    """Make even the first session after server start use app.py's ``st.navigation``.

    Streamlit decides once per server process, before any script runs, whether the app uses its
    legacy ``pages/`` folder routing (it sees our ``pages/`` folder), and routes that first session
    through an auto-generated navigation that runs a page file without app.py (no page config, a
    menu listing every file). ``st.navigation`` clears that flag for later sessions; clearing it here
    and rerunning gives the first visitor the real app too. Internal API: see
    ``streamlit/runtime/pages_manager.py`` (``PagesManager.uses_pages_directory``).
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without this class: nothing to work around
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


DEFAULT_SAMPLE = "04_attention_explainer"


use_this_navigation()  # pages import this module first; see the docstring


@st.cache_resource(show_spinner=False, max_entries=3)
def get_model(key: str) -> LoadedModel:
    """One copy of each model per server process, shared by all sessions (ATP settings are per call)."""
    bar = st.progress(0.0, text=f"Loading {key}...")
    try:
        return models.load_model(key, progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg))
    finally:
        bar.empty()


# Captures are frozen dataclasses of read-only arrays, so they are shared (cache_resource) rather
# than copied on every rerun (cache_data pickles; SmolLM2 at 2k tokens would copy ~500 MB per rerun).
@st.cache_resource(show_spinner="Running the model and capturing every layer...", max_entries=8)
def get_capture(model_key: str, text: str, attentions: str | tuple[int, ...] = "auto") -> Capture:
    return capture(get_model(model_key), text, attentions=attentions)


@dataclass(frozen=True)
class Selection:
    model_key: str
    text: str
    text_label: str


def _model_label(key: str) -> str:
    for c in models.BUNDLED + models.TINY:
        if c.key == key:
            return c.label
    return "Other: a local folder or hub id..." if key == OTHER else key


def sidebar() -> Selection | None:
    """Model and text pickers; returns None (after showing why) when there is nothing valid to show."""
    sb = st.sidebar
    sb.header("Model and text")
    options = [c.key for c in models.BUNDLED] + [c.key for c in models.TINY] + [OTHER]
    qp_model = st.query_params.get("model")
    if "model_choice" not in st.session_state:
        st.session_state.model_choice = qp_model if qp_model in options else models.DEFAULT_MODEL
    choice = sb.selectbox("Model", options, format_func=_model_label, key="model_choice")
    model_key = choice
    if choice == OTHER:
        model_key = sb.text_input(
            "Local folder or hub id",
            key="other_model",
            placeholder="/path/to/model or org/name",
            help="safetensors or GGUF weights only; code from the model's repository is never run.",
        ).strip()
        if not model_key:
            sb.info("Enter a folder or hub id to load another model.")
            return None
    source = sb.radio("Text", ["Sample", "Type", "Upload"], horizontal=True, key="text_source")
    label = source.lower()
    if source == "Sample":
        ss = texts.samples()
        names = [s.name for s in ss]
        if "sample" not in st.session_state:
            qp = st.query_params.get("sample")
            st.session_state.sample = (
                qp if qp in names else (DEFAULT_SAMPLE if DEFAULT_SAMPLE in names else names[0])
            )
        name = sb.selectbox("Sample (data/)", names, key="sample", format_func=lambda n: n.replace("_", " "))
        text = next(s for s in ss if s.name == name).read()
        label = name
    elif source == "Type":
        text = sb.text_area("Your text", key="typed_text", height=180, placeholder="Type or paste text here")
    else:
        up = sb.file_uploader("A UTF-8 .txt file (at most 1 MB)", type=["txt"], key="upload")
        if up is None:
            sb.info("Choose a .txt file.")
            return None
        try:
            text = texts.decode_upload(up.getvalue(), up.name)
        except TextError as err:
            sb.error(str(err))
            return None
        label = up.name
    try:
        texts.validate_text(text)
    except TextError as err:
        st.warning(str(err))
        return None
    return Selection(model_key=model_key, text=text, text_label=label)


def load_or_explain(sel: Selection) -> tuple[LoadedModel, Capture] | None:
    """The model and the capture of the selected text, or None after showing a clear message."""
    try:
        loaded = get_model(sel.model_key)
    except ModelLoadError as err:
        st.error(str(err))
        return None
    try:
        cap = get_capture(sel.model_key, sel.text)
    except TextError as err:
        st.warning(str(err))
        return None
    for note in cap.notes:
        st.info(note)
    return loaded, cap


def page_inputs() -> tuple[Selection, LoadedModel, Capture]:
    """The sidebar's selection, its model and capture; stops the page (after saying why) if none."""
    sel = sidebar()
    if sel is None:
        st.stop()
    result = load_or_explain(sel)
    if result is None:
        st.stop()
    loaded, cap = result
    return sel, loaded, cap


def highlight_divergence(pieces: list[str], first: int | None) -> str:
    """Markdown of decoded tokens with the first diverging one highlighted; markdown characters in
    the tokens are escaped so generated text cannot break the formatting."""
    esc = [re.sub(r"([\\`*_{}\[\]()#+\-.!|$<>~:])", r"\\\1", t) for t in pieces]
    if first is None or first >= len(esc):
        return "".join(esc)
    return "".join(esc[:first]) + f":red-background[{esc[first]}]" + "".join(esc[first + 1 :])


def model_caption(loaded: LoadedModel) -> str:
    i = loaded.info
    kind = "decoder (causal LM)" if i.is_decoder else "encoder"
    gqa = f", {i.n_kv_heads} key/value heads (GQA)" if i.n_kv_heads != i.n_heads else ""
    rope = ", rotary positions" if i.has_rope else ""
    return (
        f"**{i.label}**: {kind}, {i.n_layers} layers, {i.n_heads} heads{gqa}, d = {i.d_model}, "
        f"head size {i.head_dim}{rope}, {i.n_params / 1e6:.1f} M parameters, up to {i.max_tokens:,} tokens. "
        f"Weights: {i.source}."
    )
