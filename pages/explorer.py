"""Rank explorer: drag the rank, see ATP next to dense attention on the same text."""

from dataclasses import replace

import pandas as pd
import streamlit as st

from atp_app import layer_split, navigation, runtime, state, widgets
from atp_app.sidebar import page_inputs
from atp_viz import forms
from atp_viz.analysis import compare, token_view
from atp_viz.core.basis import METHOD_LABELS, METHODS, NonFiniteError
from atp_viz.core.ranks import format_layer_shares, parse_layers, resolve_rank
from atp_viz.deploy import urlstate
from atp_viz.deploy.jobs import BusyError
from atp_viz.figures import maps as maps_fig
from atp_viz.figures import plots
from atp_viz.figures import tokens as tokens_fig
from atp_viz.hf import tuned
from atp_viz.hf.engine import BASIS_SOURCES, ATPConfig
from atp_viz.hf.model_info import TUNED_PREFIX, ModelLoadError
from atp_viz.outputs import export
from atp_viz.text.inputs import readable_tokens

navigation.use_this_navigation()
st.title("Rank explorer: ATP vs dense")
INTRO = (
    "**ATP** keeps the top-r principal directions of each layer's input X (L tokens) and attends over "
    "r *principal keys* K' = U_r^T K instead of L tokens. The forms: "
    + "; ".join(f"**{n}**, {forms.get(n).description}" for n in forms.names())
    + ". The paper's accuracy figures (about the same as dense at r = L/2, about 2% lower at L/4) were "
    "measured **after fine-tuning** with ATP in place; a pretrained model run through any form "
    "untouched, as here, loses much more, and the linear form much more than the exact one."
)
if not widgets.presenting():  # presenter mode: the controls and numbers above the fold
    st.markdown(INTRO)

MAX_PILLS = 600  # up to this many tokens the query is clicked in the text; beyond, typed as a number

sel, loaded, cap = page_inputs()
info = cap.info
L = cap.n_tokens
READABLE = readable_tokens(cap.tokens)


PILL_LABELS = widgets.unique_labels(READABLE)


@st.cache_resource(show_spinner=False, max_entries=16)
def _sweep(model_key: str, text: str, base: ATPConfig) -> compare.Sweep:
    m = runtime.get_model(model_key)
    tok = runtime.tokenized(model_key, text)
    with runtime.heavy_job("rank sweep"), widgets.progress("Sweeping ranks...") as bar:
        dense = runtime.dense_forward(model_key, text)
        return compare.error_sweep(m, tok, dense, base, compare.sweep_ranks(tok.n_tokens), progress=bar)


@st.cache_resource(show_spinner=False, max_entries=16)
def _continuation(model_key: str, text: str, config: ATPConfig, n_new: int) -> compare.Continuation:
    with (
        runtime.heavy_job("greedy continuation"),
        widgets.progress("Greedy decoding, dense and ATP...") as bar,
    ):
        m = runtime.get_model(model_key)
        return compare.continuation(m, runtime.tokenized(model_key, text), config, n_new=n_new, progress=bar)


def _decode(ids) -> list[str]:
    return [loaded.tokenizer.decode([i]) for i in ids]


def _rank_saver(unit: str):
    """on_change of a rank slider: the view's rank in that slider's unit."""
    return lambda value: urlstate.format_rank(unit, value)


def _unit_changed() -> None:
    """The rank's unit was switched: the same rank, said in the other unit."""
    unit = "tokens" if st.session_state.rank_unit == state.RANK_UNITS["tokens"] else "fraction"
    r = state.rank_tokens(L)
    if unit == "fraction":
        frac = min(max(round(r / L / urlstate.FRACTION_STEP) * urlstate.FRACTION_STEP, 0.05), 1.0)
        state.put("rank", urlstate.format_rank("fraction", frac))
    else:
        state.put("rank", urlstate.format_rank("tokens", r))


def _rank_widgets(column_rank, column_unit) -> float | int:
    """The rank slider in the view's unit (fraction of L or tokens), given the view's rank."""
    unit, value = state.rank(L)
    column_unit.radio(
        "Rank as",
        list(state.RANK_UNITS.values()),
        horizontal=True,
        on_change=_unit_changed,
        **state.give("rank_unit", state.RANK_UNITS[unit]),
    )
    if unit == "tokens":
        bound = state.bind("rank_tokens", "rank", value, _rank_saver("tokens"))
        return column_rank.slider("Rank r (principal keys)", 1, L, **bound)
    bound = state.bind("rank_frac", "rank", value, _rank_saver("fraction"))
    return column_rank.slider("Rank r / L", 0.05, 1.0, step=0.05, **bound)


