"""Figure layout shared by the tour's steps: heatmap panels with clipped colour scales, titles with
wrapped subtitles, presenter mode (large fonts for a projector), a figure that only says why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from atp_viz.figures import plots
from atp_viz.figures.tour.data import Pooled

NOTE_LINE = 140  # characters per line of a figure's subtitle
CLIP_PERCENTILE = 99.0  # diverging colour scales stop here so one outlier feature does not wash out
KEPT = "#4c78a8"
DROPPED = "#bab0ac"
ENERGY = "#f58518"


@dataclass(frozen=True)
class Panel:
    pooled: Pooled
    title: str
    x_title: str
    y_title: str
    diverging: bool = True
    coloraxis: str = "coloraxis"
    colorbar_title: str = ""


def _axis_name(i: int) -> str:
    return "xaxis" if i == 1 else f"xaxis{i}"


def titled(main: str, notes: Sequence[str]) -> str:
    """``main`` with the non-empty ``notes`` below it in small type, wrapped at ``NOTE_LINE`` characters
    (plotly does not wrap titles)."""
    lines, cur = [], ""
    for n in (n for n in notes if n):
        if cur and len(cur) + 2 + len(n) > NOTE_LINE:
            lines.append(cur)
            cur = n
        else:
            cur = f"{cur}; {n}" if cur else n
    if cur:
        lines.append(cur)
    return main + "".join(f"<br><sup>{line}</sup>" for line in lines)


# Titles hang from the top of the figure, so a subtitle of several lines grows downwards into the margin
# that _top_margin reserves, never into the plots.
TITLE_AT_TOP = dict(title_yref="container", title_y=1.0, title_yanchor="top", title_pad_t=14)


def top_margin(title: str, subplot_titles: bool = False) -> int:
    """Room for a title of several lines (and for subplot titles under it)."""
    return 50 + 18 * title.count("<br>") + (30 if subplot_titles else 0)


def panels_figure(
    panels: Sequence[Panel],
    title: str,
    notes: Sequence[str] = (),
    *,
    widths: Sequence[float] | None = None,
    height: int = 480,
) -> go.Figure:
    """Heatmaps side by side, token positions on the axes, one colour bar per colour axis.

    Colour scales stop at the ``CLIP_PERCENTILE`` percentile (of |value| for diverging scales, which are
    centred on 0) over all panels that share them, so one outlier feature or the first token's column does
    not wash out the rest; the subtitle says so, after ``notes`` (aggregation notes, by the callers).
    """
    n = len(panels)
    fig = make_subplots(
        rows=1,
        cols=n,
        subplot_titles=[p.title for p in panels],
        column_widths=list(widths) if widths else None,
        horizontal_spacing=0.11 if n > 1 else 0.02,
    )
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(panels, start=1):
        groups.setdefault(p.coloraxis, []).append(i)
        fig.add_trace(
            go.Heatmap(
                z=p.pooled.values,
                x=p.pooled.cols(),
                y=p.pooled.rows(),
                coloraxis=p.coloraxis,
                hovertemplate=f"{p.y_title} %{{y}}, {p.x_title} %{{x}}: %{{z:.3g}}<extra></extra>",
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text=p.x_title, row=1, col=i)
        same = i > 1 and panels[i - 2].y_title == p.y_title  # said once: room for the colour bar before it
        fig.update_yaxes(title_text=None if same else p.y_title, autorange="reversed", row=1, col=i)
    for name, idx in groups.items():
        first = panels[idx[0] - 1]
        dom = fig.layout[_axis_name(idx[-1])].domain
        bar = dict(x=dom[1] + 0.005, xanchor="left", thickness=10, len=0.85, title=first.colorbar_title)
        if first.diverging:
            vals = np.concatenate([np.abs(panels[i - 1].pooled.values).ravel() for i in idx])
            vals = vals[np.isfinite(vals)]
            lim = float(np.percentile(vals, CLIP_PERCENTILE)) if vals.size else 1.0
            lim = lim if lim > 0 else 1.0
            ax = dict(colorscale="RdBu_r", cmin=-lim, cmax=lim, colorbar=bar)
        else:
            vals = np.concatenate([panels[i - 1].pooled.values.ravel() for i in idx])
            vals = vals[np.isfinite(vals)]
            lo = float(vals.min()) if vals.size else 0.0
            hi = float(np.percentile(vals, CLIP_PERCENTILE)) if vals.size else 1.0
            hi = hi if hi > lo else (float(vals.max()) if vals.size and vals.max() > lo else lo + 1.0)
            ax = dict(colorscale="Viridis", cmin=lo, cmax=hi, colorbar=bar)
        fig.update_layout({name: ax})
    clip = f"colours stop at the {CLIP_PERCENTILE:.0f}th percentile (hover for values)"
    text = titled(title, [*notes, clip])
    fig.update_layout(
        template=plots.TEMPLATE,
        title=text,
        **TITLE_AT_TOP,
        height=height,
        margin=dict(l=60, r=40, t=top_margin(text, any(p.title for p in panels)), b=50),
    )
    return fig


def presenter_layout(fig: go.Figure, scale: float = 1.6) -> go.Figure:
    """Large fonts for a lecture hall: titles, subplot titles, axis titles and legends scaled by ``scale``,
    tick labels less (they would collide between panels), a taller figure with room for the title.

    Returns a new figure (the given one is left as it is, so a cached figure is never modified)."""
    fig = go.Figure(fig)
    base = 14 * scale
    tick = 14 * (1 + (scale - 1) / 3)
    top = fig.layout.margin.t
    fig.update_layout(
        font=dict(size=base),
        title_font=dict(size=base * 1.3),
        title_pad_t=14 * scale,
        height=int((fig.layout.height or 450) * 1.25),
        legend=dict(font=dict(size=base * 0.9)),
        margin_t=int((top if top is not None else 80) * scale),
    )
    fig.update_xaxes(tickfont_size=tick, title_font_size=base)
    fig.update_yaxes(tickfont_size=tick, title_font_size=base)
    fig.update_coloraxes(colorbar_tickfont_size=tick, colorbar_title_font_size=tick)
    fig.update_traces(colorbar_tickfont_size=tick, selector=dict(type="heatmap"))
    fig.update_annotations(font_size=base * 1.05)  # subplot titles and labels are annotations
    return fig


def refusal_figure(title: str, message: str) -> go.Figure:
    """No plot, only ``message`` (a sentence for the user) under ``title``."""
    fig = go.Figure()
    fig.add_annotation(
        text="<br>".join(wrap(message, 90)), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    text = titled(title, ["attention maps not drawn"])
    fig.update_layout(
        template=plots.TEMPLATE, title=text, **TITLE_AT_TOP, height=300, margin_t=top_margin(text)
    )
    return fig


def wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return [*lines, cur] if cur else lines


def fmt(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g} {unit}".rstrip()
