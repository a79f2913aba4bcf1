"""Rank explorer: drag the rank, see ATP next to dense attention on the same text."""

import pandas as pd
import streamlit as st

from atp_viz import compare, plots
from atp_viz.engine import ATPConfig, parse_layers
from atp_viz.texts import Tokenized, tokenize
from ui import get_capture, get_model, highlight_divergence, page_inputs

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
    bar = st.progress(0.0, text="Sweeping ranks...")
    try:
        base = ATPConfig(layers=layers, basis_source=source, lowrank_linear=lowrank, basis_method=method)
        return compare.error_sweep(
            m,
            tok,
            _dense(model_key, text),
            base,
            compare.sweep_ranks(tok.n_tokens),
            progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg),
        )
    finally:
        bar.empty()


@st.cache_resource(show_spinner=False, max_entries=16)
def _continuation(model_key: str, text: str, config: ATPConfig, n_new: int) -> compare.Continuation:
    bar = st.progress(0.0, text="Greedy decoding, dense and ATP...")
    try:
        m = get_model(model_key)
        return compare.continuation(
            m,
            _tokenized(model_key, text),
            config,
            n_new=n_new,
            progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg),
        )
    finally:
        bar.empty()


def _decode(ids) -> list[str]:
    return [loaded.tokenizer.decode([i]) for i in ids]


@st.fragment
def explorer() -> None:
    c1, c2, c3 = st.columns([3, 2, 2])
    unit = c2.radio("Rank as", ["fraction of L", "tokens"], horizontal=True, key="rank_unit")
    if unit == "tokens":
        rank = c1.slider("Rank r (principal keys)", 1, L, max(1, L // 2), key="rank_tokens")
    else:
        frac = c1.slider("Rank r / L", 0.05, 1.0, 0.5, 0.05, key="rank_frac")
        rank = frac
    form = c3.radio(
        "Form", ["exact", "linear"], horizontal=True, key="form", help="linear = the paper's form"
    )
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
    map_layer = m1.selectbox("Map: layer", list(range(info.n_layers)), index=0, key="map_layer")
    map_head = m2.selectbox("Map: query head", list(range(info.n_heads)), index=0, key="map_head")
    applied = layers == "all" or map_layer in layers

    tok = _tokenized(sel.model_key, sel.text)
    dense = _dense(sel.model_key, sel.text)
    run = compare.forward(loaded, tok, config, map_layers=[map_layer] if applied else [])
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
    st.plotly_chart(
        plots.layer_error_figure(
            cmp.layer_rel_error, title=f"Relative error of each layer's output ({cmp.errors_at})"
        ),
        key="explorer_layer_err",
    )
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
        if st.toggle("Greedy continuation (32 tokens each; reruns the model per token)", key="show_cont"):
            cont = _continuation(sel.model_key, sel.text, config, 32)
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
    if not applied:
        st.info(f"ATP is not applied to layer {map_layer} with the current layer selection.")
    else:
        dense_attn = cap.layers[map_layer].attn
        if dense_attn is None:
            dense_attn = get_capture(sel.model_key, sel.text, (map_layer,)).layers[map_layer].attn
        maps = compare.attention_maps(dense_attn, run, map_layer, map_head)
        show = {}
        for name, mat in (("dense", maps.dense), ("lifted", maps.lifted), ("diff", maps.difference)):
            show[name] = compare.downsample(mat, 256)
        principal, pblock = compare.downsample(maps.principal, 256)
        a1, a2 = st.columns(2)
        a1.plotly_chart(
            plots.heatmap_figure(
                show["dense"][0], title="Dense attention (L x L)", x_title="key token", block=show["dense"][1]
            ),
            key="map_dense",
        )
        a2.plotly_chart(
            plots.heatmap_figure(
                principal,
                title=f"ATP weights on {cmp.rank} principal keys (L x r)",
                x_title="principal key",
                block=pblock,
            ),
            key="map_principal",
        )
        b1, b2 = st.columns(2)
        b1.plotly_chart(
            plots.heatmap_figure(
                show["lifted"][0],
                title="ATP lifted back to tokens (L x L)",
                x_title="key token",
                block=show["lifted"][1],
            ),
            key="map_lifted",
        )
        b2.plotly_chart(
            plots.heatmap_figure(
                show["diff"][0],
                title="ATP lifted minus dense",
                x_title="key token",
                diverging=True,
                block=show["diff"][1],
            ),
            key="map_diff",
        )
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
        sw = _sweep(sel.model_key, sel.text, layers, source, lowrank, method)
        st.plotly_chart(
            plots.sweep_figure(
                sw.ranks, sw.exact, sw.linear, metric=sw.metric, n_tokens=sw.n_tokens, current=cmp.rank
            ),
            key="explorer_sweep",
        )


explorer()
