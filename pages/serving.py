"""Serving with ATP: generation from a compressed KV cache, and a strictly causal perplexity."""

import pandas as pd
import streamlit as st

from atp_app import layer_split, navigation, runtime, widgets
from atp_app.sidebar import offer_decoder, page_inputs
from atp_viz import forms
from atp_viz.analysis import allocation, protocol, serving
from atp_viz.core.progress import within
from atp_viz.core.ranks import (
    RANK_MODE_LABELS,
    RANK_MODES,
    describe_window,
    format_layer_shares,
    resolve_rank,
)
from atp_viz.deploy.jobs import BusyError
from atp_viz.figures import plots
from atp_viz.hf.engine import BASIS_SOURCES
from atp_viz.hf.tuned import as_tuned
from atp_viz.text.inputs import TextError, tokenize

MAX_PROMPT = 1024
navigation.use_this_navigation()

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
    offer_decoder(loaded, "serving (generation from a compressed KV cache, causal perplexity)")
    st.stop()


@st.cache_resource(show_spinner=False, max_entries=16)
def _generate(
    model_key: str, text: str, rank, form: str, n_new: int, basis_from: str = "input", centre: bool = False
):
    m = runtime.get_model(model_key)
    tok = tokenize(m.tokenizer, text, min(MAX_PROMPT, m.info.max_tokens), min_tokens=1)
    r, notice = resolve_rank(rank, tok.n_tokens)
    with runtime.heavy_job("generation"), widgets.progress("Dense generation...") as bar:
        ids = tok.input_ids
        dense = serving.generate(
            m, ids, rank=None, max_new_tokens=n_new, progress=within(bar, 0, 0.5, "dense: ")
        )
        comp = serving.generate(
            m, ids, rank=r, form=form, max_new_tokens=n_new, basis_from=basis_from, centre_basis=centre,
            progress=within(bar, 0.5, 1, "ATP cache: "),
        )  # fmt: skip
    return tok, r, notice, dense, comp


st.subheader("Generation: dense cache vs ATP-compressed prompt cache")
trained = as_tuned(sel.model_key)  # a tuned model starts out read the way it was tuned, here and below
if st.session_state.get("_serve_model") != sel.model_key:
    for key in ("serve_form", "serve_rank"):
        st.session_state.pop(key, None)
    st.session_state["_serve_model"] = sel.model_key
share = trained["rank"] if isinstance(trained["rank"], float) else 0.5  # the slider takes shares only
c1, c2, c3 = st.columns([3, 2, 2])
frac = c1.slider(
    "Rank r / prompt length", 0.05, 1.0, min(1.0, max(0.05, round(share * 20) / 20)), 0.05, key="serve_rank"
)
form = c2.radio(
    "Form",
    forms.names(),
    index=forms.names().index(trained["form"]),
    horizontal=True,
    key="serve_form",
    help="; ".join(f"{n}: {forms.get(n).description}" for n in forms.names())
    + ". The cache keeps what each form needs (the exact form also keeps U_r, L x r, to rebuild the keys).",
)
n_new = c3.number_input("New tokens (at most)", 1, 64, 32, key="serve_new")
if widgets.run_button("Generate", "serve_go", (sel.model_key, sel.text), type="primary"):
    try:
        tok, r, notice, dense, comp = _generate(
            sel.model_key, sel.text, frac, form, int(n_new), trained["basis_from"], trained["centre_basis"]
        )
    except ValueError as err:
        widgets.forget_run("serve_go")  # the button starts it again; reruns do not retry
        st.error(str(err))
        st.stop()
    except BusyError as err:
        widgets.forget_run("serve_go")  # the button starts it again; reruns do not retry
        st.warning(str(err))
        st.stop()
    if tok.notice:
        st.info(
            f"The prompt has {tok.n_original:,} tokens; generation here uses at most {MAX_PROMPT} (and the "
            f"model's limit), so only the first {tok.n_tokens:,} are used."
        )
    if notice:
        st.info(notice)
    if dense.context_notice or comp.context_notice:
        st.info(dense.context_notice or comp.context_notice)
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
    if trained["rank"] is not None:
        centred = ", centred" if trained["centre_basis"] else ""
        per_layer = (
            f" It was tuned with its own rank per layer ({format_layer_shares(trained['layer_ranks'])} of "
            "L); generation runs one rank in every layer (the perplexity below reads it as tuned)."
            if trained["layer_ranks"]
            else ""
        )
        st.caption(
            f"The prompt's basis: the {BASIS_SOURCES[trained['basis_from']]}{centred}, as this run was tuned."
            + per_layer
        )
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
    widgets.table_downloads([gen_row], "serving_generation")

    t1, t2 = st.columns(2)
    t1.markdown("**Dense KV cache**\n\n" + widgets.highlight_divergence(dec, first))
    t2.markdown(f"**ATP cache (r = {r}, {form})**\n\n" + widgets.highlight_divergence(atp_dec, first))
    st.caption(
        "First diverging token: " + ("none" if first is None else f"position {first} (highlighted)") + ". "
        "Cache sizes count float32 keys/values of all layers at the end of generation; the tokens generated "
        "so far are kept exactly in both. Generation stops at EOS, the token limit or the model's context."
    )

