"""What every page shares: cached model/capture loaders and the sidebar's model and text pickers.

Lives beside app.py, not in pages/ (one file per view). Only widgets, caching and library calls here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import streamlit as st

from atp_viz import finetune, jobs, models, texts, urlstate
from atp_viz.capture import Capture, capture
from atp_viz.models import LoadedModel, ModelLoadError
from atp_viz.settings import Settings, SettingsError, format_bytes, load_settings
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


@st.cache_resource(show_spinner=False, max_entries=3)
def _load_model(key: str, settings: Settings) -> LoadedModel:
    bar = st.progress(0.0, text=f"Loading {key}...")
    try:
        return models.load_model(
            key,
            progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg),
            settings=settings,
            **settings.load_kwargs(),
        )
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


def set_url(**params: str | int | None) -> None:
    """Write the view into the URL's query string (None removes a parameter), so that a copied link
    reproduces it; only changed values are sent to the browser."""
    for name, value in params.items():
        if value is None:
            if name in st.query_params:
                del st.query_params[name]
        elif st.query_params.get(name) != str(value):
            st.query_params[name] = str(value)


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
            "form": lambda raw: urlstate.parse_choice(raw, urlstate.FORMS, "form"),
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


def sidebar() -> Selection | None:
    """Model and text pickers; returns None (after showing why) when there is nothing valid to show.

    The model and the sample are read from the URL (?model=, ?sample=) on a session's first run and
    written back whenever they change. In server mode only the allowed models are offered.
    """
    settings = current_settings()
    sb = st.sidebar
    sb.header("Model and text")
    tuned: dict[str, str] = {}  # fine-tuning runs offered (none in server mode): key -> label
    if settings.server_mode:
        options = list(settings.allowed_models)  # no "Other": local paths and unlisted ids are refused
        sb.caption(settings.describe())
    else:
        options = [c.key for c in models.BUNDLED] + [c.key for c in models.TINY]
        # Finished fine-tuning runs, labelled once per rerun; the folder name tells apart runs of the same
        # setting (other steps, adapter rank, seed).
        tuned = {
            f"{finetune.TUNED_PREFIX}{path}": f"{finetune.tuned_label(meta)} · {path.name}"
            for path, meta in finetune.find_runs()
        }
        options += [*tuned, OTHER]
    default = models.DEFAULT_MODEL if models.DEFAULT_MODEL in options else options[0]
    if "model_choice" not in st.session_state:
        st.session_state.model_choice = _model_from_url(options, default, settings)
    elif st.session_state.model_choice not in options:  # the settings changed under this session
        st.session_state.model_choice = default
    choice = sb.selectbox(
        "Model", options, format_func=lambda k: tuned.get(k) or _model_label(k), key="model_choice"
    )
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
            set_url(model=None)
            return None
    set_url(model=model_key)
    source = sb.radio("Text", ["Sample", "Type", "Upload"], horizontal=True, key="text_source")
    label = source.lower()
    if source == "Sample":
        ss = texts.samples()
        names = [s.name for s in ss]
        if "sample" not in st.session_state:
            default_sample = DEFAULT_SAMPLE if DEFAULT_SAMPLE in names else names[0]
            qp = st.query_params.get("sample")
            if qp is not None and qp not in names:
                st.info(
                    f"The link's sample '{qp}' is not one of the samples in data/; showing {default_sample}."
                )
            st.session_state.sample = qp if qp in names else default_sample
        name = sb.selectbox("Sample (data/)", names, key="sample", format_func=lambda n: n.replace("_", " "))
        text = next(s for s in ss if s.name == name).read()
        label = name
        set_url(sample=name)
    elif source == "Type":
        set_url(sample=None)  # typed and uploaded texts are not put in links
        text = sb.text_area(
            "Your text",
            key="typed_text",
            height=180,
            placeholder="Type or paste text here",
        )  # no max_chars: the browser would cut a long paste silently; it is refused below instead
        if len(text.encode("utf-8")) > settings.max_upload_bytes:
            st.warning(
                f"The typed text is {format_bytes(len(text.encode('utf-8')))}; this server takes at most "
                f"{format_bytes(settings.max_upload_bytes)}. Shorten it or pick a sample."
            )
            return None
    else:
        set_url(sample=None)
        up = sb.file_uploader(
            f"A UTF-8 .txt file (at most {format_bytes(settings.max_upload_bytes)})",
            type=["txt"],
            key="upload",
            # Streamlit's own limit (MiB, checked before the upload reaches us) just above ours.
            max_upload_size=max(1, -(-settings.max_upload_bytes // 2**20)),
        )
        if up is None:
            sb.info("Choose a .txt file.")
            return None
        try:
            text = texts.decode_upload(up.getvalue(), up.name, max_bytes=settings.max_upload_bytes)
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


# ------------------------------------------------------------------------------------------------
# Downloads (exports are made by atp_viz.export; here only the buttons)
# ------------------------------------------------------------------------------------------------


def _file_stem(name: str) -> str:
    """A safe file name stem (and widget key part) from a figure or table name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    if not stem:
        raise ValueError(f"A download needs a name with letters or digits, got {name!r}.")
    return stem


def figure_downloads(fig, name: str) -> None:
    """PNG / SVG / HTML download buttons for one figure, in a compact "Download figure" popover.

    ``name`` is the file name stem and must be unique on the page (it keys the widgets; the popover
    gets the CSS class ``st-key-dl_<name>``). The files are made only when a button is clicked
    (Streamlit runs the ``data`` callable then, on its own thread), so reruns never pay for kaleido
    (about 0.3 s per image, 2-3 s for the first one while Chromium starts) or for the 4.8 MB HTML.
    Without Chromium the popover says why instead of offering PNG and SVG; HTML always works.
    """
    from atp_viz import export

    stem = _file_stem(name)
    with st.popover("Download figure", icon=":material/download:", key=f"dl_{stem}"):
        problem = export.static_export_problem()
        if problem:
            st.caption(problem)
        else:
            st.download_button(
                "PNG (2x)",
                lambda: export.figure_png(fig),
                file_name=f"{stem}.png",
                mime="image/png",
                key=f"dl_{stem}_png",
                on_click="ignore",
            )
            st.download_button(
                "SVG",
                lambda: export.figure_svg(fig),
                file_name=f"{stem}.svg",
                mime="image/svg+xml",
                key=f"dl_{stem}_svg",
                on_click="ignore",
            )
        st.download_button(
            "HTML (interactive, works offline)",
            lambda: export.figure_html(fig),
            file_name=f"{stem}.html",
            mime="text/html",
            key=f"dl_{stem}_html",
            on_click="ignore",
        )


def table_downloads(rows: list[dict], name: str) -> None:
    """CSV and JSON download buttons for a table or a set of metrics (a list of flat dicts).

    Tables are small, so both files are made right away; a table that cannot be exported shows why.
    ``name`` is the file name stem and must be unique on the page (popover class ``st-key-dl_<name>``).
    """
    from atp_viz import export

    stem = _file_stem(name)
    with st.popover("Download table", icon=":material/download:", key=f"dl_{stem}"):
        for label, make, ext, mime in (
            ("CSV", export.table_csv, "csv", "text/csv"),
            ("JSON", export.table_json, "json", "application/json"),
        ):
            try:
                data = make(rows)
            except export.ExportError as err:
                st.caption(f"{label}: {err}")
                continue
            st.download_button(
                label, data, file_name=f"{stem}.{ext}", mime=mime, key=f"dl_{stem}_{ext}", on_click="ignore"
            )
