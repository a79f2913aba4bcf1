"""The sidebar every page shows: the model and text pickers, and loading them with clear messages."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from atp_app import runtime, state
from atp_app.runtime import current_settings, get_capture, get_model
from atp_app.state import OTHER
from atp_viz.analysis.capture import Capture
from atp_viz.core.units import format_bytes
from atp_viz.deploy import urlstate
from atp_viz.deploy.settings import Settings
from atp_viz.hf import checkpoints, tuned
from atp_viz.hf.model_info import BUNDLED, DEFAULT_MODEL, TINY, TUNED_PREFIX, LoadedModel, ModelLoadError
from atp_viz.text import inputs as texts
from atp_viz.text.inputs import TextError

DEFAULT_SAMPLE = "04_attention_explainer"
UPLOAD = "_upload"  # (text, file name) of this session's upload


def _resolve_model(raw: str | None, options: list[str], default: str, settings: Settings) -> tuple[str, str]:
    """The sidebar's model choice for the view's model, and the "Other" field's text: a model offered
    here, "Other" with a hub id or folder, or the default, saying why (a link's unknown model)."""
    raw = (raw or "").strip() or None  # an empty ``model=`` is no model: the default, not an empty "Other"
    if raw is not None and raw.startswith(TUNED_PREFIX) and not settings.server_mode:
        raw = _tuned_choice(raw, options)
    if raw is None or raw in options:
        return raw or default, ""
    if settings.server_mode:
        st.warning(
            f"The link asks for a model this server does not offer. {settings.model_refusal(raw)} "
            f"Showing {default} instead."
        )
    elif (
        urlstate.looks_like_model_id(raw)
        or raw.startswith(TUNED_PREFIX)  # a finished run outside the places the list reads
        or raw == st.session_state.get("other_model", "").strip()
    ):
        # a hub id or folder, or what the user typed in the "Other" field (hub ids such as "gpt2" have no
        # slash): the field keeps it and loads it, or explains why it cannot
        return OTHER, raw
    else:
        st.info(
            f"The link's model '{raw}' is not a bundled model, a hub id (org/name) or a folder; "
            f"showing {default} instead."
        )
    state.put("model", default)
    return default, ""


def _tuned_choice(raw: str, options: list[str]) -> str | None:
    """A link's tuned run, however its folder is written (``tuned:data/tuned/NAME``, an absolute path): the
    sidebar's entry for it, the key itself for a finished run found elsewhere (the "Other" field loads
    it), or None after saying why it cannot be shown."""
    folder = tuned.run_folder(raw.removeprefix(TUNED_PREFIX))
    if not folder.is_dir():
        st.info(f"The tuned run {folder} is not on this machine; showing the default model instead.")
        return None
    try:
        meta = tuned.read_settings(folder)
    except ModelLoadError as err:
        st.info(f"The tuned run cannot be shown: {err} Showing the default model instead.")
        return None
    key = tuned.run_key(folder)
    if key in options:
        return key
    if "metrics" not in meta:
        st.info(f"The tuned run {folder} has not finished; showing the default model instead.")
        return None
    return raw


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
        tuned.run_key(path): f"{tuned.tuned_label(meta)} · {path.name}" for path, meta in tuned.find_runs()
    }
    return [c.key for c in BUNDLED] + [c.key for c in TINY] + [*runs, OTHER], runs


def _model_picker(settings: Settings) -> str | None:
    """The model key picked in the sidebar (the view's model: from the link on a session's first run)."""
    sb = st.sidebar
    if settings.server_mode:
        sb.caption(settings.describe())
    options, runs = _model_options(settings)
    default = DEFAULT_MODEL if DEFAULT_MODEL in options else options[0]
    choice, other = _resolve_model(state.get("model"), options, default, settings)
    if choice != OTHER:
        state.put("model", choice)
    choice = sb.selectbox(
        "Model",
        options,
        format_func=lambda k: runs.get(k) or _model_label(k),
        **state.bind("model_choice", "model", choice),
    )
    if choice != OTHER:
        return choice
    key = sb.text_input(
        "Local folder or hub id",
        placeholder="/path/to/model or org/name",
        help="safetensors or GGUF weights only; code from the model's repository is never run.",
        **state.bind("other_model", "model", other, lambda t: t.strip() or OTHER),
    ).strip()
    if not key:
        sb.info("Enter a folder or hub id to load another model.")
        return None
    return key


def _sample_picker() -> tuple[str, str]:
    """(text, sample name) of the bundled sample picked (the view's sample: from the link at first)."""
    samples = texts.samples()
    names = [s.name for s in samples]
    default_sample = DEFAULT_SAMPLE if DEFAULT_SAMPLE in names else names[0]
    name = state.get("sample")
    if name is not None and name not in names:
        st.info(f"The link's sample '{name}' is not one of the samples in data/; showing {default_sample}.")
    name = name if name in names else default_sample
    state.put("sample", name)
    name = st.sidebar.selectbox(
        "Sample (data/)",
        names,
        format_func=lambda n: n.replace("_", " "),
        **state.bind("sample", "sample", name),
    )
    return next(s for s in samples if s.name == name).read(), name


