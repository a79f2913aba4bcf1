"""Cost: what ATP saves per attention layer, counted (multiply-adds, memory) and measured."""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from atp_app import navigation, runtime, widgets
from atp_app.sidebar import page_inputs
from atp_viz import forms
from atp_viz.analysis.bench.report import measured_series
from atp_viz.core import costs
from atp_viz.core.basis import METHOD_LABELS, METHODS, basis_path
from atp_viz.deploy.jobs import BusyError
from atp_viz.figures import plots

ROOT = Path(__file__).resolve().parent.parent
BENCH_JSON = ROOT / "bench-results" / "bench.json"  # written by `make bench` (not in git)
REFERENCE_JSON = ROOT / "docs" / "bench-reference.json"  # the run quoted in the README

navigation.use_this_navigation()
st.title("Cost: dense vs ATP attention")
st.markdown(
    "Counted per attention layer, Q/K/V/O projections left out (every path needs them), the basis "
    "included, for every attention form. A form of order L^2 (the exact form) costs at least as much as "
    "dense; the savings come from forms whose attention grows like L r."
)

_, loaded, cap = page_inputs()
info = loaded.info
geom = info.geometry


def _follow(key: str, default: int, top: int) -> None:
    """A number box that follows its default (the text's length, and r from it) until the user sets it
    (another text or model moves it then), and stays within ``top``."""
    defaults = st.session_state.setdefault("_cost_defaults", {})
    if key not in st.session_state or st.session_state[key] == defaults.get(key):
        st.session_state[key] = default
    st.session_state[key] = min(st.session_state[key], top)
    defaults[key] = default


c1, c2, c3 = st.columns(3)
_follow("cost_L", max(cap.n_tokens, 2), 1 << 17)
L = int(
    c1.number_input(
        "Sequence length L", 2, 1 << 17, key="cost_L", help="the text's length until you set another"
    )
)
_follow("cost_r", min(128, L), L)
r = int(c2.number_input("Rank r", 1, L, key="cost_r", help="128, or L if shorter, until you set another"))
method = c3.selectbox(
    "Basis", METHODS, index=METHODS.index("randomized"), key="cost_basis", format_func=METHOD_LABELS.get
)
dense = costs.dense_cost(L, geom)
per_form = {name: forms.get(name).cost(L, r, geom, method) for name in forms.names()}

st.latex(r"\text{dense: } " + dense.formula + r"\quad\text{multiply-adds},\qquad H L^2 \text{ scores held}")
for name, c in per_form.items():
    st.latex(rf"\text{{{name} (order {forms.get(name).cost_order}): }} " + c.formula)
path = basis_path(L, info.d_model, r, method)
st.latex(r"\text{basis (" + METHOD_LABELS[path] + r"): } " + costs.basis_formula(L, info.d_model, r, method))
if path != method:
    st.caption(
        f"At L = {L}, r = {r} the {METHOD_LABELS[method]} would not save anything, so the exact SVD runs "
        "and is counted instead."
    )
rows = [
    {"path": "dense", "multiply-adds (G)": dense.macs / 1e9, "scores held (M floats)": dense.scores / 1e6}
]
for name, c in per_form.items():
    rows.append(
        {
            "path": f"ATP {name}, r = {r}",
            "multiply-adds (G)": c.macs / 1e9,
            "scores held (M floats)": c.scores / 1e6,
        }
    )
    rows.append(
        {"path": "  of which basis", "multiply-adds (G)": c.basis_macs / 1e9, "scores held (M floats)": None}
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, key="cost_table")
widgets.table_downloads(rows, "cost_per_layer")
cols = st.columns(len(per_form))
for col, (name, c) in zip(cols, per_form.items(), strict=True):
    col.metric(
        f"Counted speed-up ceiling, {name} (dense / ATP)",
        f"{dense.macs / c.macs:.2f}x",
        f"score memory / {dense.scores / c.scores:.0f}",
        delta_color="off",
        help="what a perfect implementation could show; measured speed-ups are below it",
    )
