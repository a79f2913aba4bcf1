"""The tour's 2-D toy: a handful of tokens with two features, their principal directions as arrows,
the rank-1 projection, and why the sign of a basis vector does not matter to the linear form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from atp_viz import forms
from atp_viz.core.basis import principal_basis
from atp_viz.figures import plots
from atp_viz.figures.tour.layout import ENERGY, KEPT, TITLE_AT_TOP, titled, top_margin


@dataclass(frozen=True, eq=False)
class Toy:
    """A handful of tokens with d = 2 features, their principal directions and ATP at rank 1.

    ``directions`` ``[2, 2]``: rows v_1, v_2, the right singular vectors of X (directions in feature
    space, orthonormal); ``singular_values`` ``[2]``; ``basis`` ``[n, 1]`` U_1 from
    :func:`~atp_viz.core.basis.principal_basis`; ``projections`` ``[n, 2]`` the rank-1 reconstruction
    U_1 U_1^T X;
    ``principal_token`` ``[2]`` x'_1 = U_1^T X = sigma_1 v_1. The ATP outputs use q = k = v = X
    (identity projections, d_h = 2): ``linear`` with U_1 and ``linear_flipped`` with -U_1 are equal (the
    linear form is sign invariant); a softmax over the single principal key returns V' = U_1^T X, which
    flips with the sign (``softmax`` vs ``softmax_flipped``).
    """

    points: np.ndarray  # [n, 2]
    directions: np.ndarray  # [2, 2]
    singular_values: np.ndarray  # [2]
    basis: np.ndarray  # [n, 1]
    projections: np.ndarray  # [n, 2]
    principal_token: np.ndarray  # [2]
    linear: np.ndarray  # [n, 2]
    linear_flipped: np.ndarray  # [n, 2]
    softmax: np.ndarray  # [n, 2]
    softmax_flipped: np.ndarray  # [n, 2]

    @property
    def arrows(self) -> np.ndarray:
        """``[2, 2]`` drawn arrows: sigma_i v_i / sqrt(n), the RMS extent of the tokens along v_i."""
        return self.singular_values[:, None] * self.directions / math.sqrt(self.points.shape[0])


def toy_example(n: int = 7, seed: int = 0) -> Toy:
    """``n`` tokens in 2-D spread mostly along one direction, on one side of the origin (seeded).

    All tokens have a positive component along the main direction, so the linear form's denominators
    stay well above zero and its outputs sit among the tokens (1 + s is not a positive kernel: with
    tokens on both sides of the origin an output could land anywhere).
    """
    g = torch.Generator().manual_seed(seed)
    t = 1.0 + 3.0 * torch.rand(n, generator=g, dtype=torch.float64)  # position along the main direction
    e = 0.8 * torch.randn(n, generator=g, dtype=torch.float64)  # across it
    along = torch.tensor([math.cos(0.5), math.sin(0.5)], dtype=torch.float64)
    across = torch.tensor([-math.sin(0.5), math.cos(0.5)], dtype=torch.float64)
    X = t[:, None] * along + e[:, None] * across  # (n, 2)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # (2,), (2, 2)
    U1 = principal_basis(X, 1, "exact")  # (n, 1)
    # Align v_i with the basis' sign convention so that x'_1 = U_1^T X = sigma_1 v_1 exactly.
    xp1 = (U1.mT @ X)[0]  # (2,)
    if float(xp1 @ Vh[0]) < 0:
        Vh = Vh.clone()
        Vh[0] = -Vh[0]
    proj = U1 @ (U1.mT @ X)  # (n, 2)
    q = k = v = X[None, None]  # (1, 1, n, 2)

    def lin(u: torch.Tensor) -> np.ndarray:
        return forms.get("linear").attend(q, k, v, u[None])[0, 0].numpy()

    def soft(u: torch.Tensor) -> np.ndarray:
        kp = u.mT @ X  # (1, 2) principal key = principal value here
        w = torch.softmax((X @ kp.mT) / math.sqrt(2.0), dim=-1)  # (n, 1): one key, weight 1
        return (w @ kp).numpy()

    return Toy(
        points=X.numpy(),
        directions=Vh.numpy(),
        singular_values=S.numpy(),
        basis=U1.numpy(),
        projections=proj.numpy(),
        principal_token=xp1.numpy(),
        linear=lin(U1),
        linear_flipped=lin(-U1),
        softmax=soft(U1),
        softmax_flipped=soft(-U1),
    )


def _toy_points(fig: go.Figure, toy: Toy, col: int) -> None:
    """Tokens, their rank-1 projections (dotted: where each token moves) and the linear-form outputs."""
    first = col == 1
    pts, proj = toy.points, toy.projections
    for p, pr in zip(pts, proj, strict=True):
        segment = go.Scatter(
            x=[p[0], pr[0]], y=[p[1], pr[1]], mode="lines", showlegend=False,
            line=dict(color="lightgrey", dash="dot"), hoverinfo="skip",
        )  # fmt: skip
        fig.add_trace(segment, row=1, col=col)
    labels = [f"x{i + 1}" for i in range(len(pts))]
    open_circle = dict(size=10, color="white", line=dict(color=KEPT, width=2))
    star = dict(size=9, symbol="star", color="#e45756")
    for xy, name, extra in (
        (pts, "tokens x_i", dict(mode="markers+text", text=labels, textposition="top center",
                                 marker=dict(size=10, color=KEPT))),
        (proj, "rank-1 projection u₁u₁ᵀX", dict(mode="markers", marker=open_circle)),
        (toy.linear, "ATP linear-form output (r = 1)", dict(mode="markers", marker=star)),
    ):  # fmt: skip
        fig.add_trace(
            go.Scatter(x=xy[:, 0], y=xy[:, 1], name=name, showlegend=first, **extra), row=1, col=col
        )


def _toy_arrows(fig: go.Figure, toy: Toy, col: int, sign: float) -> None:
    """The principal directions as arrows from the origin (the first one flipped by ``sign``)."""
    xref, yref = ("x", "y") if col == 1 else ("x2", "y2")
    for i, color in ((0, ENERGY), (1, "#72b7b2")):
        a = toy.arrows[i] * (sign if i == 0 else 1.0)
        common = dict(xref=xref, yref=yref, font=dict(color=color, size=14))
        fig.add_annotation(  # the arrow itself, from the origin; its label sits at the head
            x=a[0], y=a[1], ax=0, ay=0, axref=xref, ayref=yref, showarrow=True, arrowhead=3,
            arrowwidth=3, arrowcolor=color, text="", **common,
        )  # fmt: skip
        label = f"{'-' if sign < 0 and i == 0 else ''}σ{'₁₂'[i]}v{'₁₂'[i]}"
        fig.add_annotation(
            x=a[0], y=a[1], text=label, showarrow=False, xshift=14 * np.sign(a[0] or 1),
            yshift=-12 if i == 0 else 12, **common,
        )  # fmt: skip


def _toy_axes(fig: go.Figure, toy: Toy) -> None:
    """The same square axes on both panels, spanning everything drawn and the origin."""
    every = np.concatenate(
        [toy.points, toy.projections, toy.arrows, -toy.arrows, toy.linear, np.zeros((1, 2))]
    )
    lo, hi = every.min(axis=0), every.max(axis=0)
    pad = 0.12 * float((hi - lo).max())
    for col in (1, 2):
        fig.update_xaxes(
            range=[lo[0] - pad, hi[0] + pad], zeroline=True, title_text="feature 1", row=1, col=col
        )
        fig.update_yaxes(
            range=[lo[1] - pad, hi[1] + pad], zeroline=True, title_text="feature 2", row=1, col=col,
            scaleanchor="x" if col == 1 else "x2", scaleratio=1,
        )  # fmt: skip


def toy_figure(toy: Toy | None = None) -> go.Figure:
    """Left: tokens, principal directions as arrows and the rank-1 projections. Right: u_1 flipped."""
    toy = toy or toy_example()
    lin_change = float(np.abs(toy.linear - toy.linear_flipped).max())
    soft_change = float(np.abs(toy.softmax - toy.softmax_flipped).max())
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "tokens, principal directions, rank-1 projection",
            f"u₁ flipped to -u₁: the linear-form output changes by {lin_change:.1g}",
        ),
        horizontal_spacing=0.08,
    )
    for col, sign in ((1, 1.0), (2, -1.0)):
        _toy_points(fig, toy, col)
        _toy_arrows(fig, toy, col, sign)
    _toy_axes(fig, toy)
    title = titled(
        f"{len(toy.points)} tokens with 2 features: σ₁ = {toy.singular_values[0]:.2f}, "
        f"σ₂ = {toy.singular_values[1]:.2f}",
        [
            "arrows: σᵢvᵢ / √n; the principal token x'₁ = u₁ᵀX is σ₁v₁",
            f"a softmax over the principal key would move by {soft_change:.2f} when u₁ flips",
        ],
    )
    fig.update_layout(
        template=plots.TEMPLATE,
        height=520,
        margin=dict(l=60, r=20, t=top_margin(title, True), b=50),
        legend=dict(orientation="h", y=-0.15),
        title=title,
        **TITLE_AT_TOP,
    )
    return fig
