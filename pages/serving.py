"""Serving with ATP: generation from a compressed KV cache, and a strictly causal perplexity."""

import pandas as pd
import streamlit as st

from atp_viz import atp, plots, serving, texts
from atp_viz.jobs import BusyError
from atp_viz.texts import tokenize
from ui import figure_downloads, get_model, heavy_job, highlight_divergence, page_inputs, table_downloads

MAX_PROMPT = 1024

st.title("Serving: compressed KV cache and causal perplexity")
st.markdown(
    "The paper's promise is faster serving: attend over r principal keys instead of L tokens. Here a "
    "decoder **prefills the prompt densely, compresses each layer's prompt keys/values into r principal "
    "keys/values** (basis from the prompt, which is fully known at that point), and generates new tokens "
    "that attend to those r entries plus the exact keys/values of the tokens generated so far."
)

sel, loaded, cap = page_inputs()
info = loaded.info
if not info.is_decoder:
    st.info(f"{info.label} is an encoder; serving applies to decoders. Pick SmolLM2 in the sidebar.")
    st.stop()


@st.cache_resource(show_spinner=False, max_entries=16)
def _generate(model_key: str, text: str, rank, form: str, n_new: int):
    m = get_model(model_key)
    tok = tokenize(m.tokenizer, text, min(MAX_PROMPT, m.info.max_tokens), min_tokens=1)
    r, notice = atp.resolve_rank(rank, tok.n_tokens)
    with heavy_job("generation"):
        bar = st.progress(0.0, text="Dense generation...")
        try:
            dense = serving.generate(
                m,
                tok.input_ids,
                rank=None,
                max_new_tokens=n_new,
                progress=lambda f, msg: bar.progress(f / 2, text="dense: " + msg),
            )
            comp = serving.generate(
                m,
                tok.input_ids,
                rank=r,
                form=form,
                max_new_tokens=n_new,
                progress=lambda f, msg: bar.progress(0.5 + f / 2, text="ATP cache: " + msg),
            )
        finally:
            bar.empty()
    return tok, r, notice, dense, comp


st.subheader("Generation: dense cache vs ATP-compressed prompt cache")
c1, c2, c3 = st.columns([3, 2, 2])
frac = c1.slider("Rank r / prompt length", 0.05, 1.0, 0.5, 0.05, key="serve_rank")
form = c2.radio(
    "Form",
    ["exact", "linear"],
    horizontal=True,
    key="serve_form",
    help="linear: the paper's form, a true compression (K', V', U_r^T 1). exact: softmax on the "
    "reconstructed keys, which also needs U_r (L x r) in the cache.",
)
n_new = c3.number_input("New tokens (at most)", 1, 64, 32, key="serve_new")
if st.button("Generate", key="serve_go", type="primary") or st.session_state.get("serve_ran"):
    st.session_state.serve_ran = True
    try:
        tok, r, notice, dense, comp = _generate(sel.model_key, sel.text, frac, form, int(n_new))
    except ValueError as err:
        st.error(str(err))
        st.stop()
    except BusyError as err:
        st.session_state.serve_ran = False  # the button starts it again; reruns do not retry
        st.warning(str(err))
        st.stop()
    if tok.notice:
        st.info(
            f"The prompt has {tok.n_original:,} tokens; generation here uses at most {MAX_PROMPT} (and the "
            f"model's limit), so only the first {tok.n_tokens:,} are used."
        )
    if notice:
        st.info(notice)
    share, first = serving.agreement(dense.new_ids, comp.new_ids)
    k1, k2, k3, k4 = st.columns(4)
    k1.metric("Prompt tokens / rank", f"{tok.n_tokens} / {r}")
    k2.metric("Token agreement", f"{share:.0%}", help="share of positions where the two greedy texts agree")
    k3.metric(
        "KV cache, ATP",
        f"{comp.kv_cache_bytes / 1e6:.2f} MB",
        f"{comp.kv_cache_bytes / dense.kv_cache_bytes:.0%} of dense",
        delta_color="off",
    )
    k4.metric("KV cache, dense", f"{dense.kv_cache_bytes / 1e6:.2f} MB")
    dec = [loaded.tokenizer.decode([i]) for i in dense.new_ids]
    atp_dec = [loaded.tokenizer.decode([i]) for i in comp.new_ids]
    gen_row = {
        "prompt_tokens": tok.n_tokens,
        "rank": r,
        "form": form,
        "token_agreement": share,
        "first_divergence": first,
        "kv_cache_bytes_atp": comp.kv_cache_bytes,
        "kv_cache_bytes_dense": dense.kv_cache_bytes,
        "dense_text": "".join(dec),
        "atp_text": "".join(atp_dec),
    }
    table_downloads([gen_row], "serving_generation")

    t1, t2 = st.columns(2)
    t1.markdown("**Dense KV cache**\n\n" + highlight_divergence(dec, first))
    t2.markdown(f"**ATP cache (r = {r}, {form})**\n\n" + highlight_divergence(atp_dec, first))
    st.caption(
        "First diverging token: " + ("none" if first is None else f"position {first} (highlighted)") + ". "
        "Cache sizes count float32 keys/values of all layers at the end of generation; the tokens generated "
        "so far are kept exactly in both. Generation stops at EOS or the token limit."
    )