st.subheader("Strictly causal perplexity")
st.markdown(
    "Teacher-forced perplexity over a text would leak future tokens through a basis computed from the "
    "whole text. Here each window is read in chunks: each chunk attends to the **past chunks compressed "
    "to r principal keys/values (basis from past tokens only)** and to itself exactly and causally, so "
    "the prediction at position i sees tokens <= i only (a test perturbs later tokens to check). Scored: "
    "the predictions from positions whose past is compressed (chunk 1 onwards), the same positions for "
    "dense and every setting; 95% intervals by bootstrap over windows, differences to dense paired."
)
src = st.radio(
    "Text",
    [
        "Held-out standard-library docstring modules (real text this project did not write)",
        "The sidebar text",
    ],
    key="ppl_src",
)
if st.session_state.get("_ppl_model") != sel.model_key:
    # Another model: the widgets whose defaults come from it start from them again (a kept value would
    # read a tuned run otherwise than it was tuned, or an untuned model as the last tuned run).
    for key in (
        "ppl_seq", "ppl_chunk", "ppl_rank_mode", "ppl_basis", "ppl_centre", "ppl_window", "ppl_sinks",
        "ppl_update", "ppl_ranks", "ppl_layer_split",
    ):  # fmt: skip
        st.session_state.pop(key, None)
    st.session_state["_ppl_model"] = sel.model_key
p1, p2, p3, p4 = st.columns(4)
n_windows = p1.number_input(
    "Windows (held-out text)", 1, 200, 8, key="ppl_windows", disabled=not src.startswith("Held")
)
seq_top = min(4096, info.max_tokens)
seq_len = p2.number_input(
    "Tokens per window", 64, seq_top, max(64, min(trained["seq_len"] or 512, seq_top)), 64, key="ppl_seq"
)
chunk = p3.number_input("Chunk size", 8, 2048, min(2048, max(8, trained["chunk"] or 128)), 8, key="ppl_chunk")
if trained["seq_len"] and (seq_len, chunk) != (trained["seq_len"], trained["chunk"]):
    st.caption(
        f"This run was tuned on windows of {trained['seq_len']} tokens in chunks of {trained['chunk']}."
    )
rank_mode = p4.radio(
    "Rank",
    RANK_MODES,
    index=RANK_MODES.index(trained["rank_mode"] or "past"),
    key="ppl_rank_mode",
    format_func=RANK_MODE_LABELS.get,
    help="For a share of L: 'past' keeps that share of the compressed past (the current chunk is attended "
    "exactly on top); 'effective' makes the attended share of the key set equal it on average (the paper's "
    "r = L/2). Ints are numbers of principal keys either way.",
)
q1, q2, q3, q4 = st.columns(4)
basis_from = q1.radio(
    "Basis from", ["input", "keys"], index=["input", "keys"].index(trained["basis_from"]), key="ppl_basis",
    horizontal=True, help="the past's attention inputs X (the paper's) or its keys (default: what a tuned "
    "model was tuned with)",
)  # fmt: skip
centre = q1.checkbox(
    "Centred basis", value=trained["centre_basis"], key="ppl_centre",
    help="the past's mean token as U_r's first column (README: 'A centred basis'); with the SVD per chunk "
    "only (default: what a tuned model was tuned with)",
)  # fmt: skip
window = q2.number_input(
    "Exact window (tokens)", 0, 8192, int(trained["window"]), 16, key="ppl_window",
    help="each chunk also reads the last N past tokens exactly, and only the rest of its past (the middle) "
    "is compressed; a row 'middle dropped' then shows the window alone, so you see what the principal keys "
    "add",
)  # fmt: skip
sinks = q3.number_input(
    "Exact sinks (first tokens)", 0, 64, int(trained["sinks"]), 1, key="ppl_sinks", disabled=not window,
    help="with a window: the first N tokens are read exactly too (attention sinks)",
)  # fmt: skip
UPDATES = {"recompute": "recompute (SVD per chunk)", "moments": "running sums"}
basis_update = q4.radio(
    "Basis update", list(UPDATES), index=list(UPDATES).index(trained["basis_update"]), key="ppl_update",
    format_func=UPDATES.get, help="running sums of the past keep its basis at a cost that does not grow with "
    "the past; only linear and pksoftmax can use them (exact and taylor2 rebuild past keys from U_r and "
    "recompute; each row says which it used). Default: what a tuned model was tuned with",
)  # fmt: skip
form_names = st.multiselect("Forms", forms.names(), list(forms.names()), key="ppl_forms")
RANK_CHOICES = [8, 16, 32, 64, 128, 256, 0.25, 0.5]
tuned_rank = [trained["rank"]] if trained["rank"] is not None else []  # the rank it was tuned at, offered
ranks = st.multiselect(
    "Ranks r (ints: principal keys for the past; fractions: a share of L)",
    sorted(set(RANK_CHOICES + tuned_rank), key=float),
    sorted(set([16, 32, 64, 128] + tuned_rank), key=float),
    key="ppl_ranks",
)
split_how, split_budget = layer_split.grid_choice(st, sel.model_key, info)


