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


PRESENTER_WIDTH = 820  # px: the main column of a 1280 x 720 projector with the sidebar open
PRESENTER_COLS = 3  # heatmap panels per row in presenter mode
PANEL_PX = 250  # height of one row of panels in presenter mode


def _wrap_html(text: str, chars: int) -> str:
    """Plotly text (lines joined by <br>, small type in <sup>) wrapped to ``chars`` characters a line."""
    out = []
    for line in text.split("<br>"):
        sup = line.startswith("<sup>") and line.endswith("</sup>")
        body = line[5:-6] if sup else line
        for piece in wrap(body, int(chars * 1.5) if sup else chars) or [""]:  # <sup>: smaller type
            out.append(f"<sup>{piece}</sup>" if sup else piece)
    return "<br>".join(out)


def _panels(fig: go.Figure) -> list[tuple[str, str, str | None]]:
    """(x axis, y axis, colour axis) of each heatmap panel, in order."""
    return [
        ("xaxis" + (t.xaxis or "x")[1:], "yaxis" + (t.yaxis or "y")[1:], t.coloraxis)
        for t in fig.data
        if t.type == "heatmap"
    ]


def _reflow_panels(fig: go.Figure, font: float, tick: float) -> None:
    """Heatmap panels side by side (:func:`panels_figure`) reflowed for a projector: rows of at most
    :data:`PRESENTER_COLS`, each colour bar lying under its panel (a bar standing between two panels
    collides with the next panel's title and tick labels at large type), subplot titles wrapped to
    their panel's width. Other figures are left as they are."""
    panels = _panels(fig)
    titles = list(fig.layout.annotations)[: len(panels)]
    if len(panels) < 2 or any(not a.text for a in titles) or any(c is None for *_, c in panels):
        return
    n = len(panels)
    cols = min(PRESENTER_COLS, n)
    rows = -(-n // cols)
    gap_x = 0.1
    width = (1 - gap_x * (cols - 1)) / cols
    chars = max(8, int(width * PRESENTER_WIDTH / (0.55 * font)))
    title_lines = max(_wrap_html(a.text, chars).count("<br>") + 1 for a in titles)
    title_px = title_lines * font * 1.3 + 10
    below_px = 4 * tick + 1.3 * font + 75  # tick labels, axis title, the colour bar and its labels
    row_px = title_px + PANEL_PX + below_px
    plot_px = rows * row_px - title_px  # the first row's titles sit in the top margin
    last_of_axis = {c: i for i, (*_, c) in enumerate(panels)}
    for i, ((xa, ya, coloraxis), title) in enumerate(zip(panels, titles, strict=True)):
        r, c = divmod(i, cols)
        top = 1 - r * row_px / plot_px
        bottom = top - PANEL_PX / plot_px
        x0 = c * (width + gap_x)
        fig.layout[xa].domain = [x0, x0 + width]
        fig.layout[ya].domain = [max(bottom, 0.0), top]
        title.update(text=_wrap_html(title.text, chars), x=x0 + width / 2, y=top, yanchor="bottom")
        if last_of_axis[coloraxis] == i:
            bar = dict(orientation="h", x=x0 + width / 2, xanchor="center", len=width, thickness=10, nticks=5)
            bar.update(y=bottom - (2 * tick + 1.3 * font + 15) / plot_px, yanchor="top", title_side="top")
            fig.layout[coloraxis].colorbar.update(bar)
    top = int(fig.layout.margin.t + title_px)  # the first row's subplot titles hang into the top margin
    fig.update_layout(height=int(top + plot_px + 40), margin_t=top, margin_b=40)


def presenter_layout(fig: go.Figure, scale: float = 1.6) -> go.Figure:
    """Large fonts for a lecture hall: titles, subplot titles, axis titles and legends scaled by ``scale``,
    tick labels less (they would collide between panels), titles wrapped to a projector's width
    (:data:`PRESENTER_WIDTH`), heatmap panels in rows with their colour bars under them
    (:func:`_reflow_panels`), a taller figure with room for the title.

    Returns a new figure (the given one is left as it is, so a cached figure is never modified)."""
    fig = go.Figure(fig)
    base = 14 * scale
    tick = 14 * (1 + (scale - 1) / 3)
    title = fig.layout.title.text
    if title:  # plotly does not wrap titles: a long one ran off the projector's edge
        fig.layout.title.text = _wrap_html(title, int(PRESENTER_WIDTH / (0.55 * base * 1.3)))
    lines = fig.layout.title.text.count("<br>") + 1 if title else 0
    fig.update_layout(
        font=dict(size=base),
        title_font=dict(size=base * 1.3),
        title_pad_t=14 * scale,
        height=int((fig.layout.height or 450) * 1.25),
        legend=dict(font=dict(size=base * 0.9)),
        margin_t=int(30 + lines * base * 1.3 * 1.25 + (base * 1.4 if _panels(fig) else 0)),
    )
    fig.update_xaxes(tickfont_size=tick, title_font_size=base)
    fig.update_yaxes(tickfont_size=tick, title_font_size=base)
    fig.update_coloraxes(colorbar_tickfont_size=tick, colorbar_title_font_size=tick)
    fig.update_traces(colorbar_tickfont_size=tick, selector=dict(type="heatmap"))
    fig.update_annotations(font_size=base * 1.05)  # subplot titles and labels are annotations
    _reflow_panels(fig, base * 1.05, tick)
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