st.subheader("Strictly causal perplexity")
st.markdown(
    "Teacher-forced perplexity over a text would leak future tokens through a basis computed from the "
    "whole text. Here the text is processed in chunks: each chunk attends to the **past chunks compressed "
    "to r principal keys/values (basis from past tokens only)** and to itself exactly and causally, so "
    "the prediction at position i sees tokens <= i only (a test perturbs later tokens to check)."
)
src = st.radio(
    "Text",
    ["Python standard-library docstrings (real text this project did not write)", "The sidebar text"],
    key="ppl_src",
)
p1, p2, p3 = st.columns(3)
n_tokens = p1.number_input(
    "Tokens", 64, min(8192, info.max_tokens), min(2048, info.max_tokens), 64, key="ppl_tokens"
)
chunk = p2.number_input("Chunk size", 8, 2048, 256, 8, key="ppl_chunk")
forms = p3.multiselect("Forms", ["exact", "linear"], ["exact", "linear"], key="ppl_forms")
ranks = st.multiselect(
    "Ranks r (principal keys for the past)",
    [8, 16, 32, 64, 128, 256, 512],
    [16, 32, 64, 128],
    key="ppl_ranks",
)


@st.cache_resource(show_spinner=False, max_entries=8)
def _perplexity(model_key: str, text: str, n_tokens: int, chunk: int, ranks: tuple, forms: tuple):
    m = get_model(model_key)
    tok = tokenize(m.tokenizer, text, n_tokens)
    runs = [(None, "exact")] + [(r, f) for f in forms for r in ranks]
    with heavy_job("perplexity grid"):
        bar = st.progress(0.0, text="Perplexity...")
        out = []
        try:
            for j, (r, f) in enumerate(runs):
                label = "dense" if r is None else f"{f} r={r}"
                out.append(
                    serving.perplexity(
                        m,
                        tok.input_ids,
                        rank=r,
                        form=f,
                        chunk=chunk,
                        progress=lambda x, msg, j=j, label=label: bar.progress(
                            (j + x) / len(runs), text=f"{label}: {msg}"
                        ),
                    )
                )
        finally:
            bar.empty()
    return tok, out


if st.button("Run the perplexity grid", key="ppl_go") and forms and ranks:
    text = serving.stdlib_text()[0] if src.startswith("Python") else sel.text
    try:
        tok, res = _perplexity(
            sel.model_key, text, int(n_tokens), int(chunk), tuple(sorted(ranks)), tuple(forms)
        )
    except (ValueError, texts.TextError) as err:
        st.error(str(err))
        st.stop()
    except BusyError as err:
        st.warning(str(err))
        st.stop()
    if tok.n_tokens < n_tokens:
        st.info(f"The text has only {tok.n_tokens} tokens; all of them were used.")
    dense, rest = res[0], res[1:]
    table = serving.as_table(rest, dense)
    shown = pd.DataFrame(table)
    shown["rank"] = shown["rank"].astype(str)  # "dense" next to ints: one type for Arrow
    st.dataframe(shown, hide_index=True, key="ppl_table")
    table_downloads(table, "perplexity_table")
    by_form_r = {f: [x.rank for x in rest if x.form == f] for f in forms}
    fig = plots.rank_grid_figure(
        by_form_r,
        {f: [x.perplexity for x in rest if x.form == f] for f in forms},
        dense.perplexity,
        title=f"Perplexity over {tok.n_tokens} tokens, chunks of {chunk}",
        y_title="perplexity",
        log_y=True,
    )
    st.plotly_chart(fig, key="ppl_fig")
    figure_downloads(fig, "perplexity_vs_rank")
    fig = plots.rank_grid_figure(
        by_form_r,
        {f: [x.top1 for x in rest if x.form == f] for f in forms},
        dense.top1,
        title="Next-token top-1 accuracy",
        y_title="top-1 accuracy",
    )
    st.plotly_chart(fig, key="ppl_top1")
    figure_downloads(fig, "top1_vs_rank")