@st.cache_resource(show_spinner=False, max_entries=8)
def _perplexity(
    model_key: str, text: str | None, n_windows: int, seq_len: int, chunk: int, settings: tuple, mode: str,
    basis_from: str = "input", keep: serving.ExactKeep | None = None, basis_update: str = "recompute",
    split_how: str = "", split_budget: float | None = None, centre: bool = False,
):  # fmt: skip
    m = runtime.get_model(model_key)
    if text is None:
        windows = protocol.heldout_windows(m.tokenizer, seq_len, max_windows=n_windows)
    else:
        windows = protocol.text_windows(m.tokenizer, text, seq_len, label="sidebar text")
    with runtime.heavy_job("perplexity grid"), widgets.progress("Perplexity...") as bar:
        split = None
        if split_how:  # the spectra are measured once per weights and basis, then read from disk
            split = allocation.budget_splitter(
                split_how, m, basis_source=basis_from, centre_basis=centre, budget=split_budget,
                progress=within(bar, 0.0, 0.05, "per-layer ranks: "),
            )  # fmt: skip
        rows = protocol.perplexity_grid(
            m, windows, settings, chunk=chunk, rank_mode=mode, basis_from=basis_from, keep=keep,
            basis_update=basis_update, centre_basis=centre, layer_split=split,
            progress=within(bar, 0.05 if split else 0.0, 1.0),
        )  # fmt: skip
    return len(windows.ids), rows


go = st.button("Run the perplexity grid", key="ppl_go")
if go and not (form_names and ranks):
    st.warning("Pick at least one form and one rank for the grid.")
elif go and centre and basis_update == "moments":  # refused before any row runs, as the CLI does
    st.warning("A centred basis needs the SVD per chunk: pick Basis update 'recompute', or untick it.")
    go = False
if go and form_names and ranks:
    settings = tuple((r, f) for f in form_names for r in sorted(ranks, key=float))
    text = None if src.startswith("Held") else sel.text
    keep = serving.ExactKeep(int(sinks), int(window)) if window else None
    try:
        n_win, rows = _perplexity(
            sel.model_key,
            text,
            int(n_windows),
            int(seq_len),
            int(chunk),
            settings,
            rank_mode,
            basis_from,
            keep,
            basis_update,
            split_how,
            split_budget,
            centre,
        )
    except (ValueError, TextError) as err:
        st.error(str(err))
        st.stop()
    except BusyError as err:
        st.warning(str(err))
        st.stop()
    first = f"the first {sinks} tokens and " if sinks else ""
    exact = f"; each chunk also reads {first}the {window} before it exactly" if keep else ""
    if keep and keep.covers(seq_len, chunk):
        st.warning(
            f"The {describe_window(window, sinks)} covers the whole past of every chunk: nothing is "
            "compressed, so the ATP rows equal dense. Use longer windows of text or a smaller exact window."
        )
    centred = " (centred)" if centre else ""
    st.caption(
        f"{n_win} windows of {seq_len} tokens, chunks of {chunk}, basis from {basis_from}{centred}{exact}."
    )
    if split_how and not any("layer_ranks" in r for r in rows):
        st.warning(
            "Ranks per layer apply to ranks given as a share of L"
            + ("" if split_how == "spectrum" else " equal to the tuned run's budget")
            + "; none was chosen, so every row keeps one rank in every layer."
        )
    table = protocol.grid_table(rows)
    st.dataframe(pd.DataFrame(table), hide_index=True, key="ppl_table")
    widgets.table_downloads(table, "perplexity_table")
    # sorted by the x of the figures below, so each form's line runs left to right (ints and shares of L mix)
    dense, rest = rows[0], sorted(rows[1:], key=lambda x: x.get("attended_share") or 0.0)
    alone = next((x for x in rest if x["rank"] == "window" and x.get("n_scored")), None)
    # x: the mean attended share of the key set, comparable across ints and shares of L and both rank modes
    by_form_r = {
        f: [x["attended_share"] for x in rest if x["form"] == f and x.get("n_scored")] for f in form_names
    }
    for key, metric, y_title, log_y in (
        ("ppl_fig", "perplexity", "perplexity", True),
        ("ppl_top1", "top1", "top-1 accuracy", False),
    ):
        fig = plots.rank_grid_figure(
            by_form_r,
            {f: [x[metric] for x in rest if x["form"] == f and x.get("n_scored")] for f in form_names},
            dense[metric],
            title=f"{y_title} over {dense['n_scored']} scored predictions, chunks of {chunk}",
            y_title=y_title,
            log_y=log_y,
            references={"window alone": alone[metric]} if alone else None,
        )
        fig.update_xaxes(title_text="mean attended share of the key set", type="linear", range=[0, 1.02])
        st.plotly_chart(fig, key=key)
        widgets.figure_downloads(fig, f"{metric}_vs_rank")