def _forget_upload() -> None:
    if st.session_state.get("upload") is None:  # the user removed the file (not a page switch)
        st.session_state.pop(UPLOAD, None)


def _uploaded(settings: Settings) -> tuple[str, str] | None:
    """(text, file name) of the uploaded file, or of the one uploaded earlier in this session (Streamlit
    forgets an uploader's file on a page that does not draw it; uploads stay out of links)."""
    limit = settings.max_upload_bytes
    up = st.sidebar.file_uploader(
        f"A UTF-8 .txt file (at most {format_bytes(limit)})",
        type=["txt"],
        key="upload",
        on_change=_forget_upload,
        # Streamlit's own limit (MiB, checked before the upload reaches us) just above ours.
        max_upload_size=max(1, -(-limit // 2**20)),
    )
    if up is not None:
        try:
            text = texts.decode_upload(up.getvalue(), up.name, max_bytes=limit)
        except TextError as err:
            st.sidebar.error(str(err))
            return None
        st.session_state[UPLOAD] = (text, up.name)
        return text, up.name
    if UPLOAD in st.session_state:
        text, name = st.session_state[UPLOAD]
        st.sidebar.caption(f"Using {name}, uploaded earlier in this session; choose a file to replace it.")
        return text, name
    st.sidebar.info("Choose a .txt file.")
    return None


def _typed(settings: Settings) -> tuple[str, str] | None:
    """(text, "type") typed in the sidebar (kept for the session, never put in links), or None."""
    limit = settings.max_upload_bytes
    # No max_chars: the browser would cut a long paste silently; it is refused here instead.
    text = st.sidebar.text_area(
        "Your text",
        height=180,
        placeholder="Type or paste text here",
        key="typed_text",
        persist_state="session",
    )
    if len(text.encode("utf-8")) > limit:
        st.warning(
            f"The typed text is {format_bytes(len(text.encode('utf-8')))}; this server takes at most "
            f"{format_bytes(limit)}. Shorten it or pick a sample."
        )
        return None
    return text, "type"


def presenter_toggle() -> None:
    """Presenter mode for every page (large type for a projector; in links as ``present=1``)."""
    on = state.get("present") == "1"
    st.sidebar.toggle(
        "Presenter mode",
        help="Large type on every page, for a projector; the link carries it (present=1).",
        **state.bind("present_sidebar", "present", on, lambda v: "1" if v else None),
    )


def sidebar() -> Selection | None:
    """Model and text pickers; returns None (after showing why) when there is nothing valid to show.

    The model and the sample are the view's (:mod:`atp_app.state`: from the link on a session's first
    run, kept across pages, in every page's link). In server mode only the allowed models are offered.
    """
    settings = current_settings()
    st.sidebar.header("Model and text")
    model_key = _model_picker(settings)
    if model_key is None:
        return None
    source = st.sidebar.radio(
        "Text", [state.SAMPLE, "Type", "Upload"], horizontal=True, key="text_source", persist_state="session"
    )
    state.sync_url()  # a typed or uploaded text takes the sample out of the link at once
    if source == state.SAMPLE:
        picked = _sample_picker()
    else:
        picked = _typed(settings) if source == "Type" else _uploaded(settings)
    presenter_toggle()
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
    info = cap.info
    state.fit_view(cap.n_tokens, info.n_layers, info.n_heads, info.is_decoder)
    state.sync_url()
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


DECODER = "smollm2"  # the bundled decoder a page that needs one offers


def _load_time(key: str) -> str:
    if runtime.was_loaded(key):
        return "It was loaded on this server already: switching takes a moment."
    if checkpoints.smollm2_converted():
        return "Loading it takes about 3 s (plus about 1 s to read this text)."
    return (
        "Loading it takes about 20 s this first time (its GGUF file is converted once into a cache), "
        "about 3 s afterwards."
    )


def offer_decoder(loaded: LoadedModel, what: str) -> None:
    """For a page that needs a decoder, on an encoder: say so, and offer a one-click switch to the bundled
    decoder (SmolLM2) with how long it takes to load (measured on this project's 2-core machine)."""
    settings = current_settings()
    st.info(f"{loaded.info.label} is an encoder; {what} needs a decoder (a causal language model).")
    if settings.server_mode and DECODER not in settings.allowed_models:
        st.caption("This server does not offer a decoder.")
        return
    st.button(
        "Switch to SmolLM2 (decoder)",
        key="switch_to_decoder",
        type="primary",
        icon=":material/swap_horiz:",
        on_click=state.put,
        args=("model", DECODER),
    )
    st.caption(f"SmolLM2-135M-Instruct: a Llama-style decoder, 30 layers. {_load_time(DECODER)}")
