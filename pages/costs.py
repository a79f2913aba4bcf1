"""Cost: what ATP saves per attention layer, counted (multiply-adds, memory) and measured."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from atp_viz import costs, plots
from ui import load_or_explain, sidebar

BENCH_JSON = Path(__file__).resolve().parent.parent / "bench-results" / "bench.json"

st.title("Cost: dense vs ATP attention")
st.markdown(
    "Counted per attention layer, Q/K/V/O projections left out (both paths need them). The ATP count is "
    "the paper's linear form with the basis included; the exact form is a quadratic reference and costs "
    "at least as much as dense."
)

sel = sidebar()
if sel is None:
    st.stop()
result = load_or_explain(sel)
if result is None:
    st.stop()
loaded, cap = result
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
m1, m2 = st.columns(2)
m1.metric(
    "Counted speed-up ceiling (dense / ATP)",
    f"{dense.macs / atp.macs:.1f}x",
    help="what a perfect implementation could show; measured speed-ups are below it",
)
m2.metric("Attention-score memory ratio", f"{dense.scores / atp.scores:.0f}x")
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
st.plotly_chart(
    plots.cost_scaling_figure(
        lengths, series, title=f"Counted multiply-adds per layer ({info.label})", y_title="multiply-adds"
    ),
    key="cost_counted",
)

st.subheader("Measured")
if BENCH_JSON.exists():
    try:
        bench = json.loads(BENCH_JSON.read_text())
        st.caption(f"From {BENCH_JSON.relative_to(BENCH_JSON.parent.parent)} (run `make bench` to refresh).")
        st.json(bench.get("machine", {}), expanded=False)
    except (OSError, ValueError) as err:
        st.warning(f"Could not read {BENCH_JSON}: {err}")
else:
    st.info("No benchmark results yet: run `make bench` (it writes bench-results/bench.json).")
