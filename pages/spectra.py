"""Low-rank spectra: singular values of every layer's attention input X, and of the keys per head."""

import numpy as np
import streamlit as st

from atp_app import navigation, runtime, widgets
from atp_app.sidebar import page_inputs
from atp_viz.analysis import lengths, spectra
from atp_viz.core.ranks import format_layers
from atp_viz.deploy.jobs import BusyError
from atp_viz.figures import plots
from atp_viz.outputs import export
from atp_viz.text import inputs as texts

navigation.use_this_navigation()
st.title("Low-rank spectra")
st.markdown(
    "Each layer's attention input X (L tokens x d features, exactly what feeds the Q/K/V projections) is "
    "decomposed as X = U S V^T. A fast-falling spectrum means a few principal directions carry most of X: "
    "the observation ATP is built on."
)

sel, loaded, cap = page_inputs()
info = cap.info

matrix = st.radio(
    "Matrix",
    ["Attention input X", "Residual stream"],
    horizontal=True,
    key="spectra_matrix",
    help="X is what feeds the Q/K/V projections and what ATP decomposes. The residual stream is the "
    "block's input; pre-norm models (Llama, SmolLM2) normalise each token before X, post-norm models "
    "(BERT) feed it as is, so there the two are the same.",
)
use_resid = matrix == "Residual stream"
c1, c2, c3 = st.columns([2, 2, 1])
mode = c1.radio(
    "Decomposition",
    ["SVD (uncentred)", "PCA (centred)"],
    horizontal=True,
    key="spectra_mode",
    help="ATP's basis is the top left singular vectors of X itself (uncentred). PCA subtracts the mean "
    "token first, which removes one large common direction.",
)
centered = mode.startswith("PCA")
skip_first = c2.checkbox(
    "Leave out the first token",
    key="skip_first",
    help="Decoders often give the first token huge activations (an attention sink). That single row can "
    "hold most of the energy and make a matrix look rank 1.",
)
log = c3.checkbox("Log scale", value=True, key="log_scale")
if skip_first and spectra.skip_first_refusal(cap.n_tokens):
    st.warning(spectra.skip_first_refusal(cap.n_tokens) + " Showing all tokens.")
    skip_first = False


def _matrix(i: int) -> np.ndarray:
    return cap.layers[i].resid if use_resid else cap.layers[i].x


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


sinks = [lengths.sink_ratio(layer.resid) for layer in cap.layers]
worst = int(np.argmax(sinks))
if sinks[worst] > 10:
    sink_layers = [i for i, r in enumerate(sinks) if r > 10]
    resid = runtime.layer_spectra(sel.model_key, sel.text, True, False, False)
    resid_r90 = [resid[i].rank_for(0.9) for i in sink_layers]
    st.warning(
        f"**Attention sink.** In the residual stream the first token's row is up to {sinks[worst]:.0f}x the "
        f"median token's (layers {format_layers(tuple(sink_layers))}). There that one row holds most of the "
        f"energy: those layers need only {_span(min(resid_r90), max(resid_r90))} "
        f"component{'' if max(resid_r90) == 1 else 's'} for 90% of it, a "
        "'rank 1' that says nothing about the other tokens. Tick *Leave out the first token* to see them. "
        + (
            "The layer's input norm rescales every token before Q/K/V, so the attention input X (what ATP "
            "decomposes) is not dominated by the sink: compare the two matrices above."
            if info.is_decoder
            else ""
        )
    )

layer_ids = list(range(info.n_layers))
chosen = st.multiselect("Layers", layer_ids, default=layer_ids, format_func=lambda i: f"layer {i}")
if not chosen:
    st.info("Pick at least one layer.")
    st.stop()
every_layer = runtime.layer_spectra(sel.model_key, sel.text, use_resid, centered, skip_first)
sps = [every_layer[i] for i in chosen]
labels = [f"layer {i}" for i in chosen]

