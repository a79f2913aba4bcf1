"""Per-token views, the way BertViz's head view made attention readable: one query token's attention
over the keys as bars over the token strings (dense and ATP side by side), and what ATP's principal
keys are made of (the keys ranked by this query's weight, and each one's token loadings U_r[:, a]).

Input: a :class:`atp_viz.analysis.token_view.QueryView` and the tokens. Library code: no Streamlit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from atp_viz.analysis.token_view import QueryView
from atp_viz.figures import plots
from atp_viz.figures.maps import SMALL_MAP, axis_labels

DENSE = "#4c78a8"
ATP = "#f58518"
MAX_KEYS_RANKED = 24  # principal keys drawn in the ranking (the rest carry less weight)


def _token_axis(fig: go.Figure, labels: Sequence[str], **where) -> None:
    fig.update_xaxes(type="category", tickangle=-60, tickfont_size=10, **where)
    if len(labels) <= SMALL_MAP:
        fig.update_xaxes(tickmode="array", tickvals=list(labels), ticktext=list(labels), **where)


def _mark_query(fig: go.Figure, view: QueryView, causal: bool, **where) -> None:
    """The query's own column marked; for a decoder, the keys after it shaded (dense gives them 0)."""
    q = view.query
    fig.add_vline(x=q, line=dict(color="black", dash="dot", width=1), **where)
    n = view.dense.shape[0]
    if causal and q < n - 1:
        fig.add_vrect(x0=q + 0.5, x1=n - 0.5, fillcolor="grey", opacity=0.12, line_width=0, **where)


def query_attention_figure(
    view: QueryView, tokens: Sequence[str], *, atp_label: str, causal: bool
) -> go.Figure:
    """Where query token ``view.query`` looks: dense attention and ATP's weights on every key token, as
    bars side by side over the token strings (hover for values)."""
    labels = axis_labels(tokens)
    fig = go.Figure()
    for name, values, color in (("dense", view.dense, DENSE), (atp_label, view.atp, ATP)):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=values,
                name=name,
                marker_color=color,
                hovertemplate=f"{name}<br>key %{{x}}: %{{y:.3g}}<extra></extra>",
            )
        )
    top = np.argsort(-np.asarray(view.dense))[:3]
    notes = ["dotted line: the query itself", "dense's top keys: " + ", ".join(labels[i] for i in top)]
    if causal:
        notes.append(
            "shaded: keys after the query, which a causal model may not read (ATP's basis mixes them in)"
        )
    title = f"Query {labels[view.query]}: weight on each key token"
    fig = plots._base(fig, title + "".join(f"<br><sup>{n}</sup>" for n in notes), "key token", "weight", 380)
    fig.update_layout(barmode="group", bargap=0.15, margin_t=100, legend=dict(orientation="h", y=1.02, x=1,
                      xanchor="right", yanchor="bottom"))  # fmt: skip
    _token_axis(fig, labels)
    _mark_query(fig, view, causal)
    return fig


def principal_keys_figure(view: QueryView, tokens: Sequence[str], *, n_keys: int = 3) -> go.Figure:
    """What the query reads through ATP: top row, its weight on each principal key, ranked (the largest
    :data:`MAX_KEYS_RANKED`); below, for the ``n_keys`` heaviest keys, their loadings U_r[:, a] on the
    tokens (each oriented so that the weight is positive: a basis vector's sign is arbitrary)."""
    labels = axis_labels(tokens)
    r = view.weights.shape[0]
    n_keys = max(1, min(int(n_keys), r))
    order = view.order
    ranked = order[: min(MAX_KEYS_RANKED, r)]
    keys = order[:n_keys]
    titles = [f"weight on each principal key, largest first ({len(ranked)} of r = {r})"] + [
        f"principal key {a + 1} (weight {view.weights[a]:.3g}): loadings U_r[:, {a + 1}] on the tokens"
        for a in keys
    ]
    fig = make_subplots(rows=1 + n_keys, cols=1, subplot_titles=titles, vertical_spacing=0.25 / (1 + n_keys))
    fig.add_trace(
        go.Bar(
            x=[f"key {a + 1}" for a in ranked],
            y=view.weights[ranked],
            marker_color=ATP,
            name="weight",
            hovertemplate="%{x}: weight %{y:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.update_xaxes(type="category", row=1, col=1)
    for i, a in enumerate(keys, start=2):
        u = view.loadings[:, a]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=u,
                marker_color=np.where(u >= 0, "#54a24b", "#b279a2").tolist(),
                name=f"key {a + 1}",
                hovertemplate=f"key {a + 1}<br>%{{x}}: loading %{{y:.3f}}<extra></extra>",
            ),
            row=i,
            col=1,
        )
        _token_axis(fig, labels, row=i, col=1)
        if i > 2:  # one token axis for all loadings, labelled once (at the bottom)
            fig.update_xaxes(matches="x2", row=i, col=1)
        if i < 1 + n_keys:
            fig.update_xaxes(showticklabels=False, row=i, col=1)
        fig.add_vline(x=view.query, line=dict(color="black", dash="dot", width=1), row=i, col=1)
    note = (
        "key a = the a-th principal direction of X (singular-value order); green loadings push a token's "
        "key and value into what the query reads, purple ones pull them out"
    )
    fig = plots._base(
        fig,
        f"What query {labels[view.query]} reads through ATP's principal keys<br><sup>{note}</sup>",
        "",
        "",
        height=260 + 190 * n_keys,
    )
    fig.update_layout(showlegend=False, margin_t=110)
    fig.update_annotations(font_size=12)
    return fig