def _controls() -> ATPConfig | None:
    """Rank, form and basis widgets; the ATP setting they describe (None after an error message).

    Every setting here is the view's (atp_app.state: from the link, kept across pages, in every link)."""
    c1, c2, c3 = st.columns([3, 2, 2])
    rank = _rank_widgets(c1, c2)
    paper = next((n for n in forms.names() if forms.get(n).paper), None)
    form = c3.radio(
        "Form",
        forms.names(),
        horizontal=True,
        help=f"{paper} = the paper's form" if paper else None,
        **state.bind("form", "form", state.get("form")),
    )
    d1, d2, d3, d4 = st.columns([2, 2, 2, 2])
    layer_spec = d1.text_input(
        "ATP on layers",
        help="'all', '3', '0-5' or '1,3,7'",
        **state.bind("atp_layers", "layers", state.get("layers")),
    )
    source = d2.radio(
        "Basis from", tuple(BASIS_SOURCES), horizontal=True, format_func=BASIS_SOURCES.get,
        **state.bind("basis_source", "basis", state.get("basis")),
    )  # fmt: skip
    centre = d2.checkbox(
        "Centred basis",
        help="The mean token as U_r's first column, the top r - 1 directions of the centred input after it: "
        "same rank and cost, and the mean key and value are rebuilt exactly (README: 'A centred basis').",
        **state.bind("centre_basis", "centre", state.get("centre") == "1", lambda on: "1" if on else "0"),
    )
    method = d4.selectbox(
        "Basis computed by",
        METHODS,
        format_func=METHOD_LABELS.get,
        **state.bind("basis_method", "method", state.get("method")),
        help="How U_r is computed. The cheaper methods approximate the top-r subspace; the metrics and the "
        "sweep below show what that costs in accuracy. The sketch uses a sample of max(512, 4r) tokens.",
    )
    lowrank = d3.checkbox(
        "Low-rank inputs for linear layers",
        help="The paper's claim 3: Q/K/V projections see U_r U_r^T X and the MLP its own projected input.",
        **state.bind("lowrank_linear", "lowrank", state.get("lowrank") == "1", lambda on: "1" if on else "0"),
    )
    e1, e2 = st.columns([3, 4])
    budget = rank if isinstance(rank, float) else rank / L
    split = layer_split.layer_shares(e1, sel.model_key, info, budget, form, source, centre)
    if split.note:
        e2.caption(split.note + (" The budget is shared over all layers; only the chosen ones run ATP." if
                           layer_spec.strip().lower() not in ("", "all") else ""))  # fmt: skip
    try:
        layers = parse_layers(layer_spec, info.n_layers)  # checked by state.fit_view already
        return ATPConfig(
            rank=rank if split.budget is None else split.budget,
            form=form,
            layers=layers,
            basis_source=source,
            lowrank_linear=lowrank,
            basis_method=method,
            centre_basis=centre,
            layer_ranks=split.shares,
        )
    except (ValueError, TypeError) as err:
        st.error(str(err))
        return None


def _adopt(view: dict[str, str]) -> None:
    """on_click: these values into the view; the widgets above take them on the rerun."""
    for name, value in view.items():
        state.put(name, value)


def _tuned_notes(trained: dict, config: ATPConfig) -> list[str]:
    """What the rows here do not share with how the run was tuned, one sentence each (all of them)."""
    if trained.get("attention", "atp") == "dense":
        return [
            "This is a dense-tuned control: it was tuned with dense attention and trained no ATP parameter, "
            "so every ATP row is a setting it never trained for. It separates what ATP costs a tuned model "
            "from what tuning on docstrings buys (README: 'A dense control')."
        ]
    notes = []
    if info.is_decoder:
        window = " with an exact window and the rest of the past compressed" if trained.get("window") else ""
        notes.append(
            f"This model was tuned in the strictly causal chunked mode{window}; the rows here run ATP over "
            "the whole text at once. The Serving page's perplexity (as it was tuned) measures the setting it "
            "was trained for."
        )
    if trained.get("layer_ranks") and tuple(trained["layer_ranks"]) != config.layer_ranks:
        shares, mean = format_layer_shares(trained["layer_ranks"]), f"{trained['rank']:g}"
        notes.append(
            f"This model was tuned with its own rank per layer ({shares} of L, mean {mean}); the rows here "
            f"run other ranks (`python -m atp_viz compare --rank {mean} --layer-ranks {shares}`: its "
            "own)."
        )
    basis = trained.get("basis_from", "input")
    if (
        basis != config.basis_source
        or trained["form"] != config.form
        or bool(trained.get("centre_basis")) != config.centre_basis
    ):
        notes.append(
            "The current form or basis is not the one this model was tuned with, so its ATP rows show a "
            "setting it never trained for."
        )
    return notes


