"""Home: pick a model and a text, see its tokens and a one-glance low-rank summary."""

import numpy as np
import streamlit as st

from atp_app import navigation, runtime, widgets
from atp_app.sidebar import model_caption, page_inputs
from atp_viz.analysis import lengths, spectra
from atp_viz.analysis.lengths import sink_ratio
from atp_viz.figures import plots
from atp_viz.outputs import results
from atp_viz.text.inputs import readable_tokens

MAX_TOKENS_SHOWN = 600
START_HERE = (
    ("pages/spectra.py", "1. Low-rank spectra", ":material/insights:",
     "See that each layer's input X is described by far fewer directions than it has tokens: the "
     "observation ATP is built on."),
    ("pages/explorer.py", "2. Rank explorer", ":material/tune:",
     "Drag the rank r and compare ATP with dense attention: the error, the attention maps, and where one "
     "token looks."),
    ("pages/tour.py", "3. How ATP works (guided tour)", ":material/school:",
     "The method step by step on this model and text, ready for a class (presenter mode in the sidebar)."),
)  # fmt: skip
navigation.use_this_navigation()

st.title("ATP Explorer")
st.markdown(
    "Are the inputs of attention layers **low-rank**? If a sequence of L tokens is well described by "
    "r << L principal directions, attention can be computed on those r *principal keys* instead of all L "
    "tokens: **ATP**, *Attention on Top Principal keys* (Niu, Prakash, Avestimehr, arXiv 2403.02352). "
    "Pick a model and a text in the sidebar; the pages show the spectra behind the claim."
)

# A first-time path through the app: three pages, one sentence each.
st.markdown("**Start here**")
for column, (page, label, icon, sentence) in zip(st.columns(3), START_HERE, strict=True):
    column.page_link(page, label=label, icon=icon)
    column.caption(sentence)

sel, loaded, cap = page_inputs()
st.caption(model_caption(loaded))

sps = spectra.layer_spectra([layer.x for layer in cap.layers])
eranks = [sp.effective_rank for sp in sps]
r90 = [sp.rank_for(0.9) for sp in sps]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Tokens L", f"{cap.n_tokens:,}", help="after truncation to the model's limit, if any")
c2.metric("Width d", cap.info.d_model)
c3.metric("Mean effective rank", f"{np.mean(eranks):.1f}", help="averaged over layers")
c4.metric(
    "Mean rank for 90% energy",
    f"{np.mean(r90):.1f}",
    f"{np.mean(r90) / cap.n_tokens:.0%} of L",
    delta_color="off",
)

fig = plots.effective_rank_figure(eranks, r90, cap.n_tokens, cap.info.d_model)
widgets.chart(fig, key="home_erank")
widgets.figure_downloads(fig, "home_effective_rank")


@st.cache_resource(show_spinner=False, max_entries=8)
def _erank_by_length(model_key: str, text: str):
    with widgets.progress("Effective rank on prefixes of the text...") as bar:
        return lengths.effective_rank_by_length(runtime.get_model(model_key), text, progress=bar)


prefixes, by_len = _erank_by_length(sel.model_key, sel.text)
if prefixes.size > 1:
    fig = plots.fraction_vs_length_figure(
        prefixes,
        by_len / prefixes,
        [f"layer {i}" for i in range(len(by_len))],
        cap.info.d_model,
        0.0,
        title="Effective rank / L on prefixes of this text (lower = relatively lower-rank)",
        y_title="effective rank / L",
    )
    widgets.chart(fig, key="home_erank_length")
    widgets.figure_downloads(fig, "home_effective_rank_by_length")
st.latex(spectra.EFFECTIVE_RANK_FORMULA)
st.caption(
    "Effective rank (Roy & Vetterli, 2007) of each layer's attention input X (uncentred, all tokens). "
    "It is 1 for a rank-1 matrix and min(L, d) for a flat spectrum."
)
sink = max(sink_ratio(layer.resid) for layer in cap.layers)
if sink > 10:
    st.warning(
        f"In the residual stream the first token's activations are up to {sink:.0f}x the median token's (an "
        "*attention sink*). That one row dominates the energy and makes those layers look nearly rank 1. The "
        "spectra page compares the residual stream with the attention input X and can leave the first token "
        "out to show the structure of the others."
    )

st.subheader(f"Tokens ({cap.n_tokens:,})")
shown = readable_tokens(cap.tokens[:MAX_TOKENS_SHOWN])
st.code(" | ".join(shown), language=None, wrap_lines=True)
if cap.n_tokens > MAX_TOKENS_SHOWN:
    st.caption(f"Showing the first {MAX_TOKENS_SHOWN} of {cap.n_tokens:,} tokens; all of them are used.")


@st.cache_data(show_spinner=False, ttl=600)
def _scoreboard() -> tuple[str, str]:
    """The claims table, read from the committed run files once, not on every rerun of the page, and the
    README's account of why the open goals stay open."""
    return results.table("goals"), results.readme_part("why-open")


with st.expander("Does ATP hold up? The paper's claims against this project's measurements"):
    try:
        board, why = _scoreboard()
    except ValueError as err:  # an installed copy without the repository's docs/ or README
        st.info(f"The measured runs are not in this copy: {err}")
    else:
        st.markdown(board)
        st.markdown(why)
    st.caption(
        "From the committed fine-tuning and long-context runs (held-out text, 95% intervals); the README "
        "lists every run and the command that made it. A tuned run appears in the sidebar when its adapters "
        "are in data/tuned/."
    )
