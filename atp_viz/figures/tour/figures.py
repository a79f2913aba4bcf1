"""The tour's step figures: each takes a :class:`~.data.TourData` and returns a Plotly figure."""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from atp_viz import forms
from atp_viz.core import costs
from atp_viz.core.basis import basis_path
from atp_viz.figures import plots
from atp_viz.figures.tour.data import MAX_FEATURES, TourData, _t, pool
from atp_viz.figures.tour.layout import (
    DROPPED,
    ENERGY,
    KEPT,
    TITLE_AT_TOP,
    Panel,
    fmt,
    panels_figure,
    refusal_figure,
    titled,
    top_margin,
)
from atp_viz.text.inputs import readable_tokens

TOKEN_TEXT_LIMIT = 400  # the token grid writes each token in its cell up to this L; hover beyond


def tokens_figure(data: TourData) -> go.Figure:
    """(1) The tokens as a grid in reading order, coloured by the norm of each token's row of X."""
    L = data.n_tokens
    ncols = 16 if L <= 256 else math.ceil(math.sqrt(2 * L))
    nrows = math.ceil(L / ncols)
    norms = np.full(nrows * ncols, np.nan)
    norms[:L] = np.linalg.norm(np.asarray(data.x, dtype=np.float64), axis=1)
    words = [html.escape(t) for t in readable_tokens(data.tokens)] + [""] * (nrows * ncols - L)
    idx = np.arange(nrows * ncols).reshape(nrows, ncols)
    show_text = L <= TOKEN_TEXT_LIMIT
    fig = go.Figure(
        go.Heatmap(
            z=norms.reshape(nrows, ncols),
            text=np.array(words, dtype=object).reshape(nrows, ncols),
            customdata=idx,
            texttemplate="%{text}" if show_text else None,
            textfont=dict(size=11),
            colorscale="Blues",
            colorbar=dict(title="|x_i|", thickness=10),
            hovertemplate="token %{customdata}: %{text}<br>|x_i| = %{z:.3g}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    note = "" if show_text else f"{L:,} tokens: too many to label, hover a cell to read its token"
    fig = plots._base(
        fig,
        titled(
            f"The {L:,} tokens, in reading order (colour: length of each token's vector at layer "
            f"{data.layer})",
            [note],
        ),
        "",
        "",
        height=min(900, max(260, 30 * nrows + 140)),
    )
    fig.update_layout(margin_t=top_margin(fig.layout.title.text), **TITLE_AT_TOP)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False)
    return fig


def x_figure(data: TourData) -> go.Figure:
    """(2) X as a heatmap, L x d, block-averaged for long inputs (the title says so)."""
    p = pool(data.x, data.max_side, MAX_FEATURES)
    panel = Panel(p, "", "feature", "token", colorbar_title="value")
    return panels_figure(
        [panel],
        f"X at layer {data.layer}: {data.n_tokens:,} tokens x {data.d} features",
        [p.note("tokens", "features")],
        height=520,
    )


def spectrum_figure(data: TourData) -> go.Figure:
    """(3) Singular values (kept ones coloured) and the cumulative energy, with r marked."""
    sv = data.spectrum.singular_values
    cum = data.spectrum.cumulative_energy
    m = sv.size
    idx = np.arange(1, m + 1)
    r_mark = min(data.rank, m)
    kept = idx <= r_mark
    floor = sv[0] * 1e-7 if sv[0] > 0 else 1e-12  # log axis: numerically zero values drawn at a floor
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for mask, name, color in ((kept, f"kept (i <= r = {data.rank})", KEPT), (~kept, "dropped", DROPPED)):
        if mask.any():
            fig.add_trace(
                go.Bar(
                    x=idx[mask],
                    y=np.maximum(sv[mask], floor),
                    name=name,
                    marker_color=color,
                    hovertemplate="σ_%{x} = %{y:.3g}<extra></extra>",
                ),
                secondary_y=False,
            )
    fig.add_trace(
        go.Scatter(
            x=idx,
            y=cum,
            name="cumulative energy E(k)",
            mode="lines",
            line=dict(color=ENERGY, width=2),
            hovertemplate="E(%{x}) = %{y:.1%}<extra></extra>",
        ),
        secondary_y=True,
    )
    fig.add_trace(
        go.Scatter(
            x=[r_mark],
            y=[data.energy_at_rank],
            name=f"chosen r = {data.rank}: E = {data.energy_at_rank:.1%}",
            mode="markers+text",
            marker=dict(size=13, color=ENERGY, line=dict(color="black", width=1)),
            text=[f"E(r) = {data.energy_at_rank:.1%}"],
            textposition="bottom right" if r_mark < 0.8 * m else "bottom left",
        ),
        secondary_y=True,
    )
    fig.add_vline(x=r_mark + 0.5, line=dict(color="black", dash="dash", width=1))
    notes = []
    if data.rank > m:
        notes.append(
            f"r = {data.rank} exceeds min(L, d) = {m}: all of X is kept; the extra basis vectors carry "
            "no energy"
        )
    fig = plots._base(
        fig,
        titled(
            f"Spectrum of X, layer {data.layer}: the top r = {data.rank} of {m} components keep "
            f"{data.energy_at_rank:.1%} of the energy",
            notes,
        ),
        "component i",
        "",
        height=460,
    )
    fig.update_layout(
        barmode="overlay",
        bargap=0.05,
        legend=dict(orientation="h", y=-0.2),
        margin_t=top_margin(fig.layout.title.text),
        margin_b=100,
        **TITLE_AT_TOP,
    )
    fig.update_yaxes(title_text="singular value σᵢ (log scale)", type="log", secondary_y=False)
    fig.update_yaxes(title_text="cumulative energy E(k)", range=[0, 1.02], tickformat=".0%", secondary_y=True)
    return plots.fit_log_axes(fig)


def principal_tokens_figure(data: TourData) -> go.Figure:
    """(4) X' = U_r^T X (r x d) and the weights U_r (L x r) that mix real tokens into principal ones."""
    xp = pool(data.x_principal, data.max_side, MAX_FEATURES)
    side = data.max_side
    up = pool(data.basis, side, side, how="rms" if max(data.basis.shape) > side else "mean")
    u_title = "U_r: weight of each token (rows) in each principal token (columns)"
    if up.aggregated:
        u_title = "U_r: |weight| of each token block in each principal token"
    panels = [
        Panel(
            xp, f"X' = U_r^T X ({data.rank} x {data.d})", "feature", "principal token", coloraxis="coloraxis"
        ),
        Panel(up, u_title, "principal token", "token", coloraxis="coloraxis2", diverging=not up.aggregated),
    ]
    notes = [
        n
        for n in (
            xp.note("principal tokens", "features") and "X': " + xp.note("principal tokens", "features"),
            up.note("tokens", "principal tokens") and "U_r: " + up.note("tokens", "principal tokens"),
        )
        if n
    ]
    if data.rank > data.n_components:
        notes.append(f"rows of X' past min(L, d) = {data.n_components} are zero")
    return panels_figure(
        panels,
        f"{data.rank} principal tokens stand in for {data.n_tokens:,} tokens (layer {data.layer})",
        notes,
        widths=[0.55, 0.45],
        height=520,
    )


def principal_kv_figure(data: TourData) -> go.Figure:
    """(5) K (L x dh), principal keys K' = U_r^T K and values V' = U_r^T V (r x dh), one kv head."""
    side = data.max_side
    signed = "rms" if max(data.rank, data.head_dim) > side else "mean"  # pooled signed values: RMS
    kp = pool(data.k, side, side)
    kpp = pool(data.k_principal, side, side, how=signed)
    vpp = pool(data.v_principal, side, side, how=signed)
    kept = float(torch.linalg.norm(_t(data.k_principal)) ** 2 / torch.linalg.norm(_t(data.k)) ** 2)
    rope = " (after rotary embedding)" if data.info.has_rope else ""
    panels = [
        Panel(kp, f"keys K{rope}: {data.n_tokens:,} x {data.head_dim}", "key feature", "token"),
        Panel(
            kpp,
            f"principal keys K': {data.rank} x {data.head_dim}",
            "key feature",
            "principal key",
            coloraxis="coloraxis2",
            diverging=not kpp.aggregated,
        ),
        Panel(
            vpp,
            f"principal values V': {data.rank} x {data.head_dim}",
            "value feature",
            "principal value",
            coloraxis="coloraxis3",
            diverging=not vpp.aggregated,
        ),
    ]
    groups = data.info.gqa_groups
    first = data.kv_head * groups
    shared = f", shared by query heads {first}-{first + groups - 1}" if groups > 1 else ""
    notes = [
        kp.note("tokens", "features") and "K: " + kp.note("tokens", "features"),
        kpp.note("principal keys", "features") and "K', V': " + kpp.note("principal keys", "features"),
        f"K' keeps {kept:.1%} of the keys' energy",
    ]
    return panels_figure(
        panels,
        f"Key/value head {data.kv_head} of layer {data.layer}{shared}",
        notes,
        widths=[0.36, 0.32, 0.32],
        height=520,
    )


def attention_figure(data: TourData) -> go.Figure:
    """(7) The dense L x L map next to every registered form's map of the same head: L x L over the
    reconstructed tokens (quadratic forms) or L x r over the principal keys (linear-cost forms).

    Above ``data.max_map_tokens`` nothing is computed: the figure holds the reason instead."""
    refusal = data.map_refusal
    if refusal:
        return refusal_figure(
            f"Layer {data.layer}, query head {data.head}: {data.n_tokens:,} tokens", refusal
        )
    mp = data.maps
    panels = [
        Panel(
            mp.dense,
            f"dense: softmax over L = {data.n_tokens:,} keys",
            "key token",
            "query token",
            diverging=False,
            colorbar_title="weight",
        )
    ]
    for i, (name, fm) in enumerate(mp.forms.items()):
        over = "L x r map" if fm.kind == "principal" else "rank-r keys"
        negative = bool(np.nanmin(fm.pooled.values) < 0)
        panels.append(
            Panel(
                fm.pooled,
                f"{name}: {over} (error {fm.error:.3f})",
                "principal key" if fm.kind == "principal" else "key token",
                "query token",
                diverging=negative,
                coloraxis="coloraxis" if (fm.kind == "tokens" and not negative) else f"coloraxis{i + 2}",
                colorbar_title="A'" if fm.kind == "principal" else "",
            )
        )
    first = mp.dense.note("tokens", "tokens")
    notes = [first and "L x L maps: " + first, "error = |out - out_dense| / |out_dense| for this head"]
    notes += [
        f"{name} L x r map: " + fm.pooled.note("tokens", "principal keys")
        for name, fm in mp.forms.items()
        if fm.kind == "principal" and fm.pooled.aggregated
    ]
    if data.causal:
        notes.append("causal mask applied, yet every rebuilt key K_r mixes in later tokens through U_r")
    return panels_figure(
        panels,
        f"Layer {data.layer}, query head {data.head}: attention over {data.n_tokens:,} tokens vs "
        f"{data.rank} principal keys",
        notes,
        height=500,
    )


def _cost_bars(fig: go.Figure, data: TourData, costs_now: dict[str, costs.LayerCost]) -> None:
    """Panels 1 and 2: multiply-adds (attention and basis stacked) and score memory at this L and r."""
    names = list(costs_now)
    attention = [c.attention_macs for c in costs_now.values()]
    basis = [c.basis_macs for c in costs_now.values()]
    scores = [c.scores * costs.BYTES_PER_FLOAT for c in costs_now.values()]
    for col, ys, name, color, labels, legend in (
        (1, attention, "attention", KEPT, [fmt(a) for a in attention], True),
        (1, basis, "basis", ENERGY, [fmt(b) if b else "" for b in basis], True),
        (2, scores, "score memory", "#54a24b", [fmt(x, "B") for x in scores], False),
    ):
        bar = go.Bar(x=names, y=ys, name=name, marker_color=color, text=labels, showlegend=legend)
        fig.add_trace(bar, row=1, col=col)


def _cost_curves(fig: go.Figure, data: TourData) -> None:
    """Panel 3: multiply-adds vs L: dense, each form at this r, and the paper's form at r = (r/L) L."""
    geom, r, L = data.info.geometry, data.rank, data.n_tokens
    lengths = np.unique(np.geomspace(max(16, r), max(8192, 4 * L), 24).astype(int))
    frac = r / L
    series = {"dense": [costs.dense_cost(n, geom).macs for n in lengths]}
    for name in forms.names():
        series[f"{name}, r fixed at {r}"] = [forms.get(name).cost(n, r, geom).macs for n in lengths]
    paper = next(n for n in forms.names() if forms.get(n).paper)
    series[f"{paper}, r = {frac:.2g} L"] = [
        forms.get(paper).cost(n, max(1, round(frac * n)), geom).macs for n in lengths
    ]
    for i, (name, ys) in enumerate(series.items()):
        dash = ("solid", "dash", "dot", "dashdot", "longdash")[i % 5]
        fig.add_trace(
            go.Scatter(x=lengths, y=ys, name=name, mode="lines", line=dict(dash=dash)), row=1, col=3
        )
    dense_now = costs.dense_cost(L, geom).macs
    fig.add_trace(
        go.Scatter(x=[L], y=[dense_now], mode="markers", name=f"this text (L = {L:,})",
                   marker=dict(size=10, color="black")),
        row=1, col=3,
    )  # fmt: skip
    fig.update_xaxes(type="log", title_text="sequence length L", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)


def cost_figure(data: TourData) -> go.Figure:
    """(8) Multiply-adds and score memory per layer at this L and r, for dense and every registered form,
    counted by the project's cost model (basis by the randomised finder, or the exact SVD where it
    really runs instead), and how the counts scale with L."""
    i, L, r = data.info, data.n_tokens, data.rank
    geom = i.geometry
    costs_now = {"dense": costs.dense_cost(L, geom)}
    costs_now.update({name: forms.get(name).cost(L, r, geom, "randomized") for name in forms.names()})
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("multiply-adds, this layer", "attention scores held (float32)", "multiply-adds vs L"),
        horizontal_spacing=0.1,
    )
    _cost_bars(fig, data, costs_now)
    _cost_curves(fig, data)
    fig.update_yaxes(title_text="multiply-adds", row=1, col=1)
    fig.update_yaxes(title_text="bytes", row=1, col=2)
    dense = costs_now["dense"]
    verdicts = [
        f"{name}: {dense.macs / c.macs:.1f}x fewer"
        if c.macs < dense.macs
        else f"{name}: {c.macs / dense.macs:.1f}x more"
        for name, c in costs_now.items()
        if name != "dense"
    ]
    path = basis_path(L, i.d_model, r, "randomized")
    text = titled(
        f"L = {L:,}, r = {r}: multiply-adds vs dense, " + "; ".join(verdicts),
        [
            f"one layer: {i.n_heads} query heads, {i.n_kv_heads} key/value heads, d_h = {i.head_dim}",
            "counted, not timed; Q/K/V/O projections left out (both need them)",
            "basis by the randomised range finder (2 power iterations)"
            if path == "randomized"
            else f"basis by an exact SVD: r = {r} is too close to min(L, d) = {min(L, i.d_model)} "
            "to save anything",
        ],
    )
    fig.update_layout(
        template=plots.TEMPLATE,
        barmode="stack",
        height=480,
        margin=dict(l=60, r=20, t=top_margin(text, True), b=50),
        title=text,
        **TITLE_AT_TOP,
    )
    return plots.fit_log_axes(fig)