def _shows(view: dict[str, str]) -> bool:
    """Whether the explorer shows this view already (the rank compared in tokens, whatever its unit)."""
    for name, value in view.items():
        if name == "rank":
            same = state.rank_tokens(L) == resolve_rank(urlstate.parse_rank(value, L)[1], L)[0]
        else:
            same = state.get(name) == value
        if not same:
            return False
    return True


def _before_after(config: ATPConfig, tuned_dense: compare.Forward, tuned_run: compare.Forward) -> None:
    """A fine-tuned model: the original model dense and with ATP untuned, next to this model."""
    try:
        meta = tuned.read_settings(sel.model_key.removeprefix(TUNED_PREFIX))
        base_key = meta["base_model"]
        base_dense = runtime.dense_forward(base_key, sel.text)
        base_run = runtime.atp_forward(base_key, sel.text, config, ())  # cached: a click does not rerun it
    except (ModelLoadError, KeyError, NonFiniteError) as err:
        st.warning(f"Cannot show the original model next to this tuned one: {err}")
        return
    runs = {
        "original model, dense (reference)": base_dense,
        f"original model, {config.label()} (untuned)": base_run,
        "tuned weights, dense attention": tuned_dense,
        f"tuned model, {config.label()}": tuned_run,
    }
    trained = meta["settings"]
    if trained.get("attention", "atp") == "dense":
        how = "a dense-tuned control, trained without ATP"
    else:
        source = BASIS_SOURCES.get(trained.get("basis_from", "input"), trained.get("basis_from"))
        # A centred basis is not the paper's, whatever it decomposes.
        centred = trained.get("centre_basis")
        basis = f"centred basis from {source.removesuffix(' (paper)')}" if centred else f"basis from {source}"
        how = f"this model was tuned at {tuned.trained_setting(trained)}, {trained['form']} form, {basis}"
    st.markdown(
        f"**Before / after fine-tuning** ({how}; the current setting is {config.label()}). Every row is "
        "measured against the *original* model's dense run on this text."
    )
    for note in _tuned_notes(trained, config):
        st.info(note)
    as_tuned = None if trained.get("attention", "atp") == "dense" else urlstate.tuned_view(trained, L)
    if as_tuned is not None and not _shows(as_tuned):
        st.button(
            "Show the setting it was tuned with",
            key="explorer_as_tuned",
            on_click=_adopt,
            args=(as_tuned,),
            help="Sets the rank, form, basis and ranks per layer above to the ones this model was tuned at "
            "(on every layer, exact SVD, linear layers dense).",
        )
    rows = compare.side_by_side(base_dense, runs)
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="explorer_before_after")
    widgets.table_downloads(rows, "explorer_before_after")