what = "the residual stream (block input)" if use_resid else "the attention input X"
fig = plots.spectra_figure(sps, labels, log=log, title=f"Singular values of {what}, per layer")
widgets.chart(fig, key="spectra_sv")
widgets.figure_downloads(fig, "spectra_singular_values")
fig = plots.energy_figure(sps, labels, spectra.THRESHOLDS)
widgets.chart(fig, key="spectra_energy")
widgets.figure_downloads(fig, "spectra_cumulative_energy")
n_rows = sps[0].n_rows
table = spectra.ranks_table(sps)
fig = plots.ranks_heatmap(table, labels, spectra.THRESHOLDS, n_rows)
widgets.chart(fig, key="spectra_ranks")
widgets.figure_downloads(fig, "spectra_ranks_needed")
widgets.table_downloads(export.spectra_rows(sps, labels), "spectra_ranks_table")
st.download_button(
    "Spectra (.npz)",
    lambda sps=sps, labels=labels: export.spectra_npz(sps, labels),
    file_name="spectra.npz",
    mime="application/octet-stream",
    key="dl_spectra_npz",
    on_click="ignore",
    help="singular values per layer (sv_0, sv_1, ...), labels, effective ranks, ranks per threshold",
)
st.download_button(
    f"Captured activations (.npz, about {export.capture_nbytes(cap) / 1e6:.1f} MB)",
    lambda cap=cap: export.capture_npz(cap),
    file_name="capture.npz",
    mime="application/octet-stream",
    key="dl_capture_npz",
    on_click="ignore",
    help="per layer X, Q, K, V, attention maps where kept, block inputs and outputs (blocks.i.x, ...), "
    "tokens, input ids and model info",
)
st.latex(spectra.EFFECTIVE_RANK_FORMULA)
st.caption(
    "Rank needed for a threshold t: the smallest k with s_1^2 + ... + s_k^2 >= t (s_1^2 + ... + s_n^2). "
    f"Effective ranks here: {', '.join(f'{sp.effective_rank:.1f}' for sp in sps[:12])}"
    + (" ..." if len(sps) > 12 else "")
)

st.subheader("Keys per key/value head")
layer = st.selectbox("Layer", layer_ids, index=min(info.n_layers - 1, info.n_layers // 2), key="key_layer")
k = cap.layers[layer].k
hsp = spectra.head_spectra(k, centered=centered, skip_first=skip_first)
head_note = f"{info.n_kv_heads} key/value heads" + (
    f", each shared by {info.gqa_groups} query heads (grouped-query attention)" if info.gqa_groups > 1 else ""
)
fig = plots.spectra_figure(
    hsp,
    [f"kv head {h}" for h in range(len(hsp))],
    log=log,
    title=f"Singular values of the keys K, layer {layer} ({head_note})",
)
widgets.chart(fig, key="spectra_keys")
widgets.figure_downloads(fig, "spectra_keys")
if info.has_rope:
    st.caption("Keys are shown after the rotary position embedding, as attention sees them.")
fig = plots.token_norms_figure(
    np.linalg.norm(_matrix(layer), axis=1),
    texts.readable_tokens(cap.tokens),
    title=f"Row norm per token of {what}, layer {layer}",
)
widgets.chart(fig, key="spectra_norms")
widgets.figure_downloads(fig, "spectra_token_norms")

st.subheader("Are longer sequences relatively lower-rank?")
st.markdown(
    "The paper reports that short inputs (L <= 300) need about 45-50% of their components and long ones "
    "(L >= 600) 16-36% (MMLU prompts, Llama-2; the energy threshold was not stated). This runs the model "
    "on every sample in `data/` and on prefixes of the longest one, and plots rank needed / L."
)
threshold = st.select_slider(
    "Energy threshold", options=list(spectra.THRESHOLDS), value=0.9, format_func="{:.0%}".format
)


@st.cache_resource(show_spinner=False, max_entries=8)
def _length_study(model_key: str, threshold: float, centered: bool, skip_first: bool):
    with runtime.heavy_job("length study"), widgets.progress("Running the model on every sample...") as bar:
        sample_texts = [(s.title, s.read()) for s in texts.samples()]
        return lengths.length_study(
            runtime.get_model(model_key),
            sample_texts,
            threshold=threshold,
            centered=centered,
            skip_first=skip_first,
            progress=bar,
        )


if widgets.run_button("Run across all samples", "run_length_study", (sel.model_key,)):
    try:
        study = _length_study(sel.model_key, threshold, centered, skip_first)
    except BusyError as err:
        widgets.forget_run("run_length_study")  # the button starts it again; reruns do not retry
        st.warning(str(err))
        st.stop()
    for note in study.notes:
        st.caption(note)
    series = [study.mean_fraction] + [study.fractions[i] for i in chosen]
    names = ["mean over layers"] + labels
    fig = plots.fraction_vs_length_figure(study.lengths, np.array(series), names, info.d_model, threshold)
    widgets.chart(fig, key="spectra_length")
    widgets.figure_downloads(fig, "spectra_fraction_vs_length")
    st.markdown(lengths.describe_length_trend(study, info.d_model))
