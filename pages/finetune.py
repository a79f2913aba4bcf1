"""Low-rank-aware fine-tuning: train LoRA adapters with ATP in place, watch the loss, compare runs."""

import hashlib

import pandas as pd
import streamlit as st

from atp_app import navigation, runtime, widgets
from atp_viz import forms
from atp_viz.analysis.finetune import evaluation, training
from atp_viz.analysis.finetune.config import LAYER_RANK_CHOICES, TRAIN_ATTENTION, TuneConfig
from atp_viz.analysis.finetune.job import TuneJob
from atp_viz.core.ranks import RANK_MODE_LABELS, RANK_MODES
from atp_viz.deploy import jobs
from atp_viz.figures import plots
from atp_viz.hf import tuned
from atp_viz.hf.engine import BASIS_SOURCES
from atp_viz.hf.model_info import ModelLoadError
from atp_viz.text.corpus import HELDOUT_MODULES, TRAIN_MODULES

navigation.use_this_navigation()

st.title("Low-rank-aware fine-tuning")
st.markdown(
    "The paper's accuracy claim (about the same as dense at r = L/2, about 2% lower at r = L/4) holds "
    "**after fine-tuning with ATP in place**. Here, LoRA adapters (peft) on the attention and MLP "
    "projections are trained while every attention layer runs ATP at the chosen rank and form; the "
    "basis is recomputed from the activations at each step and held fixed for the gradient.\n\n"
    "- **Two stages**: first (optional) *layer-wise attention transfer*: each layer's ATP output is "
    "fitted to the dense layer's output on the same input (the form's per-head parameters and the query "
    "/ key adapters only), as LoLCATs does for linear attention; then end-to-end LoRA.\n"
    "- **Encoder (MiniLM)**: distil toward the dense model's own sentence embeddings (loss 1 - cosine).\n"
    "- **Decoder (SmolLM2)**: next-token loss in the strictly causal chunked mode (each chunk sees the "
    "compressed past of earlier chunks only), so the model cannot learn to read the future through the "
    "basis.\n"
    "- **Data**: Python standard-library docstrings, split by module: "
    f"{len(TRAIN_MODULES)} modules for training, {len(HELDOUT_MODULES)} held out "
    f"({', '.join(HELDOUT_MODULES)}) for every metric below."
)

# ------------------------------------------------------------------------------------------------
st.header("Finished runs")
runs = tuned.find_runs()
if not runs:
    st.info(
        "No finished run yet. Start one below, or from a terminal: "
        "`python -m atp_viz finetune --model minilm --rank 0.5 --form exact`."
    )
if runs:
    summary = evaluation.summary_rows(runs)
    st.dataframe(pd.DataFrame(summary), hide_index=True, key="runs_summary")
    widgets.table_downloads(summary, "finetune_runs_summary")
for path, meta in runs:
    s = meta["settings"]
    with st.expander(f"{tuned.tuned_label(meta)}: {s['steps']} steps, {path}", expanded=len(runs) == 1):
        st.caption(meta["metrics"]["what"])
        rows = evaluation.metrics_table(meta)
        st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"runs_{path}")
        uid = hashlib.sha1(str(path).encode()).hexdigest()[:8]  # two roots may hold the same folder name
        widgets.table_downloads(rows, f"finetune_{uid}")
        if meta.get("transfer_losses"):
            fig = plots.loss_curve_figure(
                meta["transfer_losses"],
                title="Stage 1, layer-wise attention transfer (mean squared error over layers)",
                y_title="ATP vs dense layer output",
            )
            st.plotly_chart(fig, key=f"transfer_loss_{path}")
        fig = plots.loss_curve_figure(
            meta["losses"],
            title=f"Training loss ({meta['train_seconds'] / 60:.1f} min of training, both stages)",
            y_title="tuning loss (see the run's settings)",
        )
        st.plotly_chart(fig, key=f"loss_{path}")
        widgets.figure_downloads(fig, f"finetune_loss_{uid}")
        st.caption(
            "To see this model next to dense and untuned ATP, pick "
            f"“{tuned.tuned_label(meta)} · {path.name}” in the sidebar's model list and open the Rank "
            "explorer."
        )