def _metrics(
    cmp: compare.Comparison, config: ATPConfig, dense: compare.Forward, run: compare.Forward
) -> None:
    if cmp.layer_ranks:  # the mean of the ranks the layers ran (their rounding can leave it off the budget)
        mean = sum(cmp.layer_ranks) / len(cmp.layer_ranks)
        shown = f"{mean:.1f}".removesuffix(".0")
        st.subheader(
            f"r = {shown} of L = {L} tokens ({mean / L:.0%}) on average over the layers, {config.form} form"
        )
    else:
        st.subheader(f"r = {cmp.rank} of L = {L} tokens ({cmp.rank / L:.0%}), {config.form} form")
    if cmp.layer_ranks:
        st.caption("Each ATP layer's r on this text: " + ", ".join(map(str, cmp.layer_ranks)) + ".")
    k1, k2, k3 = st.columns(3)
    if cmp.embedding_cosine is not None:
        k1.metric("Sentence-embedding cosine to dense", f"{cmp.embedding_cosine:.4f}")
    else:
        k1.metric("Next-token KL(dense || ATP)", f"{cmp.kl:.3f} nats")
        k3.metric("Top-1 next token agrees", "yes" if cmp.top1_agree else "no")
    k2.metric(f"Final hidden state, relative error ({cmp.errors_at})", f"{cmp.final_rel_error:.3f}")
    st.caption(
        f"Compute: ATP forward {cmp.atp_seconds * 1e3:.0f} ms (basis included), "
        f"dense {cmp.dense_seconds * 1e3:.0f} ms."
    )
    if sel.model_key.startswith(TUNED_PREFIX):
        st.caption(
            "Dense here is this tuned model's own weights with dense attention; the table below also "
            "compares with the original model."
        )
        _before_after(config, dense, run)
    fig = plots.layer_error_figure(
        cmp.layer_rel_error, title=f"Relative error of each layer's output ({cmp.errors_at})"
    )
    widgets.chart(fig, key="explorer_layer_err")
    e1, e2 = st.columns(2)
    with e1:
        widgets.figure_downloads(fig, "explorer_layer_error")
    with e2:
        # what the numbers are of: a file saved next to others must say its model, text and setting
        what = {"model": sel.model_key, "text": sel.text_label, "setting": config.label()}
        widgets.table_downloads(
            export.metric_rows({**what, **cmp.as_dict(loaded.tokenizer)}), "explorer_metrics"
        )
    if info.is_decoder:
        st.caption(
            "Decoder: errors are measured at the last token only. Under ATP every earlier position's state "
            "depends on later tokens through the basis; only the last one sees nothing after it."
        )


def _decoder_outputs(cmp: compare.Comparison, config: ATPConfig) -> None:
    st.markdown(
        "Decoder outputs shown: the next-token distribution after the prompt's last token and a greedy "
        "continuation. A teacher-forced perplexity over the prompt is **not** shown: the basis is "
        "computed from the whole prompt, so every position would see later tokens through it."
    )
    rows = [
        {"#": i + 1, "dense token": repr(loaded.tokenizer.decode([di])), "dense p": dp,
         "ATP token": repr(loaded.tokenizer.decode([ai])), "ATP p": ap}
        for i, ((di, dp), (ai, ap)) in enumerate(zip(cmp.top_dense, cmp.top_atp, strict=True))
    ]  # fmt: skip
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="explorer_topk")
    widgets.table_downloads(rows, "explorer_top10")
    if not st.toggle("Greedy continuation (32 tokens each; reruns the model per token)", key="show_cont"):
        return
    try:
        cont = _continuation(sel.model_key, sel.text, config, 32)
    except BusyError as err:
        st.warning(str(err))
        return
    div = cont.first_divergence
    t1, t2 = st.columns(2)
    t1.markdown("**Dense**\n\n" + widgets.highlight_divergence(_decode(cont.dense_ids), div))
    t2.markdown("**ATP**\n\n" + widgets.highlight_divergence(_decode(cont.atp_ids), div))
    st.caption(
        "First diverging token: "
        + ("none" if div is None else f"position {div} (highlighted)")
        + f"; {cont.agreement:.0%} of positions agree."
    )


def _map(
    column, matrix, name: str, title: str, *, principal: bool = False, sinks=(), setting: str = ""
) -> None:
    """One map, block-averaged above the deployment's display size, on the view's colour scale. Its file
    name says the model, layer and head, and ``setting`` (an ATP map's form and rank), so downloads of
    several settings do not overwrite each other."""
    fig = maps_fig.token_map(
        matrix,
        READABLE,
        title=title,
        max_size=runtime.current_settings().map_display_size,
        principal=principal,
        sinks=sinks,
        scale=state.get("scale"),
        signed=True if name == "map_diff" else None,
        causal=info.is_decoder,
    )
    with column:
        widgets.chart(fig, key=name)
        model = widgets.model_file_part(sel.model_key)
        widgets.figure_downloads(fig, f"{name}_{model}_L{state.get('layer')}_H{state.get('head')}{setting}")


