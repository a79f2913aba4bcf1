"""Rank explorer: drag the rank, see ATP next to dense attention on the same text."""

from contextlib import contextmanager

import pandas as pd
import streamlit as st

from atp_viz import compare, export, finetune, plots
from atp_viz.atp import NonFiniteError
from atp_viz.engine import ATPConfig, parse_layers
from atp_viz.jobs import BusyError
from atp_viz.models import ModelLoadError
from atp_viz.texts import Tokenized, tokenize
from ui import (
    current_settings,
    explorer_state_from_url,
    figure_downloads,
    get_capture,
    get_model,
    heavy_job,
    highlight_divergence,
    page_inputs,
    rank_param,
    set_url,
    table_downloads,
)

st.title("Rank explorer: ATP vs dense")
st.markdown(
    "**ATP** keeps the top-r principal directions of each layer's input X (L tokens) and attends over "
    "r *principal keys* K' = U_r^T K instead of L tokens. Two forms: **linear** is the paper's linear-cost "
    "form (softmax expanded to first order, exp(s) ~ 1 + s); **exact** is softmax on the rank-r "
    "reconstruction K_r = U_r U_r^T K, quadratic like dense, which isolates the error of dropping bases. "
    "The paper's accuracy figures (about the same as dense at r = L/2, about 2% lower at L/4) were "
    "measured **after fine-tuning** with ATP in place; a pretrained model run through either form "
    "untouched, as here, loses much more, and the linear form much more than the exact one."
)

sel, loaded, cap = page_inputs()
info = cap.info
L = cap.n_tokens


@st.cache_resource(show_spinner=False, max_entries=8)
def _tokenized(model_key: str, text: str) -> Tokenized:
    m = get_model(model_key)
    return tokenize(m.tokenizer, text, m.info.max_tokens)


@st.cache_resource(show_spinner="Dense reference run...", max_entries=8)
def _dense(model_key: str, text: str) -> compare.Forward:
    return compare.forward(get_model(model_key), _tokenized(model_key, text))


@st.cache_resource(show_spinner=False, max_entries=16)
def _sweep(model_key: str, text: str, layers, source: str, lowrank: bool, method: str) -> compare.Sweep:
    m = get_model(model_key)
    tok = _tokenized(model_key, text)
    with heavy_job("rank sweep"), _progress("Sweeping ranks...") as bar:
        base = ATPConfig(layers=layers, basis_source=source, lowrank_linear=lowrank, basis_method=method)
        return compare.error_sweep(
            m,
            tok,
            _dense(model_key, text),
            base,
            compare.sweep_ranks(tok.n_tokens),
            progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg),
        )


@st.cache_resource(show_spinner=False, max_entries=16)
def _continuation(model_key: str, text: str, config: ATPConfig, n_new: int) -> compare.Continuation:
    with heavy_job("greedy continuation"), _progress("Greedy decoding, dense and ATP...") as bar:
        m = get_model(model_key)
        return compare.continuation(
            m,
            _tokenized(model_key, text),
            config,
            n_new=n_new,
            progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg),
        )


@contextmanager
def _progress(text: str):
    """A progress bar that is removed when the block ends, by return or by exception."""
    bar = st.progress(0.0, text=text)
    try:
        yield bar
    finally:
        bar.empty()


def _decode(ids) -> list[str]:
    return [loaded.tokenizer.decode([i]) for i in ids]


def _before_after(sel, tok, config: ATPConfig, tuned_dense: compare.Forward, tuned_run: compare.Forward):
    """A fine-tuned model: the original model dense and with ATP untuned, next to this model."""
    try:
        meta = finetune.read_settings(sel.model_key.removeprefix(finetune.TUNED_PREFIX))
        base_key = meta["base_model"]
        base_dense = _dense(base_key, sel.text)
        base_run = compare.forward(get_model(base_key), _tokenized(base_key, sel.text), config)
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
    table_downloads(rows, "explorer_before_after")


