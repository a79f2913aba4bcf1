"""Rank explorer: drag the rank, see ATP next to dense attention on the same text."""

from dataclasses import replace

import pandas as pd
import streamlit as st

from atp_app import navigation, runtime, widgets
from atp_app.sidebar import page_inputs
from atp_app.state import explorer_state_from_url, rank_param, set_url
from atp_viz import forms
from atp_viz.analysis import compare
from atp_viz.core.basis import METHOD_LABELS, METHODS, NonFiniteError
from atp_viz.deploy.jobs import BusyError
from atp_viz.figures import plots
from atp_viz.hf import tuned
from atp_viz.hf.engine import BASIS_SOURCES, ATPConfig, parse_layers
from atp_viz.hf.model_info import TUNED_PREFIX, ModelLoadError
from atp_viz.outputs import export

navigation.use_this_navigation()
st.title("Rank explorer: ATP vs dense")
st.markdown(
    "**ATP** keeps the top-r principal directions of each layer's input X (L tokens) and attends over "
    "r *principal keys* K' = U_r^T K instead of L tokens. The forms: "
    + "; ".join(f"**{n}**, {forms.get(n).description}" for n in forms.names())
    + ". The paper's accuracy figures (about the same as dense at r = L/2, about 2% lower at L/4) were "
    "measured **after fine-tuning** with ATP in place; a pretrained model run through any form "
    "untouched, as here, loses much more, and the linear form much more than the exact one."
)

sel, loaded, cap = page_inputs()
info = cap.info
L = cap.n_tokens


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


def _controls() -> ATPConfig | None:
    """Rank, form and basis widgets; the ATP setting they describe (None after an error message).

    Rank, form, map layer and head come from the link (?rank=&form=&layer=&head=) and go back into it;
    their defaults are set there (r = L/2 or 0.5, exact, layer 0, head 0), not in the widgets."""
    explorer_state_from_url(L, info.n_layers, info.n_heads)
    c1, c2, c3 = st.columns([3, 2, 2])
    unit = c2.radio("Rank as", ["fraction of L", "tokens"], horizontal=True, key="rank_unit")
    if unit == "tokens":
        rank = c1.slider("Rank r (principal keys)", 1, L, key="rank_tokens")
    else:
        rank = c1.slider("Rank r / L", 0.05, 1.0, step=0.05, key="rank_frac")
    paper = next((n for n in forms.names() if forms.get(n).paper), None)
    form = c3.radio(
        "Form",
        forms.names(),
        horizontal=True,
        key="form",
        help=f"{paper} = the paper's form" if paper else None,
    )
    set_url(rank=rank_param(unit, rank), form=form)
    d1, d2, d3, d4 = st.columns([2, 2, 2, 2])
    layer_spec = d1.text_input("ATP on layers", "all", key="atp_layers", help="'all', '3', '0-5' or '1,3,7'")
    source = d2.radio(
        "Basis from", tuple(BASIS_SOURCES), horizontal=True, key="basis_source", format_func=BASIS_SOURCES.get
    )
    method = d4.selectbox(
        "Basis computed by",
        METHODS,
        key="basis_method",
        format_func=METHOD_LABELS.get,
        help="How U_r is computed. The cheaper methods approximate the top-r subspace; the metrics and the "
        "sweep below show what that costs in accuracy. The sketch uses a sample of max(512, 4r) tokens.",
    )
    lowrank = d3.checkbox(
        "Low-rank inputs for linear layers",
        key="lowrank_linear",
        help="The paper's claim 3: Q/K/V projections see U_r U_r^T X and the MLP its own projected input.",
    )
    try:
        layers = parse_layers(layer_spec, info.n_layers)
        return ATPConfig(
            rank=rank,
            form=form,
            layers=layers,
            basis_source=source,
            lowrank_linear=lowrank,
            basis_method=method,
        )
    except (ValueError, TypeError) as err:
        st.error(str(err))
        return None


def _before_after(config: ATPConfig, tuned_dense: compare.Forward, tuned_run: compare.Forward) -> None:
    """A fine-tuned model: the original model dense and with ATP untuned, next to this model."""
    try:
        meta = tuned.read_settings(sel.model_key.removeprefix(TUNED_PREFIX))
        base_key = meta["base_model"]
        base_dense = runtime.dense_forward(base_key, sel.text)
        base_run = compare.forward(runtime.get_model(base_key), runtime.tokenized(base_key, sel.text), config)
    except (ModelLoadError, KeyError, NonFiniteError) as err:
        st.warning(f"Cannot show the original model next to this tuned one: {err}")
        return
    runs = {
        "original model, dense (reference)": base_dense,
        f"original model, {config.label()} (untuned)": base_run,
        "tuned weights, dense attention": tuned_dense,
        f"tuned model, {config.label()}": tuned_run,
    }
    st.markdown(
        f"**Before / after fine-tuning** (this model was tuned at r = {meta['settings']['rank']:g} L, "
        f"{meta['settings']['form']} form; the current setting is {config.label()}). Every row is measured "
        "against the *original* model's dense run on this text."
    )
    rows = compare.side_by_side(base_dense, runs)
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="explorer_before_after")
    widgets.table_downloads(rows, "explorer_before_after")


