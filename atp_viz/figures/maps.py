"""Attention maps that show structure: colour scales, attention-sink columns left out, token strings on
hover (and on the axes when the map is small), and the causal triangle outlined for decoders.

Why the scale matters: attention weights span decades. On a linear scale SmolLM2's maps are a dark
square (the first token, an attention sink, and the first rows of the causal triangle take the top of
the range) and MiniLM's look like noise (a few cells near 0.3, the rest near 1/L). The default, a log
scale over the top ``LOG_DECADES`` decades, spreads the weights that matter over the colour range; the
tests check that on both bundled models.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from atp_viz.analysis.compare import downsample
from atp_viz.figures import plots

SCALES = {
    "log": "log",
    "clip": "clip at 99th percentile",
    "rank": "rank within each row",
    "linear": "linear",
}
DEFAULT_SCALE = "log"
LOG_DECADES = 4.0  # a log scale shows the top this many decades; smaller weights get the bottom colour
SIGNED_DECADES = 2.0  # a symmetric log scale (signed maps) shows fewer: |w| below 1% of the top is white
CLIP_PERCENTILE = 99.0
SMALL_MAP = 48  # up to this many rows/columns every token string is written on the axes
OUTLINE = "#e45756"


@dataclass(frozen=True)
class Colours:
    """What a map's colour axis shows: ``z`` (the values coloured; NaN = blank), its range, the colour
    scale, the colour bar's ticks and title, and a note for the figure's title."""

    z: np.ndarray
    zmin: float
    zmax: float
    colorscale: str
    colorbar: dict
    note: str
    transformed: bool  # z is not the raw value (hover then shows the raw one)


def _finite(m: np.ndarray) -> np.ndarray:
    return m[np.isfinite(m)]


def _row_rank(m: np.ndarray, signed: bool) -> np.ndarray:
    """Each value's rank within its row, scaled to [0, 1] (ties share a rank); for a signed map, the rank
    of |value| with the value's sign, in [-1, 1]. NaN stays NaN."""
    out = np.full(m.shape, np.nan)
    for i, row in enumerate(m):
        ok = np.isfinite(row)
        vals = np.abs(row[ok]) if signed else row[ok]
        if vals.size == 0:
            continue
        _, inverse = np.unique(vals, return_inverse=True)
        top = max(int(inverse.max()), 1)
        ranked = inverse / top
        out[i, ok] = np.sign(row[ok]) * ranked if signed else ranked
    return out


def _decade_ticks(lo: float, hi: float, signed: bool, unit: float = 1.0) -> dict:
    ks = np.arange(np.ceil(lo - 1e-9), np.floor(hi + 1e-9) + 1)
    if signed:  # z = sign * decades above ``unit``: ticks at +-unit * 10^k
        vals = [float(k) for k in ks]
        vals = sorted({*vals, *(-v for v in vals)})
        text = [("-" if v < 0 else "") + f"{unit * 10 ** abs(v):.0e}" if v else "0" for v in vals]
        return dict(tickvals=vals, ticktext=text)
    return dict(tickvals=[float(k) for k in ks], ticktext=[f"{10**k:.0e}" for k in ks])


