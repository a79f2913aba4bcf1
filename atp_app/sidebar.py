"""The sidebar every page shows: the model and text pickers, and loading them with clear messages."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from atp_app.runtime import current_settings, get_capture, get_model
from atp_app.state import set_url
from atp_viz.analysis.capture import Capture
from atp_viz.core.units import format_bytes
from atp_viz.deploy import urlstate
from atp_viz.deploy.settings import Settings
from atp_viz.hf import tuned
from atp_viz.hf.model_info import BUNDLED, DEFAULT_MODEL, TINY, TUNED_PREFIX, LoadedModel, ModelLoadError
from atp_viz.text import inputs as texts
from atp_viz.text.inputs import TextError

OTHER = "__other__"
DEFAULT_SAMPLE = "04_attention_explainer"


def _model_from_url(options: list[str], default: str, settings: Settings) -> str:
    """The sidebar's first model: ?model= when it is offered here, else the default (saying why)."""
    raw = (st.query_params.get("model") or "").strip()
    if not raw or raw in options:
        return raw or default
    if settings.server_mode:
        st.warning(
            f"The link asks for a model this server does not offer. {settings.model_refusal(raw)} "
            f"Showing {default} instead."
        )
        return default
    if urlstate.looks_like_model_id(raw):
        st.session_state.other_model = raw  # a hub id or folder: the "Other" field loads (or explains) it
        return OTHER
    st.info(
        f"The link's model '{raw}' is not a bundled model, a hub id (org/name) or a folder; "
        f"showing {default} instead."
    )
    return default


@dataclass(frozen=True)
class Selection:
    model_key: str
    text: str
    text_label: str


def _model_label(key: str) -> str:
    for c in BUNDLED + TINY:
        if c.key == key:
            return c.label
    return "Other: a local folder or hub id..." if key == OTHER else key


def _model_options(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The models offered, and labels of the fine-tuning runs among them (none in server mode)."""
    if settings.server_mode:
        return list(settings.allowed_models), {}  # no "Other": local paths and unlisted ids are refused
    # Finished fine-tuning runs, labelled once per rerun; the folder name tells apart runs of the same
    # setting (other steps, adapter rank, seed).
    runs = {
        f"{TUNED_PREFIX}{path}": f"{tuned.tuned_label(meta)} · {path.name}"
        for path, meta in tuned.find_runs()
    }
    return [c.key for c in BUNDLED] + [c.key for c in TINY] + [*runs, OTHER], runs


def _model_picker(settings: Settings) -> str | None:
    """The model key picked in the sidebar (read from ?model= on a session's first run), or None."""
    sb = st.sidebar
    if settings.server_mode:
        sb.caption(settings.describe())
    options, runs = _model_options(settings)
    default = DEFAULT_MODEL if DEFAULT_MODEL in options else options[0]
    if "model_choice" not in st.session_state:
        st.session_state.model_choice = _model_from_url(options, default, settings)
    elif st.session_state.model_choice not in options:  # the settings changed under this session
        st.session_state.model_choice = default
    choice = sb.selectbox(
        "Model", options, format_func=lambda k: runs.get(k) or _model_label(k), key="model_choice"
    )
    if choice != OTHER:
        set_url(model=choice)
        return choice
    key = sb.text_input(
        "Local folder or hub id",
        key="other_model",
        placeholder="/path/to/model or org/name",
        help="safetensors or GGUF weights only; code from the model's repository is never run.",
    ).strip()
    if not key:
        sb.info("Enter a folder or hub id to load another model.")
        set_url(model=None)
        return None
    set_url(model=key)
    return key


def _sample_picker() -> tuple[str, str]:
    """(text, sample name) of the bundled sample picked (read from ?sample= on the first run)."""
    samples = texts.samples()
    names = [s.name for s in samples]
    if "sample" not in st.session_state:
        default_sample = DEFAULT_SAMPLE if DEFAULT_SAMPLE in names else names[0]
        qp = st.query_params.get("sample")
        if qp is not None and qp not in names:
            st.info(f"The link's sample '{qp}' is not one of the samples in data/; showing {default_sample}.")
        st.session_state.sample = qp if qp in names else default_sample
    name = st.sidebar.selectbox(
        "Sample (data/)", names, key="sample", format_func=lambda n: n.replace("_", " ")
    )
    set_url(sample=name)
    return next(s for s in samples if s.name == name).read(), name


def _typed_or_uploaded(source: str, settings: Settings) -> tuple[str, str] | None:
    """(text, label) typed or uploaded, or None after saying why; never put in links."""
    set_url(sample=None)
    sb = st.sidebar
    limit = settings.max_upload_bytes
    if source == "Type":
        # No max_chars: the browser would cut a long paste silently; it is refused here instead.
        text = sb.text_area("Your text", key="typed_text", height=180, placeholder="Type or paste text here")
        if len(text.encode("utf-8")) > limit:
            st.warning(
                f"The typed text is {format_bytes(len(text.encode('utf-8')))}; this server takes at most "
                f"{format_bytes(limit)}. Shorten it or pick a sample."
            )
            return None
        return text, "type"
    up = sb.file_uploader(
        f"A UTF-8 .txt file (at most {format_bytes(limit)})",
        type=["txt"],
        key="upload",
        # Streamlit's own limit (MiB, checked before the upload reaches us) just above ours.
        max_upload_size=max(1, -(-limit // 2**20)),
    )
    if up is None:
        sb.info("Choose a .txt file.")
        return None
    try:
        return texts.decode_upload(up.getvalue(), up.name, max_bytes=limit), up.name
    except TextError as err:
        sb.error(str(err))
        return None


def sidebar() -> Selection | None:
    """Model and text pickers; returns None (after showing why) when there is nothing valid to show.

    The model and the sample are read from the URL (?model=, ?sample=) on a session's first run and
    written back whenever they change. In server mode only the allowed models are offered.
    """
    settings = current_settings()
    st.sidebar.header("Model and text")
    model_key = _model_picker(settings)
    if model_key is None:
        return None
    source = st.sidebar.radio("Text", ["Sample", "Type", "Upload"], horizontal=True, key="text_source")
    picked = _sample_picker() if source == "Sample" else _typed_or_uploaded(source, settings)
    if picked is None:
        return None
    text, label = picked
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