@st.fragment(run_every=5.0)
def _watch_runs(known: tuple[str, ...]) -> None:
    """A run finished by another session (or the command line) is listed without a reload: the page
    reruns when the list of finished runs changes (checked every 5 s; a few small JSON files)."""
    if tuple(str(path) for path, _ in tuned.find_runs()) != known:
        st.rerun(scope="app")


_watch_runs(tuple(str(path) for path, _ in runs))

# ------------------------------------------------------------------------------------------------
st.header("Start a run")
settings = runtime.current_settings()
if settings.server_mode:
    st.info("Fine-tuning is off in server mode: it runs for minutes and writes files on the server.")
    st.stop()

job: TuneJob | None = st.session_state.get("tune_job")
busy = job is not None and job.running
with st.form("tune_form"):
    c1, c2, c3 = st.columns(3)
    model = c1.selectbox("Model", ["minilm", "smollm2", "tiny-bert", "tiny-llama"], key="tune_model")
    rank = c2.select_slider("Rank r / L", [0.125, 0.25, 0.5, 0.75], value=0.5, key="tune_rank")
    form = c3.radio("Form", forms.names(), horizontal=True, key="tune_form_choice")
    d1, d2, d3, d4 = st.columns(4)
    transfer_steps = d1.number_input(
        "Stage 1 steps (transfer)", 0, 5000, 200, key="tune_transfer_steps",
        help="Layer-wise attention transfer before end-to-end tuning; 0 skips it.",
    )  # fmt: skip
    steps = d2.number_input("Stage 2 steps (LoRA)", 0, 5000, 200, key="tune_steps")
    lr = d3.number_input("Learning rate", 1e-5, 1e-1, 1e-3, format="%.0e", key="tune_lr")
    lora_r = d4.number_input("Adapter rank (LoRA)", 1, 64, 8, key="tune_lora_r")
    e1, e2, e3 = st.columns([3, 2, 2])
    rank_mode = e1.radio(
        "Decoders: rank r / L means", list(RANK_MODES), horizontal=True, key="tune_rank_mode",
        format_func=RANK_MODE_LABELS.get,
        help="past: the rank of the compressed past (the current chunk is always attended exactly, so "
        "more than r / L of the keys are attended); effective: the share of the attended key set "
        "averaged over the scored positions, the paper's r = L/2 and L/4. Encoders ignore it.",
    )  # fmt: skip
    basis_from = e2.radio(
        "Basis from", list(BASIS_SOURCES), horizontal=True, key="tune_basis_from",
        format_func=BASIS_SOURCES.get,
        help="What U_r decomposes: the attention input X (the paper) or the keys. On MiniLM, untuned, the "
        "keys' basis keeps the exact form closer to dense (the README's table).",
    )  # fmt: skip
    centre_basis = e2.checkbox(
        "Centred basis", key="tune_centre_basis",
        help="The mean token as U_r's first column, the top r - 1 directions of the centred input after it: "
        "the same rank and cost. Not the paper's; what it changes, untuned and tuned, is measured in the "
        "README ('A centred basis').",
    )  # fmt: skip
    attention = e3.radio(
        "Train with", list(TRAIN_ATTENTION), key="tune_attention", format_func=TRAIN_ATTENTION.get,
        help="Decoders: 'dense' trains the same adapters with the same data and loss but dense attention "
        "(it has no stage 1). It is the control for an ATP run: it shows how much of a tuned run's score "
        "comes from adapting to docstrings. It is evaluated like a run (ATP at the rank above on its "
        "weights).",
    )  # fmt: skip
    layer_ranks_from = st.radio(
        "Ranks per layer", list(LAYER_RANK_CHOICES), horizontal=True, key="tune_layer_ranks",
        format_func=LAYER_RANK_CHOICES.get,
        help="One rank for every layer, or one per layer under the same budget (mean r / L), chosen on "
        "training texts when the run starts: by what each layer's rank costs the output (encoders; "
        "measured: each layer alone at 8 shares of L, about 40 s on MiniLM with 2 threads the first time "
        "for a form and basis, then kept), or by the energy each layer's spectrum keeps (any model; for a "
        "decoder each layer's share applies to the past as the rank mode above says).",
    )  # fmt: skip
    st.caption(
        "The committed runs (one torch thread while another run used the other core; the README lists them "
        "with their JSON): MiniLM 2-3 s per step (16 texts), SmolLM2 8-11 s per step with the exact form "
        "(one 512-token window in 4 chunks) and about 24 s with the second-order form. Evaluation adds "
        "0.7-1.5 min for MiniLM and 22-27 min for SmolLM2 (all 135 held-out windows)."
    )
    start = st.form_submit_button("Start fine-tuning", disabled=busy, type="primary")