def colours(
    m: np.ndarray, scale: str = DEFAULT_SCALE, *, signed: bool | None = None, hidden_cols: Sequence[int] = ()
) -> Colours:
    """The colours of map ``m`` on ``scale`` (a key of :data:`SCALES`).

    ``signed`` (default: the map has negative values) centres a diverging scale on 0. ``hidden_cols`` are
    left blank and out of the colour range (attention sinks). Non-negative maps: ``log`` colours log10 of
    the weight over the top :data:`LOG_DECADES` decades (exact zeros, e.g. above a causal mask, are
    blank); ``clip`` stops at the :data:`CLIP_PERCENTILE` percentile; ``rank`` colours each weight by its
    rank within its row; ``linear`` spans 0 to the maximum. Signed maps get the same on |value| with the
    sign kept (a symmetric log scale for ``log``)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    m = np.array(m, dtype=np.float64)
    if len(hidden_cols):
        m[:, list(hidden_cols)] = np.nan
    vals = _finite(m)
    if signed is None:
        top = float(np.abs(vals).max()) if vals.size else 0.0
        signed = bool(vals.size and vals.min() < -1e-6 * max(top, 1e-30))
    cmap = "RdBu_r" if signed else "Viridis"
    mag = np.abs(vals) if signed else vals
    top = float(mag.max()) if mag.size else 1.0
    top = top if top > 0 else 1.0
    if scale == "linear":
        lo = -top if signed else (min(0.0, float(vals.min())) if vals.size else 0.0)
        return Colours(m, lo, top, cmap, {}, "linear colour scale", False)
    if scale == "clip":
        hi = float(np.percentile(mag, CLIP_PERCENTILE)) if mag.size else 1.0
        hi = hi if hi > 0 else top
        lo = -hi if signed else 0.0
        note = f"colours stop at the {CLIP_PERCENTILE:.0f}th percentile ({hi:.3g})"
        return Colours(m, lo, hi, cmap, {}, note, False)
    if scale == "rank":
        z = _row_rank(m, signed)
        note = "colour = rank of the weight within its row" + (" (by size, sign kept)" if signed else "")
        return Colours(z, -1.0 if signed else 0.0, 1.0, cmap, dict(title="rank in row"), note, True)
    hi = np.log10(top)  # log
    lo = hi - LOG_DECADES
    if signed:
        unit = top * 10.0**-SIGNED_DECADES  # |values| below this are drawn as 0
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.sign(m) * np.clip(np.log10(np.abs(m) / unit), 0.0, None)
        note = f"symmetric log colour scale over {SIGNED_DECADES:.0f} decades (|w| < {unit:.0e} drawn as 0)"
        bar = _decade_ticks(0.0, SIGNED_DECADES, True, unit)
        return Colours(z, -SIGNED_DECADES, SIGNED_DECADES, cmap, bar, note, True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(m > 0, np.log10(np.where(m > 0, m, 1.0)), np.nan)
    note = f"log colour scale, top {LOG_DECADES:.0f} decades (weights below {10**lo:.0e} all darkest)"
    return Colours(z, float(lo), float(hi), cmap, _decade_ticks(lo, hi, False), note, True)


def axis_labels(tokens: Sequence[str], block: int = 1) -> list[str]:
    """Unique category labels for a map's rows or columns: ``"token #i"``, or ``"#i-j"`` for a block of
    tokens averaged together (duplicate labels would merge two rows on a category axis)."""
    if block <= 1:
        return [f"{(t.strip() or repr(t))} #{i}" for i, t in enumerate(tokens)]
    n = len(tokens)
    return [f"#{a}-{min(a + block, n) - 1}" for a in range(0, n, block)]


def principal_labels(n: int, block: int = 1) -> list[str]:
    """Column labels of a map over ``n`` principal keys: ``"key a"``, or ``"keys a-b"`` per block."""
    step = max(1, block)
    return [f"key {a + 1}" if step == 1 else f"keys {a + 1}-{min(a + step, n)}" for a in range(0, n, step)]


def token_map(
    m: np.ndarray,
    tokens: Sequence[str],
    *,
    title: str,
    max_size: int = 256,
    principal: bool = False,
    sinks: Sequence[int] = (),
    scale: str = DEFAULT_SCALE,
    signed: bool | None = None,
    causal: bool = False,
    height: int = 440,
) -> go.Figure:
    """An attention map over ``tokens`` (rows: queries; columns: key tokens, or principal keys with
    ``principal``) as :func:`attention_heatmap` draws it, block-averaged above ``max_size`` a side.

    ``sinks`` are key-token columns of the full map to leave out. They are removed *before* the blocks
    are averaged, so a block that holds a sink shows the average of its other tokens (blanking the
    block afterwards would hide every token that shares a block with the sink on a long text); a
    sink's own column is blank when the map is drawn token by token. The title names them."""
    m = np.array(m, dtype=np.float64)
    sinks = sorted({int(j) for j in sinks if 0 <= int(j) < m.shape[1]}) if not principal else []
    if sinks:
        m[:, sinks] = np.nan
    with warnings.catch_warnings():  # a block made only of sink columns averages to NaN: blank, as meant
        warnings.simplefilter("ignore", RuntimeWarning)
        small, block = downsample(m, max_size)
    col_block = block if m.shape[1] > small.shape[1] else 1
    rows = axis_labels(tokens, block)
    cols = principal_labels(m.shape[1], col_block) if principal else axis_labels(tokens, col_block)
    full = axis_labels(tokens)
    return attention_heatmap(
        small,
        title=title,
        row_labels=rows,
        col_labels=cols,
        scale=scale,
        signed=signed,
        hidden_cols=sinks if col_block == 1 else (),
        left_out=[full[j] for j in sinks],
        causal=causal and not principal,
        block=block,
        x_title="principal key" if principal else "key token",
        height=height,
    )


