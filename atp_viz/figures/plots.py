"""Plotly figure builders: arrays in, ``plotly.graph_objects.Figure`` out. No Streamlit here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from atp_viz import forms
from atp_viz.analysis.spectra import Spectrum

TEMPLATE = "plotly_white"
THRESHOLD_DASH = ("dot", "dash", "dashdot")


def _layer_colors(n: int) -> list[str]:
    return sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])


def _base(fig: go.Figure, title: str, x: str, y: str, height: int = 420) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        height=height,
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(font=dict(size=10)),
    )
    return fig


def _spectrum_lines(spectra: Sequence[Spectrum], labels: Sequence[str], values, hover: str) -> go.Figure:
    """One coloured line per spectrum: ``values(spectrum)`` against the component index 1..n."""
    fig = go.Figure()
    for sp, label, color in zip(spectra, labels, _layer_colors(len(spectra)), strict=True):
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, sp.singular_values.size + 1),
                y=values(sp),
                mode="lines",
                name=label,
                line=dict(color=color, width=1.6),
                hovertemplate=f"{label}<br>{hover}<extra></extra>",
            )
        )
    return fig


def spectra_figure(
    spectra: Sequence[Spectrum],
    labels: Sequence[str],
    *,
    log: bool = True,
    title: str = "Singular values of the attention input X, per layer",
) -> go.Figure:
    """One line per matrix: normalised singular values s_i / s_1 against the component index."""
    fig = _spectrum_lines(spectra, labels, lambda sp: sp.normalized, "component %{x}<br>s_i/s_1 = %{y:.3g}")
    fig = _base(fig, title, "component i", "s_i / s_1")
    if log:
        fig.update_yaxes(type="log")
    return fit_log_axes(fig)


def energy_figure(
    spectra: Sequence[Spectrum],
    labels: Sequence[str],
    thresholds: Sequence[float],
    *,
    title: str = "Cumulative energy: how many components hold most of X",
) -> go.Figure:
    fig = _spectrum_lines(spectra, labels, lambda sp: sp.cumulative_energy, "%{x} components: %{y:.1%}")
    for t, dash in zip(thresholds, THRESHOLD_DASH, strict=False):
        fig.add_hline(y=t, line=dict(color="grey", dash=dash, width=1), annotation_text=f"{t:.0%}")
    fig = _base(fig, title, "components kept (k)", "energy E(k)")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    fig.update_xaxes(type="log")
    return fit_log_axes(fig)


def ranks_heatmap(
    table: np.ndarray,
    row_labels: Sequence[str],
    thresholds: Sequence[float],
    n_tokens: int,
    *,
    title: str = "Components needed per layer and energy threshold",
) -> go.Figure:
    """``table[layer, threshold]`` = rank needed; cells also show it as a fraction of L."""
    text = [[f"{v} ({v / n_tokens:.0%} of L)" for v in row] for row in table]
    fig = go.Figure(
        go.Heatmap(
            z=table,
            x=[f"{t:.0%}" for t in thresholds],
            y=list(row_labels),
            text=text,
            texttemplate="%{text}",
            colorscale="Blues",
            colorbar=dict(title="rank"),
            hovertemplate="%{y}, %{x} energy: %{text}<extra></extra>",
        )
    )
    fig = _base(fig, title, "energy threshold", "", height=max(300, 28 * len(row_labels) + 120))
    fig.update_yaxes(autorange="reversed")
    return fig


def effective_rank_figure(
    eranks: Sequence[float],
    ranks_90: Sequence[int],
    n_tokens: int,
    d_model: int,
    *,
    title: str = "Effective rank of X per layer",
) -> go.Figure:
    """Bars: effective rank; markers: rank for 90% energy; lines: the ceilings L and d."""
    layers = [f"L{i}" for i in range(len(eranks))]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=list(eranks), name="effective rank", marker_color="#4c78a8"))
    fig.add_trace(
        go.Scatter(
            x=layers, y=list(ranks_90), name="rank for 90% energy", mode="markers", marker=dict(size=9)
        )
    )
    ceiling = min(n_tokens, d_model)
    fig.add_hline(
        y=ceiling,
        line=dict(dash="dash", color="grey"),
        annotation_text=f"max possible = min(L, d) = {ceiling}",
    )
    return _base(fig, f"{title} (L = {n_tokens} tokens)", "layer", "rank")


def fraction_vs_length_figure(
    lengths: Sequence[int],
    fractions: np.ndarray,
    labels: Sequence[str],
    d_model: int,
    threshold: float,
    *,
    title: str | None = None,
    y_title: str = "rank needed / L",
) -> go.Figure:
    """``fractions[series, point]`` = rank needed / L, one series per layer (or summary).

    The dashed curve d / L is the ceiling: rank(X) <= d, so past L = d the fraction must fall even
    for a matrix with no structure at all. A claim of "relatively lower rank" is only interesting
    where the measured fractions sit clearly below that ceiling (and below 1).
    """
    fig = go.Figure()
    lengths = np.asarray(lengths)
    for row, label, color in zip(fractions, labels, _layer_colors(len(labels)), strict=True):
        fig.add_trace(
            go.Scatter(
                x=lengths,
                y=row,
                mode="lines+markers",
                name=label,
                line=dict(color=color, width=1.4),
                hovertemplate=f"{label}<br>L = %{{x}}<br>%{{y:.1%}} of L<extra></extra>",
            )
        )
    grid = np.geomspace(max(lengths.min(), 1), lengths.max(), 64)
    fig.add_trace(
        go.Scatter(
            x=grid,
            y=np.minimum(1.0, d_model / grid),
            mode="lines",
            name="ceiling min(1, d/L)",
            line=dict(color="black", dash="dash", width=1),
        )
    )
    title = title or f"Fraction of components needed for {threshold:.0%} energy vs sequence length"
    fig = _base(fig, title, "sequence length L (tokens)", y_title, height=460)
    fig.update_xaxes(type="log")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return fit_log_axes(fig)


def token_norms_figure(norms: np.ndarray, tokens: Sequence[str], *, title: str) -> go.Figure:
    """Row norms of X per token: shows an attention-sink token whose activations dwarf the rest."""
    fig = go.Figure(
        go.Bar(
            x=np.arange(len(norms)),
            y=norms,
            customdata=list(tokens),
            hovertemplate="token %{x}: %{customdata}<br>|x| = %{y:.3g}<extra></extra>",
            marker_color="#f58518",
        )
    )
    fig = _base(fig, title, "token position", "row norm of X", height=320)
    fig.update_yaxes(type="log")
    return fit_log_axes(fig)


def layer_error_figure(
    errors: np.ndarray, *, title: str = "Relative error of each layer's output"
) -> go.Figure:
    """||H_ATP - H_dense|| / ||H_dense|| per block output."""
    fig = go.Figure(
        go.Bar(
            x=[f"L{i}" for i in range(len(errors))],
            y=errors,
            marker_color="#e45756",
            hovertemplate="%{x}: %{y:.3g}<extra></extra>",
        )
    )
    return _base(fig, title, "layer", "relative error", height=320)


def log_vline(fig: go.Figure, x: float, *, color: str, dash: str | None = None, label: str = "") -> None:
    """A vertical line at data value ``x`` on a log x axis. Plotly reads a shape's x on a log axis as
    log10(x), so ``add_vline(x=r)`` would land at 10^r; this converts. No label, no annotation: plotly
    adds one even for ``annotation_text=None``, and Plotly.js draws an empty one as "new text"."""
    line = dict(color=color, dash=dash, width=1)
    fig.add_vline(x=math.log10(x), line=line, **({"annotation_text": label} if label else {}))


def log_hline(fig: go.Figure, y: float, *, color: str, dash: str | None = None, label: str = "") -> None:
    """A horizontal line at data value ``y`` on a log y axis (see :func:`log_vline`)."""
    line = dict(color=color, dash=dash, width=1)
    fig.add_hline(y=math.log10(y), line=line, **({"annotation_text": label} if label else {}))


def log_range(values: Sequence[float], pad: float = 0.05) -> list[float]:
    """An explicit log-axis range (log10 units) spanning ``values`` with a small margin."""
    lo, hi = math.log10(min(values)), math.log10(max(values))
    span = max(hi - lo, 1e-3)
    return [lo - pad * span, hi + pad * span]


def _positive(values) -> list[float]:
    if values is None or isinstance(values, str):
        return []
    arr = np.asarray(values, dtype=object).ravel()
    out = []
    for v in arr:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            out.append(f)
    return out


def fit_log_axes(fig: go.Figure) -> go.Figure:
    """Give every log axis of ``fig`` without a range an explicit one spanning its traces' positive values.

    Plotly's autorange also counts shapes, and on a log axis it reads a shape's coordinate as log10 of the
    value, so one ``add_hline(y=10)`` would stretch a log axis to 10^10 and squeeze the data into a sliver.
    An explicit range built from the data (and shapes drawn with :func:`log_vline` / :func:`log_hline`)
    cannot. Returns ``fig``."""
    values: dict[str, list[float]] = {}
    for trace in fig.data:
        if trace.type not in ("scatter", "scattergl", "bar"):
            continue
        for letter in ("x", "y"):
            ref = getattr(trace, f"{letter}axis", None) or letter  # "x", "x2", ...
            name = f"{letter}axis{ref[1:]}"
            values.setdefault(name, []).extend(_positive(getattr(trace, letter)))
    for name, vals in values.items():
        axis = fig.layout[name]
        if axis is not None and axis.type == "log" and axis.range is None and vals:
            axis.range = log_range(vals)
    return fig


def sweep_figure(sweep, *, current: int | None = None) -> go.Figure:
    """Error vs rank, one line per form (:class:`atp_viz.analysis.compare.Sweep`), on a log rank axis.

    The exact form's error is the cost of dropping bases; every other form's line is its total error
    (errors of two forms do not add up, so no difference line is drawn)."""
    ranks = np.asarray(sweep.ranks)
    fig = go.Figure()
    for name, errs in sweep.errors.items():
        label = forms.get(name).display_name
        label += ": error from dropped bases alone" if name == "exact" else ": total error"
        fig.add_trace(go.Scatter(x=ranks, y=errs, name=label, mode="lines+markers"))
    if current is not None:
        log_vline(fig, current, color="grey", dash="dash", label=f"r = {current}")
    for frac in (0.25, 0.5):
        log_vline(fig, max(1, round(frac * sweep.n_tokens)), color="lightgrey")
    fig = _base(
        fig,
        f"Error vs rank (L = {sweep.n_tokens}; light lines at L/4 and L/2)",
        "rank r",
        sweep.metric,
        height=420,
    )
    fig.update_xaxes(type="log", range=log_range(ranks.tolist() + ([current] if current else [])))
    return fig


def rank_grid_figure(
    ranks_by_form: dict[str, Sequence[int]],
    values_by_form: dict[str, Sequence[float]],
    dense_value: float,
    *,
    title: str,
    y_title: str,
    log_y: bool = False,
    references: dict[str, float] | None = None,
) -> go.Figure:
    """A metric vs rank, one line per form, with the dense value (and any ``references``, label ->
    value, e.g. an exact window alone) as reference lines."""
    fig = go.Figure()
    for form, ranks in ranks_by_form.items():
        fig.add_trace(
            go.Scatter(x=list(ranks), y=list(values_by_form[form]), name=f"ATP {form}", mode="lines+markers")
        )
    fig = _base(fig, title, "rank r (principal keys for the past)", y_title, height=380)
    fig.update_xaxes(type="log")
    lines = {"dense": (dense_value, "dash"), **{k: (v, "dot") for k, v in (references or {}).items()}}
    if log_y:  # a shape on a log axis is placed at log10 of its value: see log_hline
        for label, (value, dash) in lines.items():
            log_hline(fig, value, color="black", dash=dash, label=label)
        shown = [v for vs in values_by_form.values() for v in vs] + [v for v, _ in lines.values()]
        fig.update_yaxes(type="log", range=log_range(_positive(shown)))
    else:
        for label, (value, dash) in lines.items():
            fig.add_hline(y=value, line=dict(dash=dash, color="black"), annotation_text=label)
    return fit_log_axes(fig)


def cost_scaling_figure(
    lengths: Sequence[int], series: dict[str, Sequence[float]], *, title: str, y_title: str
) -> go.Figure:
    """Cost (analytical or measured) vs L on log-log axes: quadratic vs linear shows as slope 2 vs 1."""
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_trace(go.Scatter(x=list(lengths), y=list(ys), name=name, mode="lines+markers"))
    fig = _base(fig, title, "sequence length L", y_title, height=420)
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fit_log_axes(fig)


def loss_curve_figure(losses: Sequence[float], *, title: str, y_title: str, window: int = 10) -> go.Figure:
    """A fine-tuning loss per step, with its running mean over ``window`` steps (steps are noisy:
    each sees a different batch). Skipped (non-finite) steps are gaps, not zeros."""
    y = np.asarray(losses, dtype=float)
    x = np.arange(1, len(y) + 1)
    fig = go.Figure(go.Scatter(x=x, y=y, name="loss per step", mode="lines", line=dict(color="#9ecae9")))
    if len(y) >= window:
        ok = np.isfinite(y)
        kernel = np.ones(window)
        num = np.convolve(np.where(ok, y, 0.0), kernel, mode="valid")
        den = np.convolve(ok.astype(float), kernel, mode="valid")
        mean = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
        fig.add_trace(
            go.Scatter(x=x[window - 1 :], y=mean, name=f"mean of {window} steps", line=dict(color="#1f77b4"))
        )
    return _base(fig, title, "step", y_title, height=340)