if start:
    # A dense control has no stage 1: the form's default of 200 would make every control fail, so the
    # steps are dropped, and said once the run starts.
    dropped = int(transfer_steps) if attention == "dense" else 0
    transfer_steps = 0 if dropped else transfer_steps
    try:
        cfg = TuneConfig(
            model=model, rank=float(rank), form=form, steps=int(steps), lr=float(lr),
            lora_r=int(lora_r), lora_alpha=2 * int(lora_r), transfer_steps=int(transfer_steps),
            rank_mode=rank_mode, basis_from=basis_from, centre_basis=centre_basis, attention=attention,
            layer_ranks_from=layer_ranks_from,
        )  # fmt: skip
        training.check_trains(cfg)
        training.check_fits(cfg, runtime.get_model(model).info)  # before a job starts, not in it
    except (ValueError, ModelLoadError) as err:
        st.error(str(err))
    else:
        if dropped:
            st.info(
                "A dense control has no stage 1 (layer-wise transfer fits ATP to dense attention): its "
                f"{dropped} stage-1 steps are not run."
            )
        limit = settings.max_heavy_jobs
        st.session_state.tune_job = TuneJob(cfg, guard=lambda: jobs.heavy_job("fine-tuning", limit))
        job = st.session_state.tune_job


@st.fragment(run_every=1.0)
def live() -> None:
    job: TuneJob | None = st.session_state.get("tune_job")
    if job is None:
        return
    snap = job.snapshot()
    st.subheader(f"{job.cfg.model}, {job.cfg.label()}")
    if snap["running"]:  # a run refused by the heavy-job cap never started: no bar left behind
        st.progress(min(snap["fraction"], 1.0), text=f"{snap['message']} ({snap['elapsed']:.0f} s)")
        if st.button("Cancel", key="tune_cancel", disabled=snap["cancelling"]):
            job.cancel()
        if snap["cancelling"]:
            st.caption("Cancelling at the end of this step...")
    if snap["transfer_losses"]:
        st.plotly_chart(
            plots.loss_curve_figure(
                snap["transfer_losses"], title="Stage 1, layer-wise transfer (live)", y_title="layer error"
            ),
            key="tune_live_transfer_loss",
        )
    if snap["losses"]:
        st.plotly_chart(
            plots.loss_curve_figure(
                snap["losses"],
                title="Stage 2, end-to-end tuning (live)",
                y_title="loss",
            ),
            key="tune_live_loss",
        )
    if snap["error"]:
        st.warning(snap["error"])
    elif snap["result"] is not None:
        res = snap["result"]
        st.success(
            f"Done: {res.train_seconds / 60:.1f} min of training, {res.eval_seconds:.0f} s of evaluation. "
            f"Saved to {res.out_dir}; it is listed above and in the sidebar's model list."
        )
        skipped, total = res.skipped + res.transfer_skipped, job.cfg.steps + job.cfg.transfer_steps
        if skipped:
            st.warning(
                f"{skipped} of {total} steps were skipped ({res.transfer_skipped} in stage 1, {res.skipped} "
                "in stage 2): their loss or gradient was not finite (the linear form's denominator came "
                "close to zero), so they changed nothing."
            )
        st.dataframe(
            pd.DataFrame(evaluation.metrics_table({"metrics": res.metrics})),
            hide_index=True,
            key="tune_result",
        )
    if not snap["running"] and st.button("Clear", key="tune_clear"):
        del st.session_state["tune_job"]
        st.rerun()


live()