def _map_widgets() -> tuple[bool, bool]:
    """Layer, head, colour scale, sink switch (the view's) and which views are open (this session's)."""
    m1, m2, m3, m4 = st.columns([1, 1, 2, 2])
    m1.selectbox(
        "Layer", list(range(info.n_layers)), **state.bind("map_layer", "layer", state.index("layer"))
    )
    m2.selectbox(
        "Query head", list(range(info.n_heads)), **state.bind("map_head", "head", state.index("head"))
    )
    m3.radio(
        "Colour scale",
        list(maps_fig.SCALES),
        format_func=maps_fig.SCALES.get,
        horizontal=True,
        help="Attention weights span decades: the log scale (default) shows the top "
        f"{maps_fig.LOG_DECADES:.0f}; 'rank within each row' shows where each query looks most, whatever "
        "the size; linear shows raw sizes (one sink column can take the whole range).",
        **state.bind("map_scale", "scale", state.get("scale")),
    )
    m4.checkbox(
        "Leave out attention-sink columns",
        help="Key tokens that take on average at least "
        f"{token_view.SINK_SHARE:.0%} of every row's weight (and {token_view.SINK_FACTOR:.0f}x the uniform "
        "share 1/L), e.g. a decoder's first token: left blank, so the colours go to the other keys.",
        **state.bind("map_sinks", "sinks", state.get("sinks") == "hide", lambda v: "hide" if v else "show"),
    )
    t1, t2 = st.columns(2)
    show_maps = t1.toggle("Attention maps", value=True, key="show_maps", persist_state="session")
    show_tokens = t2.toggle(
        "One query token (click a token)", value=True, key="show_tokens", persist_state="session"
    )
    return show_maps, show_tokens


def _attention_maps(maps: compare.AttentionMaps, cmp: compare.Comparison, form: str) -> None:
    sinks = token_view.sink_columns(maps.dense) if state.get("sinks") == "hide" else ()
    r = maps.basis.shape[1]  # this layer's r (per-layer ranks)
    atp, setting = f"ATP ({form}, r = {r})", f"_{form}_r{r}"
    a1, a2 = st.columns(2)
    b1, b2 = st.columns(2)
    _map(a1, maps.dense, "map_dense", "Dense attention (L x L)", sinks=sinks)
    _map(
        a2, maps.principal, "map_principal", f"{atp} weights on {r} principal keys (L x r)", principal=True,
        setting=setting,
    )  # fmt: skip
    _map(b1, maps.lifted, "map_lifted", f"{atp} lifted back to tokens (L x L)", sinks=sinks, setting=setting)
    _map(b2, maps.difference, "map_diff", f"{atp} lifted minus dense", sinks=sinks, setting=setting)
    if state.get("sinks") == "hide" and not sinks:
        st.caption("No attention-sink column in this map.")
    st.caption(
        "Each form's map over principal keys A' (L x r) gives the output as A' V'; lifted to tokens it is "
        "A' U_r^T. A form whose weights are a softmax over reconstructed keys (exact) shows that softmax A "
        "as the lifted map, and A U_r over principal keys, since A V_r = (A U_r) V'. The linear form's "
        "lifted rows sum to 1 but entries can be negative: 1 + s is not a positive kernel. Hover a cell "
        "for its tokens and weight."
        + (
            " Decoder: the outline is the causal triangle; the lifted map has weight outside it, on tokens "
            "after the query: the basis mixes later tokens into every reconstructed key. That is why only "
            "the last token's outputs are reported here."
            if info.is_decoder
            else ""
        )
    )


def _query_picker() -> int:
    """The query token, clicked in the text (pills; a number field for very long texts)."""
    query = state.index("query")
    if L > MAX_PILLS:
        bound = state.bind("query_number", "query", query)
        return int(st.number_input(f"Query token (0 to {L - 1})", 0, L - 1, **bound))
    picked = st.pills(
        "Query token: click one in the text",
        list(range(L)),
        format_func=PILL_LABELS.__getitem__,
        # Clicking the selected token again would clear it: the view keeps the last query instead.
        **state.bind("query_pills", "query", query, lambda v: state.get("query") if v is None else v),
    )
    return query if picked is None else int(picked)