def _causal_outline(n_rows: int, n_cols: int) -> str:
    """SVG path around the cells a causal query may attend to (key <= query), in cell units: the cells'
    centres are the category serial numbers 0..n-1, so cell edges sit at +-0.5."""
    n = min(n_rows, n_cols)
    steps = "".join(f" H {i + 0.5} V {i + 0.5}" for i in range(n))
    return f"M -0.5 -0.5{steps} V {n_rows - 0.5} H -0.5 Z"


def attention_heatmap(
    m: np.ndarray,
    *,
    title: str,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    scale: str = DEFAULT_SCALE,
    signed: bool | None = None,
    hidden_cols: Sequence[int] = (),
    left_out: Sequence[str] = (),
    causal: bool = False,
    block: int = 1,
    x_title: str = "key token",
    y_title: str = "query token",
    height: int = 440,
) -> go.Figure:
    """One attention map (``m`` rows x columns, already block-averaged when ``block`` > 1).

    Rows and columns are category axes labelled by :func:`axis_labels`, so hovering a cell names both
    tokens (Plotly's own hover; no per-cell text is sent). Up to :data:`SMALL_MAP` a side every label is
    written on the axis; beyond, Plotly thins them. ``causal`` outlines the triangle a decoder's query may
    attend to. ``hidden_cols`` (indices into ``m``'s columns) are blank and said in the title;
    ``left_out`` names columns already removed from ``m`` (e.g. before block averaging) for the title."""
    c = colours(m, scale, signed=signed, hidden_cols=hidden_cols)
    value = "%{customdata:.3g}" if c.transformed else "%{z:.3g}"
    trace = go.Heatmap(
        z=c.z.astype(np.float32),
        x=list(col_labels),
        y=list(row_labels),
        zmin=c.zmin,
        zmax=c.zmax,
        colorscale=c.colorscale,
        colorbar=dict(thickness=12, **c.colorbar),
        hoverongaps=False,
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>weight {value}<extra></extra>",
    )
    if c.transformed:  # the raw weight for the hover; float32 keeps the message small
        raw = np.array(m, dtype=np.float32)
        if len(hidden_cols):
            raw[:, list(hidden_cols)] = np.nan
        trace.customdata = raw
    fig = go.Figure(trace)
    notes = [c.note]
    if block > 1:
        notes.append(f"averaged over blocks of {block} tokens")
    named = list(left_out) or [str(col_labels[j]) for j in hidden_cols]
    if named:
        shown = ", ".join(named[:4])
        more = f" and {len(named) - 4} more" if len(named) > 4 else ""
        notes.append(f"attention-sink columns left out: {shown}{more}")
    if causal:
        fig.add_shape(
            type="path",
            path=_causal_outline(len(row_labels), len(col_labels)),
            line=dict(color=OUTLINE, width=1.5),
            layer="above",
        )
        notes.append("outline: the causal triangle (keys up to the query)")
    fig = plots._base(fig, title + "".join(f"<br><sup>{n}</sup>" for n in notes), x_title, y_title, height)
    fig.update_layout(margin=dict(t=60 + 16 * len(notes)))
    fig.update_yaxes(autorange="reversed")
    for axis, labels in ((fig.update_xaxes, col_labels), (fig.update_yaxes, row_labels)):
        axis(type="category", showgrid=False, tickfont_size=10)
        if len(labels) <= SMALL_MAP:
            axis(tickmode="array", tickvals=list(labels), ticktext=list(labels))
    return fig