def _metrics(
    cmp: compare.Comparison, config: ATPConfig, dense: compare.Forward, run: compare.Forward
) -> None:
    st.subheader(f"r = {cmp.rank} of L = {L} tokens ({cmp.rank / L:.0%}), {config.form} form")
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
        _before_after(config, dense, run)
    fig = plots.layer_error_figure(
        cmp.layer_rel_error, title=f"Relative error of each layer's output ({cmp.errors_at})"
    )
    st.plotly_chart(fig, key="explorer_layer_err")
    e1, e2 = st.columns(2)
    with e1:
        widgets.figure_downloads(fig, "explorer_layer_error")
    with e2:
        widgets.table_downloads(export.metric_rows(cmp.as_dict(loaded.tokenizer)), "explorer_metrics")
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
    column, matrix, block, key: str, file: str, title: str, x_title: str, diverging: bool = False
) -> None:
    fig = plots.heatmap_figure(matrix, title=title, x_title=x_title, diverging=diverging, block=block)
    column.plotly_chart(fig, key=key)
    with column:
        widgets.figure_downloads(fig, f"{file}_L{st.session_state.map_layer}_H{st.session_state.map_head}")


def _attention_maps(
    run: compare.Forward, cmp: compare.Comparison, applied: bool, refusal: str | None
) -> None:
    st.subheader("Attention maps")
    if refusal:
        st.info(refusal)
        return
    layer, head = st.session_state.map_layer, st.session_state.map_head
    if not applied:
        st.info(f"ATP is not applied to layer {layer} with the current layer selection.")
        return
    dense_attn = cap.layers[layer].attn
    if dense_attn is None:
        dense_attn = runtime.get_capture(sel.model_key, sel.text, (layer,)).layers[layer].attn
    maps = compare.attention_maps(dense_attn, run, layer, head)
    size = runtime.current_settings().map_display_size
    a1, a2 = st.columns(2)
    b1, b2 = st.columns(2)
    for column, matrix, key, file, title, x_title in (
        (a1, maps.dense, "map_dense", "attention_dense", "Dense attention (L x L)", "key token"),
        (a2, maps.principal, "map_principal", "attention_atp_principal",
         f"ATP weights on {cmp.rank} principal keys (L x r)", "principal key"),
        (b1, maps.lifted, "map_lifted", "attention_atp_lifted", "ATP lifted back to tokens (L x L)",
         "key token"),
        (b2, maps.difference, "map_diff", "attention_difference", "ATP lifted minus dense", "key token"),
    ):  # fmt: skip
        _map(
            column, *compare.downsample(matrix, size), key, file, title, x_title, diverging=key == "map_diff"
        )
    st.caption(
        "Each form's map over principal keys A' (L x r) gives the output as A' V'; lifted to tokens it is "
        "A' U_r^T. A form whose weights are a softmax over reconstructed keys (exact) shows that softmax A "
        "as the lifted map, and A U_r over principal keys, since A V_r = (A U_r) V'. The linear form's "
        "lifted rows sum to 1 but entries can be negative: 1 + s is not a positive kernel."
        + (
            " Decoder: the lifted map has weight above the diagonal, on tokens after the query: the "
            "basis mixes later tokens into every reconstructed key. That is why only the last token's "
            "outputs are reported here."
            if info.is_decoder
            else ""
        )
    )


def _sweep_section(config: ATPConfig, cmp: compare.Comparison) -> None:
    st.subheader("Error vs rank, every form")
    st.markdown(
        "The **exact** form's error is the cost of dropping bases alone; every other form's line is its "
        "total error at the same rank (two forms' errors do not add up). A large gap between the linear "
        "form and the exact one is why the paper fine-tunes."
    )
    if not (st.button("Run the sweep", key="run_sweep") or st.session_state.get("sweep_ran")):
        return
    st.session_state.sweep_ran = True
    try:
        # The sweep runs every rank and form: only the other settings key its cache.
        sw = _sweep(sel.model_key, sel.text, replace(config, rank=1.0, form=forms.DEFAULT))
    except BusyError as err:
        st.session_state.sweep_ran = False  # not retried on every rerun: the button starts it again
        st.warning(str(err))
        return
    fig = plots.sweep_figure(sw, current=cmp.rank)
    st.plotly_chart(fig, key="explorer_sweep")
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
    m1, m2 = st.columns(2)
    map_layer = m1.selectbox("Map: layer", list(range(info.n_layers)), key="map_layer")
    map_head = m2.selectbox("Map: query head", list(range(info.n_heads)), key="map_head")
    set_url(layer=map_layer, head=map_head)
    applied = config.layers == "all" or map_layer in config.layers
    refusal = runtime.current_settings().map_refusal(L)  # L x L maps above the limit are not even computed
    tok = runtime.tokenized(sel.model_key, sel.text)
    dense = runtime.dense_forward(sel.model_key, sel.text)
    try:
        run = compare.forward(loaded, tok, config, map_layers=[map_layer] if applied and not refusal else [])
    except NonFiniteError as err:
        st.error(f"{config.label()} breaks down on this text: {err}")
        return
    cmp = compare.compare(dense, run)
    for notice in cmp.notices:
        st.info(notice)
    _metrics(cmp, config, dense, run)
    if info.is_decoder:
        _decoder_outputs(cmp, config)
    _attention_maps(run, cmp, applied, refusal)
    _sweep_section(config, cmp)


explorer()