def _token_views(maps: compare.AttentionMaps, config: ATPConfig) -> None:
    """Where one query looks (dense and ATP), and what the principal keys it reads are made of."""
    view = token_view.query_view(maps, _query_picker())
    fig = tokens_fig.query_attention_figure(
        view, READABLE, atp_label=f"ATP {config.form}", causal=info.is_decoder
    )
    widgets.chart(fig, key="token_attention")
    widgets.figure_downloads(fig, "token_attention")
    n_keys = st.columns([1, 3])[0].number_input(
        "Principal keys to take apart", 1, min(6, view.weights.size), min(3, view.weights.size),
        key="token_n_keys", persist_state="session",
    )  # fmt: skip
    fig = tokens_fig.principal_keys_figure(view, READABLE, n_keys=int(n_keys))
    widgets.chart(fig, key="token_keys")
    widgets.figure_downloads(fig, "token_principal_keys")
    st.caption(
        "Dense attention reads each key token directly; ATP reads r principal keys, each a mix of all tokens "
        "with the loadings U_r[:, a]. A token gets weight under ATP when the heavy principal keys load on "
        "it. A basis vector's sign is arbitrary, so each key is drawn with the sign that makes its weight "
        "positive."
    )


def _attention_section(run: compare.Forward, cmp: compare.Comparison, config: ATPConfig, refusal) -> None:
    st.subheader("Attention: maps, and one token at a time")
    show_maps, show_tokens = _map_widgets()
    layer, head = state.index("layer"), state.index("head")
    if refusal:
        st.info(refusal)
        return
    if not (show_maps or show_tokens):
        st.caption("Both views are closed: nothing is computed for them.")
        return
    if layer not in run.maps:
        st.info(f"ATP is not applied to layer {layer} with the current layer selection.")
        return
    dense_attn = cap.layers[layer].attn
    if dense_attn is None:
        dense_attn = runtime.get_capture(sel.model_key, sel.text, (layer,)).layers[layer].attn
    maps = compare.attention_maps(dense_attn, run, layer, head)
    if show_maps:
        _attention_maps(maps, cmp, config.form)
    if show_tokens:
        _token_views(maps, config)


def _sweep_section(config: ATPConfig, cmp: compare.Comparison) -> None:
    st.subheader("Error vs rank, every form")
    st.markdown(
        "The **exact** form's error is the cost of dropping bases alone; every other form's line is its "
        "total error at the same rank (two forms' errors do not add up). A large gap between the linear "
        "form and the exact one is why the paper fine-tunes."
    )
    if config.layer_ranks is not None:
        st.caption("The sweep runs the same r in every layer, whatever the choice of ranks per layer above.")
    if not widgets.run_button("Run the sweep", "run_sweep", (sel.model_key, sel.text)):
        return
    try:
        # The sweep runs every rank and form: only the other settings key its cache.
        sw = _sweep(sel.model_key, sel.text, replace(config, rank=1.0, form=forms.DEFAULT, layer_ranks=None))
    except BusyError as err:
        widgets.forget_run("run_sweep")  # not retried on every rerun: the button starts it again
        st.warning(str(err))
        return
    fig = plots.sweep_figure(sw, current=cmp.rank)
    widgets.chart(fig, key="explorer_sweep")
    w1, w2 = st.columns(2)
    with w1:
        widgets.figure_downloads(fig, "explorer_rank_sweep")
    with w2:
        widgets.table_downloads(export.sweep_rows(sw), "explorer_rank_sweep_table")


@st.fragment
def explorer() -> None:
    config = _controls()
    if config is None:
        return
    state.sync_url()  # a fragment's rerun does not run app.py: the link follows here
    layer = state.index("layer")
    applied = config.layers == "all" or layer in config.layers
    refusal = runtime.current_settings().map_refusal(L)  # L x L maps above the limit are not even computed
    # Views that are closed compute nothing: the ATP run records a layer's maps only for an open view.
    views_open = st.session_state.get("show_maps", True) or st.session_state.get("show_tokens", True)
    record = (layer,) if applied and not refusal and views_open else ()
    dense = runtime.dense_forward(sel.model_key, sel.text)  # once per (model, text), shared by all sessions
    try:
        run = runtime.atp_forward(sel.model_key, sel.text, config, record)  # once per setting
    except NonFiniteError as err:
        st.error(f"{config.label()} breaks down on this text: {err}")
        return
    cmp = compare.compare(dense, run)
    for notice in cmp.notices:
        st.info(notice)
    _metrics(cmp, config, dense, run)
    if info.is_decoder:
        _decoder_outputs(cmp, config)
    _attention_section(run, cmp, config, refusal)
    _sweep_section(config, cmp)


explorer()
