"""The tour's step "why 1 + s breaks and how positivity fixes it": the per-query normalisers of the
current text under the paper's linear form and the positive second-order form, and the two kernels
next to exp(s) over the range of scores this head really produces."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from atp_viz.figures.tour.data import POSITIVITY_FORMS, TourData, _t
from atp_viz.figures.tour.layout import TITLE_AT_TOP, refusal_figure, titled, top_margin

COLOURS = {"linear": "#e45756", "taylor2": "#4c78a8", "exp": "#9d9d9d"}
LABELS = {"linear": "1 + s (paper's linear form)", "taylor2": "1 + x + x²/2 (second order, x = s)"}


def _scores(data: TourData) -> np.ndarray:
    """This head's scores c q_i . k_r,j over the keys each query may read (flattened)."""
    q, k, u = _t(data.q).double(), _t(data.k).double(), _t(data.basis).double()
    s = (q @ (u @ (u.mT @ k)).mT) * data.head_dim**-0.5
    if data.causal:
        s = s[torch.ones_like(s, dtype=torch.bool).tril()]
    return s.flatten().numpy()


def positivity_figure(data: TourData) -> go.Figure:
    """Left: each query's normaliser over its n_i keys, divided by n_i (the mean unnormalised weight);
    the linear form's crosses zero, where its output divides by ~0 and flips sign. Right: 1 + s and
    1 + s + s^2/2 against exp(s) over this head's score range."""
    refusal = data.map_refusal
    if refusal:
        return refusal_figure(
            f"Layer {data.layer}, query head {data.head}: {data.n_tokens:,} tokens", refusal
        )
    dens = data.denominators
    L = data.n_tokens
    n = np.arange(1, L + 1, dtype=np.float64) if data.causal else np.full(L, float(L))
    scores = _scores(data)
    bad = int((dens["linear"] <= 0).sum())
    negative = float((scores < -1).mean())
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
        subplot_titles=[
            "normaliser / keys read, per query token",
            f"the kernels on this head's scores ({scores.min():.1f} to {scores.max():.1f})",
        ],
    )  # fmt: skip
    for name in POSITIVITY_FORMS:
        y = dens[name] / n
        fig.add_trace(
            go.Scatter(
                x=np.arange(L), y=y, mode="lines+markers", name=LABELS[name],
                line=dict(color=COLOURS[name], width=1.5), marker=dict(size=4),
                hovertemplate="query token %{x}: %{y:.3g}<extra>" + name + "</extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dash"), row=1, col=1)
    fig.add_hrect(y0=-1e9, y1=0, fillcolor="#e45756", opacity=0.07, line_width=0, row=1, col=1)
    lo, hi = float(np.percentile(dens["linear"] / n, 1)), float(np.percentile(dens["linear"] / n, 99))
    top = max(hi, float((dens["taylor2"] / n).max()), 1.0)
    fig.update_yaxes(range=[min(lo, -0.5) * 1.1, top * 1.1], title_text="normaliser / n_i", row=1, col=1)
    fig.update_xaxes(title_text="query token", row=1, col=1)
    s = np.linspace(float(scores.min()), float(scores.max()), 200)
    curves = {"exp": np.exp(np.minimum(s, 50.0)), "linear": 1 + s, "taylor2": 1 + s + s * s / 2}
    for name, y in curves.items():
        fig.add_trace(
            go.Scatter(
                x=s, y=y, mode="lines", name="exp(s) (softmax)" if name == "exp" else LABELS[name],
                line=dict(color=COLOURS[name], dash="dot" if name == "exp" else "solid"),
                showlegend=name == "exp",
            ),
            row=1, col=2,
        )  # fmt: skip
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dash"), row=1, col=2)
    y_top = max(6.0, float(curves["taylor2"].max()))
    fig.update_yaxes(range=[-max(3.0, -float(s.min())), y_top], row=1, col=2)
    fig.update_xaxes(title_text="score s = c q · k_r", row=1, col=2)
    title = titled(
        f"Layer {data.layer}, query head {data.head}, r = {data.rank}: {bad} of {L} normalisers of 1 + s are "
        "<= 0; the second-order form's are all >= 1/2",
        [
            f"{negative:.0%} of this head's token weights 1 + s are negative (scores below -1)",
            "untrained forms (expansion point m = 0); a normaliser near 0 divides the output by ~0",
        ],
    )
    fig.update_layout(
        title=title, height=470, margin=dict(t=top_margin(title, subplot_titles=True), b=50),
        legend=dict(orientation="h", y=-0.18), **TITLE_AT_TOP,
    )  # fmt: skip
    return fig