st.caption(
    "The linear form is counted as it is evaluated: (q K'^T) [V' | U_r^T 1], or q (K'^T [V' | U_r^T 1]) "
    "when r > (d_h + 1) / 2 (then L d_h (d_h + 1) per query head, cheaper than ATP_NOTES' 2 L r d_h)."
)
dense_ll, low_ll = costs.linear_layer_macs(L, r, info.d_model, info.d_model)
st.caption(
    f"Low-rank inputs for a d x d linear layer (claim 3): L d^2 = {dense_ll / 1e9:.2f} G vs "
    f"r d^2 + L r d = {low_ll / 1e9:.2f} G multiply-adds."
)

lengths = [2**k for k in range(7, 15)]
series = {"dense": [costs.dense_cost(n, geom).macs for n in lengths]}
for name in forms.names():
    series[f"{name}, r = {r}"] = [forms.get(name).cost(n, r, geom, method).macs for n in lengths]
    series[f"{name}, r = L/8"] = [forms.get(name).cost(n, max(1, n // 8), geom, method).macs for n in lengths]
fig = plots.cost_scaling_figure(
    lengths, series, title=f"Counted multiply-adds per layer ({info.label})", y_title="multiply-adds"
)
widgets.chart(fig, key="cost_counted")
widgets.figure_downloads(fig, "cost_counted_macs")

st.subheader("Measured")
st.markdown(
    "Times of one attention layer with SmolLM2's geometry on random inputs, from `python -m atp_viz bench` "
    "(`make bench` writes `bench-results/bench.json`), or from a quick run here. On log-log axes quadratic "
    "cost shows as slope 2 and linear cost as slope 1."
)


@st.cache_resource(show_spinner=False, max_entries=2)
def _quick_bench(lengths: tuple[int, ...]) -> dict:
    from atp_viz.analysis.bench import layer, timing

    # A heavy job: besides taking the CPU from other sessions, concurrent work would distort the timings.
    with runtime.heavy_job("quick benchmark"), widgets.progress("Benchmarking...") as bar:
        data = layer.run_layer_bench(
            lengths, "64,128,L/8", repeats=3, warmup=1, measure_memory=False, progress=bar
        )
    return {"layer": data, "machine": timing.machine_info()}


def _stored_results() -> tuple[dict | None, str | None]:
    for path, what in (
        (BENCH_JSON, "your last `make bench`"),
        (REFERENCE_JSON, "the reference run in the README"),
    ):
        if path.exists():
            try:
                return json.loads(path.read_text()), f"{path.relative_to(ROOT)} ({what})"
            except (OSError, ValueError) as err:
                st.warning(f"Could not read {path}: {err}")
    return None, None


data, origin = None, None
if st.button("Run a quick benchmark here (L = 256 ... 2048, about a minute)", key="cost_bench"):
    try:
        data, origin = _quick_bench((256, 512, 1024, 2048)), "a quick run in this session"
    except BusyError as err:
        st.warning(str(err) + " Showing the stored results meanwhile.")
if data is None:
    data, origin = _stored_results()
if data is None:
    st.info("No benchmark results yet: run `make bench`, or the quick run above.")
else:
    try:
        lengths_m, measured = measured_series(data)
    except (KeyError, TypeError) as err:
        st.warning(f"The benchmark file does not have the expected layout ({err}); run `make bench` again.")
    else:
        ms = {k: [None if v is None else v * 1e3 for v in vs] for k, vs in measured.items()}
        fig = plots.cost_scaling_figure(lengths_m, ms, title="Measured time per layer (median)", y_title="ms")
        widgets.chart(fig, key="cost_measured")
        widgets.figure_downloads(fig, "cost_measured_time")
        machine = data.get("machine", {})
        where = ", ".join(
            f"{k} {machine.get(k, '?')}" for k in ("cpu_model", "torch_threads", "torch_version", "device")
        )
        st.caption(f"Source: {origin}. Machine: {where}. ATP times include the basis.")