@st.fragment
def explorer() -> None:
    # Rank, form, map layer and head come from the link (?rank=&form=&layer=&head=) and go back into
    # it; their defaults are set there (r = L/2 or 0.5, exact, layer 0, head 0), not in the widgets.
    explorer_state_from_url(L, info.n_layers, info.n_heads)
    c1, c2, c3 = st.columns([3, 2, 2])
    unit = c2.radio("Rank as", ["fraction of L", "tokens"], horizontal=True, key="rank_unit")
    if unit == "tokens":
        rank = c1.slider("Rank r (principal keys)", 1, L, key="rank_tokens")
    else:
        frac = c1.slider("Rank r / L", 0.05, 1.0, step=0.05, key="rank_frac")
        rank = frac
    form = c3.radio(
        "Form", ["exact", "linear"], horizontal=True, key="form", help="linear = the paper's form"
    )
    set_url(rank=rank_param(unit, rank), form=form)
    d1, d2, d3, d4 = st.columns([2, 2, 2, 2])
    layer_spec = d1.text_input("ATP on layers", "all", key="atp_layers", help="'all', '3', '0-5' or '1,3,7'")
    source = d2.radio(
        "Basis from",
        ["input", "keys"],
        horizontal=True,
        key="basis_source",
        format_func={"input": "attention input X (paper)", "keys": "keys K"}.get,
    )
    method = d4.selectbox(
        "Basis computed by",
        ["exact", "randomized", "sketch"],
        key="basis_method",
        format_func={
            "exact": "exact SVD",
            "randomized": "randomised (2 power iterations)",
            "sketch": "token sketch (cheapest)",
        }.get,
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
        config = ATPConfig(
            rank=rank,
            form=form,
            layers=layers,
            basis_source=source,
            lowrank_linear=lowrank,
            basis_method=method,
        )
    except (ValueError, TypeError) as err:
        st.error(str(err))
        return

    m1, m2 = st.columns(2)
    map_layer = m1.selectbox("Map: layer", list(range(info.n_layers)), key="map_layer")
    map_head = m2.selectbox("Map: query head", list(range(info.n_heads)), key="map_head")
    set_url(layer=map_layer, head=map_head)
    applied = layers == "all" or map_layer in layers
    limits = current_settings()
    map_refusal = limits.map_refusal(L)  # L x L maps above the limit are not even computed

    tok = _tokenized(sel.model_key, sel.text)
    dense = _dense(sel.model_key, sel.text)
    try:
        run = compare.forward(
            loaded, tok, config, map_layers=[map_layer] if applied and not map_refusal else []
        )
    except NonFiniteError as err:
        st.error(f"{config.label()} breaks down on this text: {err}")
        return
    cmp = compare.compare(dense, run)
    for notice in cmp.notices:
        st.info(notice)

    st.subheader(f"r = {cmp.rank} of L = {L} tokens ({cmp.rank / L:.0%}), {form} form")
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
    if sel.model_key.startswith(finetune.TUNED_PREFIX):
        _before_after(sel, tok, config, dense, run)
    fig = plots.layer_error_figure(
        cmp.layer_rel_error, title=f"Relative error of each layer's output ({cmp.errors_at})"
    )
    st.plotly_chart(fig, key="explorer_layer_err")
    e1, e2 = st.columns(2)
    with e1:
        figure_downloads(fig, "explorer_layer_error")
    with e2:
        table_downloads(export.metric_rows(cmp.as_dict(loaded.tokenizer)), "explorer_metrics")
    if info.is_decoder:
        st.caption(
            "Decoder: errors are measured at the last token only. Under ATP every earlier position's state "
            "depends on later tokens through the basis; only the last one sees nothing after it."
        )

    if info.is_decoder:
        st.markdown(
            "Decoder outputs shown: the next-token distribution after the prompt's last token and a greedy "
            "continuation. A teacher-forced perplexity over the prompt is **not** shown: the basis is "
            "computed from the whole prompt, so every position would see later tokens through it."
        )
        rows = []
        for i, ((di, dp), (ai, ap)) in enumerate(zip(cmp.top_dense, cmp.top_atp, strict=True)):
            rows.append(
                {
                    "#": i + 1,
                    "dense token": repr(loaded.tokenizer.decode([di])),
                    "dense p": dp,
                    "ATP token": repr(loaded.tokenizer.decode([ai])),
                    "ATP p": ap,
                }
            )
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="explorer_topk")
        table_downloads(rows, "explorer_top10")
        cont = None
        if st.toggle("Greedy continuation (32 tokens each; reruns the model per token)", key="show_cont"):
            try:
                cont = _continuation(sel.model_key, sel.text, config, 32)
            except BusyError as err:
                st.warning(str(err))
        if cont is not None:
            div = cont.first_divergence
            dense_txt, atp_txt = _decode(cont.dense_ids), _decode(cont.atp_ids)

            t1, t2 = st.columns(2)
            t1.markdown("**Dense**\n\n" + highlight_divergence(dense_txt, div))
            t2.markdown("**ATP**\n\n" + highlight_divergence(atp_txt, div))
            st.caption(
                "First diverging token: "
                + ("none" if div is None else f"position {div} (highlighted)")
                + f"; {cont.agreement:.0%} of positions agree."
            )

    st.subheader("Attention maps")
    if map_refusal:
        st.info(map_refusal)
    elif not applied:
        st.info(f"ATP is not applied to layer {map_layer} with the current layer selection.")
    else:
        dense_attn = cap.layers[map_layer].attn
        if dense_attn is None:
            dense_attn = get_capture(sel.model_key, sel.text, (map_layer,)).layers[map_layer].attn
        maps = compare.attention_maps(dense_attn, run, map_layer, map_head)
        show = {}
        for name, mat in (("dense", maps.dense), ("lifted", maps.lifted), ("diff", maps.difference)):
            show[name] = compare.downsample(mat, limits.map_display_size)
        principal, pblock = compare.downsample(maps.principal, limits.map_display_size)
        a1, a2 = st.columns(2)
        where = f"L{map_layer}_H{map_head}"
        fig = plots.heatmap_figure(
            show["dense"][0], title="Dense attention (L x L)", x_title="key token", block=show["dense"][1]
        )
        a1.plotly_chart(fig, key="map_dense")
        with a1:
            figure_downloads(fig, f"attention_dense_{where}")
        fig = plots.heatmap_figure(
            principal,
            title=f"ATP weights on {cmp.rank} principal keys (L x r)",
            x_title="principal key",
            block=pblock,
        )
        a2.plotly_chart(fig, key="map_principal")
        with a2:
            figure_downloads(fig, f"attention_atp_principal_{where}")
        b1, b2 = st.columns(2)
        fig = plots.heatmap_figure(
            show["lifted"][0],
            title="ATP lifted back to tokens (L x L)",
            x_title="key token",
            block=show["lifted"][1],
        )
        b1.plotly_chart(fig, key="map_lifted")
        with b1:
            figure_downloads(fig, f"attention_atp_lifted_{where}")
        fig = plots.heatmap_figure(
            show["diff"][0],
            title="ATP lifted minus dense",
            x_title="key token",
            diverging=True,
            block=show["diff"][1],
        )
        b2.plotly_chart(fig, key="map_diff")
        with b2:
            figure_downloads(fig, f"attention_difference_{where}")
        st.caption(
            "Linear form: the L x r map is A' = (1 (1^T U_r) + c Q K'^T) / denominator and the lifted map "
            "A' U_r^T (rows sum to 1 but entries can be negative: 1 + s is not a positive kernel). "
            "Exact form: the lifted map is the softmax over reconstructed keys A and the principal weights "
            "are A U_r, since A V_r = (A U_r) V'."
            + (
                " Decoder: the lifted map has weight above the diagonal, on tokens after the query: the "
                "basis mixes later tokens into every reconstructed key. That is why only the last token's "
                "outputs are reported here."
                if info.is_decoder
                else ""
            )
        )

    st.subheader("Error vs rank, both forms")
    st.markdown(
        "The **exact** form's error is the cost of dropping bases; what the **linear** form adds on top is "
        "the cost of linearising softmax. A large linearisation error is why the paper fine-tunes."
    )
    if st.button("Run the sweep", key="run_sweep") or st.session_state.get("sweep_ran"):
        st.session_state.sweep_ran = True
        try:
            sw = _sweep(sel.model_key, sel.text, layers, source, lowrank, method)
        except BusyError as err:
            st.session_state.sweep_ran = False  # not retried on every rerun: the button starts it again
            st.warning(str(err))
            return
        fig = plots.sweep_figure(
            sw.ranks, sw.exact, sw.linear, metric=sw.metric, n_tokens=sw.n_tokens, current=cmp.rank
        )
        st.plotly_chart(fig, key="explorer_sweep")
        w1, w2 = st.columns(2)
        with w1:
            figure_downloads(fig, "explorer_rank_sweep")
        with w2:
            table_downloads(export.sweep_rows(sw), "explorer_rank_sweep_table")


explorer()
