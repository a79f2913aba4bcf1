"""Cost: what ATP saves per attention layer, counted (multiply-adds, memory) and measured."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from atp_viz import costs, plots
from atp_viz.jobs import BusyError
from ui import figure_downloads, heavy_job, page_inputs, table_downloads

ROOT = Path(__file__).resolve().parent.parent
BENCH_JSON = ROOT / "bench-results" / "bench.json"  # written by `make bench` (not in git)
REFERENCE_JSON = ROOT / "docs" / "bench-reference.json"  # the run quoted in the README

st.title("Cost: dense vs ATP attention")
st.markdown(
    "Counted per attention layer, Q/K/V/O projections left out (both paths need them). The ATP count is "
    "the paper's linear form with the basis included; the exact form is a quadratic reference and costs "
    "at least as much as dense."
)

_, loaded, cap = page_inputs()
info = loaded.info

c1, c2, c3 = st.columns(3)
L = c1.number_input(
    "Sequence length L",
    2,
    1 << 17,
    max(cap.n_tokens, 2),
    key="cost_L",
    help="defaults to the current text's length",
)
r = c2.number_input("Rank r", 1, int(L), min(128, int(L)), key="cost_r")
method = c3.radio(
    "Basis",
    ["randomized", "exact"],
    horizontal=True,
    key="cost_basis",
    help="randomised range finder with 2 power iterations, or a full SVD",
)
H, Hkv, dh, d = info.n_heads, info.n_kv_heads, info.head_dim, info.d_model
dense = costs.dense_cost(int(L), H, dh)
atp = costs.atp_cost(int(L), int(r), H, Hkv, dh, d, method=method)
basis = costs.basis_macs(int(L), d, int(r), method)

st.latex(r"\text{dense: } " + dense.formula + r"\quad\text{multiply-adds},\qquad H L^2 \text{ scores held}")
st.latex(r"\text{ATP: } " + atp.formula + r",\qquad H L r \text{ scores held}")
st.latex(
    r"\text{basis: exact SVD } L\,d\,\min(L,d)\quad\text{or randomised } (2q+2)\,L\,d\,(r+p),\ q=2,\ p="
    + str(costs.OVERSAMPLE)
)
rows = [
    {"path": "dense", "multiply-adds (G)": dense.macs / 1e9, "scores held (M floats)": dense.scores / 1e6},
    {
        "path": f"ATP linear, r = {r}",
        "multiply-adds (G)": atp.macs / 1e9,
        "scores held (M floats)": atp.scores / 1e6,
    },
    {"path": "  of which basis", "multiply-adds (G)": basis / 1e9, "scores held (M floats)": np.nan},
]
st.dataframe(pd.DataFrame(rows), hide_index=True, key="cost_table")
table_downloads(rows, "cost_per_layer")
m1, m2 = st.columns(2)
m1.metric(
    "Counted speed-up ceiling (dense / ATP)",
    f"{dense.macs / atp.macs:.1f}x",
    help="what a perfect implementation could show; measured speed-ups are below it",
)
m2.metric("Attention-score memory ratio", f"{dense.scores / atp.scores:.0f}x")
st.caption(
    "Counted in the paper's order, 2 L r d_h per query head. The implementation evaluates the same sums as "
    "q (K'^T [V' | U_r^T 1]) whenever r > (d_h + 1) / 2, which costs L d_h (d_h + 1) per query head instead: "
    "cheaper than counted here for large r."
)
dense_ll, low_ll = costs.linear_layer_macs(int(L), int(r), d, d)
st.caption(
    f"Low-rank inputs for a d x d linear layer (claim 3): L d^2 = {dense_ll / 1e9:.2f} G vs "
    f"r d^2 + L r d = {low_ll / 1e9:.2f} G multiply-adds."
)

lengths = [2**k for k in range(7, 15)]
series = {
    "dense": [costs.dense_cost(n, H, dh).macs for n in lengths],
    f"ATP r = {r}": [costs.atp_cost(n, int(r), H, Hkv, dh, d, method=method).macs for n in lengths],
    "ATP r = L/8": [costs.atp_cost(n, max(1, n // 8), H, Hkv, dh, d, method=method).macs for n in lengths],
}
fig = plots.cost_scaling_figure(
    lengths, series, title=f"Counted multiply-adds per layer ({info.label})", y_title="multiply-adds"
)
st.plotly_chart(fig, key="cost_counted")
figure_downloads(fig, "cost_counted_macs")

st.subheader("Measured")
st.markdown(
    "Times of one attention layer with SmolLM2's geometry on random inputs, from `python -m atp_viz bench` "
    "(`make bench` writes `bench-results/bench.json`), or from a quick run here. On log-log axes quadratic "
    "cost shows as slope 2 and linear cost as slope 1."
)


@st.cache_resource(show_spinner=False, max_entries=2)
def _quick_bench(lengths: tuple[int, ...]) -> dict:
    from atp_viz import bench

    # A heavy job: besides taking the CPU from other sessions, concurrent work would distort the timings.
    with heavy_job("quick benchmark"):
        bar = st.progress(0.0, text="Benchmarking...")
        try:
            layer = bench.run_layer_bench(
                lengths,
                "64,128,L/8",
                repeats=3,
                warmup=1,
                measure_memory=False,
                progress=lambda f, msg: bar.progress(min(f, 1.0), text=msg),
            )
        finally:
            bar.empty()
    return {"layer": layer, "machine": bench.machine_info()}


data, origin = None, None
if st.button("Run a quick benchmark here (L = 256 ... 2048, about a minute)", key="cost_bench"):
    try:
        data, origin = _quick_bench((256, 512, 1024, 2048)), "a quick run in this session"
    except BusyError as err:
        st.warning(str(err) + " Showing the stored results meanwhile.")
if data is None:
    for path, what in (
        (BENCH_JSON, "your last `make bench`"),
        (REFERENCE_JSON, "the reference run in the README"),
    ):
        if path.exists():
            try:
                data, origin = json.loads(path.read_text()), f"{path.relative_to(ROOT)} ({what})"
                break
            except (OSError, ValueError) as err:
                st.warning(f"Could not read {path}: {err}")
if data is None:
    st.info("No benchmark results yet: run `make bench`, or the quick run above.")
else:
    try:
        lengths_m, measured = costs.measured_series(data)
    except (KeyError, TypeError) as err:
        st.warning(f"The benchmark file does not have the expected layout ({err}); run `make bench` again.")
    else:
        ms = {k: [None if v is None else v * 1e3 for v in vs] for k, vs in measured.items()}
        fig = plots.cost_scaling_figure(lengths_m, ms, title="Measured time per layer (median)", y_title="ms")
        st.plotly_chart(fig, key="cost_measured")
        figure_downloads(fig, "cost_measured_time")
        machine = data.get("machine", {})
        where = ", ".join(
            f"{k} {machine.get(k, '?')}" for k in ("cpu_model", "torch_threads", "torch_version", "device")
        )
        st.caption(f"Source: {origin}. Machine: {where}. ATP times include the basis.")
