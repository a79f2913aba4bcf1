"""The guided tour "How ATP works": one step per idea, each built live from a model's capture.

A step is a title, a short plain-language explanation (for students and teachers), a LaTeX formula
and a function that builds a Plotly figure from a :class:`TourData`: one layer, one query head and a
rank r of one captured text. ``STEPS`` lists them in teaching order; ``toy_example`` is the 2-D
picture of principal bases that one of the steps draws. Library code: no Streamlit here.

Shapes (one sequence, L tokens, d model width, dh head size, r rank), stated once:

- ``x`` ``[L, d]`` the layer's attention input X; ``q`` ``[L, dh]`` the chosen query head;
  ``k``, ``v`` ``[L, dh]`` its key/value head (after rotary embedding where the model has one);
- ``basis`` ``[L, r]`` U_r, orthonormal columns (:func:`atp_viz.atp.principal_basis`, exact SVD);
- ``x_principal`` ``[r, d]`` X' = U_r^T X; ``k_principal``, ``v_principal`` ``[r, dh]`` K', V'.

Long inputs: no figure draws more than ``TourData.max_side`` token rows or columns (``MAX_SIDE``
unless the deployment's ``Settings.map_display_size`` is passed to :func:`tour_data`; ``MAX_FEATURES``
feature columns). Larger matrices are averaged in blocks (``pool``) and the figure title says so;
nothing is cut off. Attention maps for L above ``LIBRARY_MAP_LIMIT`` are computed in row blocks and
pooled as they go, so no L x L matrix is held (the blockwise path is tested against the library's);
above ``TourData.max_map_tokens`` (``Settings.max_map_tokens``, when given) they are not computed at
all and the attention step says why (``TourData.map_refusal``).
"""

from __future__ import annotations

import html
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from atp_viz import atp, costs, plots, spectra
from atp_viz.capture import Capture
from atp_viz.models import ModelInfo
from atp_viz.settings import Settings
from atp_viz.texts import readable_tokens

MAX_SIDE = 256  # token rows/columns (or principal tokens) a heatmap draws before averaging blocks
MAX_FEATURES = 768  # feature columns drawn before averaging blocks (d of the bundled models fits)
TOKEN_TEXT_LIMIT = 400  # the token grid writes each token in its cell up to this L; hover beyond
LIBRARY_MAP_LIMIT = 2048  # up to this L the maps come from atp.dense_attention / atp_attention whole
MAP_ROW_CHUNK = 1024  # query rows per block on the blockwise path (chunk x L floats at a time)
NOTE_LINE = 140  # characters per line of a figure's subtitle
CLIP_PERCENTILE = 99.0  # diverging colour scales stop here so one outlier feature does not wash out

_KEPT = "#4c78a8"
_DROPPED = "#bab0ac"
_ENERGY = "#f58518"


# --------------------------------------------------------------------------------------------------
# Aggregation for long inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Pooled:
    """A matrix averaged in ``row_block`` x ``col_block`` blocks (1 x 1: the matrix itself).

    ``how`` is "mean" (maps, X: an image downsampled) or "rms" (signed bases, where a mean of
    alternating signs would cancel to nothing). The last block of a side may be shorter.
    """

    values: np.ndarray  # [ceil(R / row_block), ceil(C / col_block)]
    row_block: int
    col_block: int
    how: str

    @property
    def aggregated(self) -> bool:
        return self.row_block > 1 or self.col_block > 1

    def rows(self) -> np.ndarray:
        """Index of the first original row of each block (axis coordinates)."""
        return np.arange(self.values.shape[0]) * self.row_block

    def cols(self) -> np.ndarray:
        return np.arange(self.values.shape[1]) * self.col_block

    def note(self, row_unit: str, col_unit: str) -> str:
        """'mean over blocks of 4 tokens x 2 features', or '' when nothing was aggregated."""
        parts = []
        if self.row_block > 1:
            parts.append(f"{self.row_block} {row_unit}")
        if self.col_block > 1:
            parts.append(f"{self.col_block} {col_unit}")
        if not parts:
            return ""
        return f"{'mean' if self.how == 'mean' else 'RMS'} over blocks of " + " x ".join(parts)


def pool_by(m: np.ndarray, row_block: int, col_block: int, how: str = "mean") -> Pooled:
    """Average ``m`` ``[R, C]`` in blocks of the given sizes (NaN-padded, so short last blocks count
    only their real entries).

    Not :func:`atp_viz.compare.downsample`, which pools L x L maps for the explorer with one block size
    derived from the longer side (and leaves a short side alone): the tour needs independent row and
    column blocks (``[L, d]`` and ``[L, r]`` matrices, row blocks that stay aligned across the chunks
    of the blockwise map path) and an RMS mode for signed bases.
    """
    if how not in ("mean", "rms"):
        raise ValueError(f"how must be 'mean' or 'rms', got {how!r}")
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"pool expects a matrix, got shape {m.shape}")
    if row_block == col_block == 1:
        return Pooled(np.abs(m) if how == "rms" else m, 1, 1, how)
    R, C = m.shape
    Rp, Cp = -(-R // row_block) * row_block, -(-C // col_block) * col_block
    padded = np.full((Rp, Cp), np.nan)
    padded[:R, :C] = m * m if how == "rms" else m
    out = np.nanmean(padded.reshape(Rp // row_block, row_block, Cp // col_block, col_block), axis=(1, 3))
    return Pooled(np.sqrt(out) if how == "rms" else out, row_block, col_block, how)


def pool(m: np.ndarray, max_rows: int = MAX_SIDE, max_cols: int = MAX_SIDE, how: str = "mean") -> Pooled:
    """Average ``m`` in blocks so that at most ``max_rows`` x ``max_cols`` cells remain."""
    R, C = np.shape(m)
    return pool_by(m, max(1, math.ceil(R / max_rows)), max(1, math.ceil(C / max_cols)), how)


# --------------------------------------------------------------------------------------------------
# The data every step draws from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadMaps:
    """Attention maps of one query head, already pooled for display, and the outputs' errors.

    ``dense`` and ``exact`` are L x L probability maps (exact = softmax over the rank-r reconstructed
    keys K_r = U_r U_r^T K); ``principal`` is the linear form's L x r map over principal keys A'.
    The errors are ||out - out_dense||_F / ||out_dense||_F for this head.
    """

    dense: Pooled
    exact: Pooled
    principal: Pooled
    exact_error: float
    linear_error: float
    blockwise: bool  # computed in row blocks (L > LIBRARY_MAP_LIMIT), never holding L x L


_DERIVED = ("x_principal", "k_principal", "v_principal", "maps")


@dataclass(frozen=True, eq=False)
class TourData:
    """One layer / query head / rank of a captured text; see the module docstring for shapes.

    Derived arrays are computed on first use and kept (the object is shared read-only between
    sessions when cached by the app). Each has its own lock on this object: not
    ``functools.cached_property``, whose lock (Python < 3.12) is shared by every instance, so one
    session computing a long text's maps would block every other session's tour.
    """

    info: ModelInfo
    tokens: tuple[str, ...]
    layer: int
    head: int  # query head
    rank: int  # r, 1 <= r <= L
    x: np.ndarray  # [L, d]
    q: np.ndarray  # [L, dh]
    k: np.ndarray  # [L, dh] key/value head kv_head
    v: np.ndarray  # [L, dh]
    basis: np.ndarray  # [L, r] U_r
    spectrum: spectra.Spectrum  # singular values of x (uncentred, all tokens)
    # Display and memory limits (the deployment's Settings.map_display_size / max_map_tokens when the
    # page passes them): heatmap sides above max_side are block-averaged; L x L maps are not computed
    # for more than max_map_tokens tokens (None: no limit).
    max_side: int = MAX_SIDE
    max_map_tokens: int | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    _locks: dict = field(
        default_factory=lambda: {name: threading.Lock() for name in _DERIVED}, init=False, repr=False
    )

    def _derived(self, name: str, make: Callable[[], object]):
        """``make()`` once per object, under this object's lock for ``name`` (others never wait)."""
        try:
            return self._cache[name]
        except KeyError:
            pass
        with self._locks[name]:
            if name not in self._cache:
                self._cache[name] = make()
            return self._cache[name]

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1]

    @property
    def kv_head(self) -> int:
        return self.head // self.info.gqa_groups

    @property
    def causal(self) -> bool:
        return self.info.is_decoder

    @property
    def n_components(self) -> int:
        """min(L, d): how many singular values X has."""
        return int(self.spectrum.singular_values.size)

    @property
    def energy_at_rank(self) -> float:
        """Cumulative energy E(r) of the top-r components (1 when r >= min(L, d))."""
        return float(self.spectrum.cumulative_energy[min(self.rank, self.n_components) - 1])

    @property
    def x_principal(self) -> np.ndarray:
        """X' = U_r^T X ``[r, d]``: the r principal tokens."""
        return self._derived("x_principal", lambda: _ro((_t(self.basis).mT @ _t(self.x)).numpy()))  # (r, d)

    @property
    def k_principal(self) -> np.ndarray:
        """K' = U_r^T K ``[r, dh]`` for key/value head ``kv_head``."""
        return self._derived("k_principal", lambda: _ro((_t(self.basis).mT @ _t(self.k)).numpy()))  # (r, dh)

    @property
    def v_principal(self) -> np.ndarray:
        """V' = U_r^T V ``[r, dh]``."""
        return self._derived("v_principal", lambda: _ro((_t(self.basis).mT @ _t(self.v)).numpy()))  # (r, dh)

    @property
    def map_refusal(self) -> str | None:
        """Why the L x L maps are not computed for this text (``Settings.map_refusal``), or None."""
        if self.max_map_tokens is None:
            return None
        return Settings(max_map_tokens=self.max_map_tokens).map_refusal(self.n_tokens)

    @property
    def maps(self) -> HeadMaps:
        """The attention maps (:func:`head_maps`), computed once. Raises ValueError above the map limit."""
        refusal = self.map_refusal
        if refusal:
            raise ValueError(refusal)
        return self._derived("maps", lambda: head_maps(self))

    def facts(self) -> dict[str, str]:
        """Numbers and model-specific sentences the explanations are formatted with."""
        i = self.info
        rope = (
            "This model rotates keys by their position (rotary embedding), so the keys here are taken "
            "after the rotation, as attention sees them."
            if i.has_rope
            else ""
        )
        gqa = (
            f"Each key/value head is shared by {i.gqa_groups} query heads (grouped-query attention): "
            f"query head {self.head} reads key/value head {self.kv_head}, and the principal keys are "
            "computed once per key/value head."
            if i.gqa_groups > 1
            else ""
        )
        causal = (
            "This model is a decoder: a token may only look at itself and earlier tokens. Both forms "
            "keep that rule: the exact form adds the causal mask M, the linear form sums only over "
            "tokens 1 to i (the prefix sums s_i and P_i of the formula, and i instead of L below the "
            "line). The basis U_r is computed from the whole text, though, so every rebuilt key mixes "
            "in later tokens. That is fine for a prompt known in full, not for scoring a text token by "
            "token."
            if self.causal
            else ""
        )
        return {
            "L": f"{self.n_tokens:,}",
            "d": str(self.d),
            "dh": str(self.head_dim),
            "r": str(self.rank),
            "m": str(self.n_components),
            "layer": str(self.layer),
            "head": str(self.head),
            "kv_head": str(self.kv_head),
            "energy": f"{self.energy_at_rank:.1%}",
            "model": i.label,
            "rope_note": rope,
            "gqa_note": gqa,
            "causal_note": causal,
        }


def _ro(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _t(a: np.ndarray) -> torch.Tensor:
    """A tensor copy of a (possibly read-only, shared) array."""
    return torch.from_numpy(np.array(a))


def tour_data(
    cap: Capture,
    layer: int,
    head: int,
    rank: int,
    *,
    max_side: int = MAX_SIDE,
    max_map_tokens: int | None = None,
) -> TourData:
    """Everything the tour draws for ``layer`` / query ``head`` at ``rank`` (clamped to 1..L).

    The basis is :func:`atp.principal_basis` with the exact SVD (its deterministic sign convention);
    the spectrum is the full singular-value list of X (``torch.linalg.svdvals`` in float64).
    ``max_side`` and ``max_map_tokens`` are the deployment's ``Settings.map_display_size`` and
    ``Settings.max_map_tokens`` (the app passes them); by default ``MAX_SIDE`` and no map limit.
    """
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    if max_map_tokens is not None and (
        isinstance(max_map_tokens, bool) or not isinstance(max_map_tokens, int) or max_map_tokens < 1
    ):
        raise ValueError(f"max_map_tokens must be a positive int or None, got {max_map_tokens!r}")
    info = cap.info
    if not 0 <= layer < info.n_layers:
        raise ValueError(f"layer must be in 0..{info.n_layers - 1}, got {layer}")
    if not 0 <= head < info.n_heads:
        raise ValueError(f"head must be in 0..{info.n_heads - 1}, got {head}")
    lc = cap.layers[layer]
    L = lc.x.shape[0]
    r, _ = atp.resolve_rank(int(rank), L)
    kv = head // info.gqa_groups
    basis = atp.principal_basis(_t(lc.x), r, "exact")  # (L, r)
    return TourData(
        info=info,
        tokens=tuple(cap.tokens),
        layer=layer,
        head=head,
        rank=r,
        x=lc.x,
        q=lc.q[head],
        k=lc.k[kv],
        v=lc.v[kv],
        basis=_ro(basis.numpy()),
        spectrum=spectra.spectrum(lc.x),
        max_side=max_side,
        max_map_tokens=max_map_tokens,
    )


def default_rank(n_tokens: int) -> int:
    """The tour's starting rank: L/2, the paper's "about the same accuracy as dense" setting."""
    return max(1, n_tokens // 2)


# --------------------------------------------------------------------------------------------------
# Attention maps of one head (library functions; blockwise for long inputs)
# --------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(torch.linalg.norm(b))
    return float(torch.linalg.norm(a - b)) / den if den > 0 else float("nan")


def _softmax_rows_pooled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, block: int
) -> tuple[Pooled, torch.Tensor]:
    """``softmax(c q k^T + mask) v`` a block of query rows at a time, the map pooled as it goes.

    Same maths as :func:`atp.dense_attention` (tested equal); holds ``MAP_ROW_CHUNK x L`` scores at
    most. Returns the pooled L x L map and the output ``[L, dh]``.
    """
    L, dh = q.shape
    c = dh**-0.5
    step = max(1, MAP_ROW_CHUNK // block) * block  # a multiple of the block, so blocks align
    outs, pooled = [], []
    cols = torch.arange(L)
    for a in range(0, L, step):
        b = min(a + step, L)
        s = c * (q[a:b] @ k.mT)  # (T, L)
        if causal:
            s = s.masked_fill(cols[None, :] > torch.arange(a, b)[:, None], float("-inf"))
        p = s.softmax(dim=-1)  # (T, L)
        outs.append(p @ v)  # (T, dh)
        pooled.append(pool_by(p.numpy(), block, block).values)
    return Pooled(np.concatenate(pooled, axis=0), block, block, "mean"), torch.cat(outs, dim=0)


def head_maps(
    data: TourData, *, max_side: int | None = None, library_limit: int = LIBRARY_MAP_LIMIT
) -> HeadMaps:
    """Dense, exact-form and linear-form maps of ``data.head``, pooled to at most ``max_side`` a side
    (None: ``data.max_side``). Computes them whatever ``data.max_map_tokens`` says: check
    ``data.map_refusal`` first (``data.maps`` does).

    Up to ``library_limit`` tokens every map comes whole from :func:`atp.dense_attention` and
    :func:`atp.atp_attention` (``return_maps``); beyond, the two L x L softmax maps are computed in
    row blocks (:func:`_softmax_rows_pooled`). The linear form's L x r map always comes from the
    library, which never builds an L x L matrix for it.
    """
    n_tok = data.n_tokens
    max_side = data.max_side if max_side is None else max_side
    q = _t(data.q)[None, None]  # (1, 1, L, dh)
    k = _t(data.k)[None, None]  # (1, 1, L, dh)
    v = _t(data.v)[None, None]
    U = _t(data.basis)[None]  # (1, L, r)
    causal = data.causal
    block = max(1, math.ceil(n_tok / max_side))

    lin_out, lin_maps = atp.atp_attention(q, k, v, U, form="linear", causal=causal, return_maps=True)
    principal = pool(lin_maps["principal"][0, 0].numpy(), max_side, max_side)  # (L, r) pooled
    blockwise = n_tok > library_limit
    if not blockwise:
        dense_out, dense_w = atp.dense_attention(q, k, v, causal=causal, return_weights=True)
        exact_out, exact_maps = atp.atp_attention(q, k, v, U, form="exact", causal=causal, return_maps=True)
        dense = pool_by(dense_w[0, 0].numpy(), block, block)
        exact = pool_by(exact_maps["principal"][0, 0].numpy(), block, block)
        dense_out, exact_out = dense_out[0, 0], exact_out[0, 0]
    else:
        q2, k2, v2, U2 = q[0, 0], k[0, 0], v[0, 0], U[0]
        kr = U2 @ (U2.mT @ k2)  # (L, dh)  K_r = U_r U_r^T K
        vr = U2 @ (U2.mT @ v2)  # (L, dh)  V_r = U_r U_r^T V
        dense, dense_out = _softmax_rows_pooled(q2, k2, v2, causal, block)
        exact, exact_out = _softmax_rows_pooled(q2, kr, vr, causal, block)
    return HeadMaps(
        dense=dense,
        exact=exact,
        principal=principal,
        exact_error=_rel(exact_out, dense_out),
        linear_error=_rel(lin_out[0, 0], dense_out),
        blockwise=blockwise,
    )


# --------------------------------------------------------------------------------------------------
# Figure helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Panel:
    pooled: Pooled
    title: str
    x_title: str
    y_title: str
    diverging: bool = True
    coloraxis: str = "coloraxis"
    colorbar_title: str = ""


def _axis_name(i: int) -> str:
    return "xaxis" if i == 1 else f"xaxis{i}"


def _title(main: str, notes: Sequence[str]) -> str:
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
_TITLE_AT_TOP = dict(title_yref="container", title_y=1.0, title_yanchor="top", title_pad_t=14)


def _top_margin(title: str, subplot_titles: bool = False) -> int:
    """Room for a title of several lines (and for subplot titles under it)."""
    return 50 + 18 * title.count("<br>") + (30 if subplot_titles else 0)


def _panels_figure(
    panels: Sequence[_Panel],
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
    text = _title(title, [*notes, clip])
    fig.update_layout(
        template=plots.TEMPLATE,
        title=text,
        **_TITLE_AT_TOP,
        height=height,
        margin=dict(l=60, r=40, t=_top_margin(text, any(p.title for p in panels)), b=50),
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


# --------------------------------------------------------------------------------------------------
# Step figures
# --------------------------------------------------------------------------------------------------


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
        _title(
            f"The {L:,} tokens, in reading order (colour: length of each token's vector at layer "
            f"{data.layer})",
            [note],
        ),
        "",
        "",
        height=min(900, max(260, 30 * nrows + 140)),
    )
    fig.update_layout(margin_t=_top_margin(fig.layout.title.text), **_TITLE_AT_TOP)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False)
    return fig


def x_figure(data: TourData) -> go.Figure:
    """(2) X as a heatmap, L x d, block-averaged for long inputs (the title says so)."""
    p = pool(data.x, data.max_side, MAX_FEATURES)
    panel = _Panel(p, "", "feature", "token", colorbar_title="value")
    return _panels_figure(
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
    for mask, name, color in ((kept, f"kept (i <= r = {data.rank})", _KEPT), (~kept, "dropped", _DROPPED)):
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
            line=dict(color=_ENERGY, width=2),
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
            marker=dict(size=13, color=_ENERGY, line=dict(color="black", width=1)),
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
        _title(
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
        margin_t=_top_margin(fig.layout.title.text),
        margin_b=100,
        **_TITLE_AT_TOP,
    )
    fig.update_yaxes(title_text="singular value σᵢ (log scale)", type="log", secondary_y=False)
    fig.update_yaxes(title_text="cumulative energy E(k)", range=[0, 1.02], tickformat=".0%", secondary_y=True)
    return fig


def principal_tokens_figure(data: TourData) -> go.Figure:
    """(4) X' = U_r^T X (r x d) and the weights U_r (L x r) that mix real tokens into principal ones."""
    xp = pool(data.x_principal, data.max_side, MAX_FEATURES)
    side = data.max_side
    up = pool(data.basis, side, side, how="rms" if max(data.basis.shape) > side else "mean")
    u_title = "U_r: weight of each token (rows) in each principal token (columns)"
    if up.aggregated:
        u_title = "U_r: |weight| of each token block in each principal token"
    panels = [
        _Panel(
            xp, f"X' = U_r^T X ({data.rank} x {data.d})", "feature", "principal token", coloraxis="coloraxis"
        ),
        _Panel(up, u_title, "principal token", "token", coloraxis="coloraxis2", diverging=not up.aggregated),
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
    return _panels_figure(
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
        _Panel(kp, f"keys K{rope}: {data.n_tokens:,} x {data.head_dim}", "key feature", "token"),
        _Panel(
            kpp,
            f"principal keys K': {data.rank} x {data.head_dim}",
            "key feature",
            "principal key",
            coloraxis="coloraxis2",
            diverging=not kpp.aggregated,
        ),
        _Panel(
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
    return _panels_figure(
        panels,
        f"Key/value head {data.kv_head} of layer {data.layer}{shared}",
        notes,
        widths=[0.36, 0.32, 0.32],
        height=520,
    )


def _refusal_figure(title: str, message: str) -> go.Figure:
    """No plot, only ``message`` (a sentence for the user) under ``title``."""
    fig = go.Figure()
    fig.add_annotation(
        text="<br>".join(_wrap(message, 90)), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    text = _title(title, ["attention maps not drawn"])
    fig.update_layout(
        template=plots.TEMPLATE, title=text, **_TITLE_AT_TOP, height=300, margin_t=_top_margin(text)
    )
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return [*lines, cur] if cur else lines


def attention_figure(data: TourData) -> go.Figure:
    """(6) Dense L x L map, the exact form on rank-r keys (L x L) and the linear form's L x r map.

    Above ``data.max_map_tokens`` nothing is computed: the figure holds the reason instead."""
    refusal = data.map_refusal
    if refusal:
        return _refusal_figure(
            f"Layer {data.layer}, query head {data.head}: {data.n_tokens:,} tokens", refusal
        )
    mp = data.maps
    panels = [
        _Panel(
            mp.dense,
            f"dense: softmax over L = {data.n_tokens:,} keys",
            "key token",
            "query token",
            diverging=False,
            colorbar_title="weight",
        ),
        _Panel(
            mp.exact,
            f"exact form, rank-r keys (error {mp.exact_error:.3f})",
            "key token",
            "query token",
            diverging=False,
        ),
        _Panel(
            mp.principal,
            f"linear form: L x r map (error {mp.linear_error:.3f})",
            "principal key",
            "query token",
            coloraxis="coloraxis2",
            colorbar_title="A'",
        ),
    ]
    notes = [
        mp.dense.note("tokens", "tokens") and "L x L maps: " + mp.dense.note("tokens", "tokens"),
        mp.principal.note("tokens", "principal keys")
        and "L x r map: " + mp.principal.note("tokens", "principal keys"),
        "error = |out - out_dense| / |out_dense| for this head",
    ]
    if data.causal:
        notes.append("causal mask applied, yet every rebuilt key K_r mixes in later tokens through U_r")
    return _panels_figure(
        panels,
        f"Layer {data.layer}, query head {data.head}: attention over {data.n_tokens:,} tokens vs "
        f"{data.rank} principal keys",
        notes,
        widths=[0.34, 0.34, 0.32],
        height=500,
    )


def _fmt(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def basis_method(L: int, d: int, r: int) -> str:
    """How ``atp.principal_basis(method="randomized")`` really computes a rank-r basis of an L x d matrix:
    the randomised range finder, or the exact SVD once ``r + oversampling`` reaches ``min(L, d)`` (then
    nothing can be saved). The cost step counts that, not the randomised formula beyond its range."""
    return "randomized" if r + atp.RANDOMIZED_OVERSAMPLE < min(L, d) else "exact"


def cost_figure(data: TourData) -> go.Figure:
    """(7) Multiply-adds and score memory per layer at this L and r, and how both scale with L."""
    i = data.info
    L, r = data.n_tokens, data.rank
    H, Hkv, dh, d = i.n_heads, i.n_kv_heads, i.head_dim, i.d_model
    dense = costs.dense_cost(L, H, dh)
    method = basis_method(L, d, r)
    atp_c = costs.atp_cost(L, r, H, Hkv, dh, d, method=method)
    basis = costs.basis_macs(L, d, r, method)
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("multiply-adds, this layer", "attention scores held (float32)", "multiply-adds vs L"),
        horizontal_spacing=0.1,
    )
    names = ["dense", f"ATP r = {r}"]
    fig.add_trace(
        go.Bar(
            x=names,
            y=[dense.macs, atp_c.macs - basis],
            name="attention",
            marker_color=_KEPT,
            text=[_fmt(dense.macs), _fmt(atp_c.macs - basis)],
            textposition="inside",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=names,
            y=[0.0, basis],
            name="basis (randomised SVD)" if method == "randomized" else "basis (exact SVD)",
            marker_color=_ENERGY,
            text=["", _fmt(basis)],
            textposition="inside",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=names,
            y=[dense.scores * 4, atp_c.scores * 4],
            name="score memory",
            marker_color="#54a24b",
            text=[_fmt(dense.scores * 4, "B"), _fmt(atp_c.scores * 4, "B")],
            textposition="auto",
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    lengths = np.unique(np.geomspace(max(16, r), max(8192, 4 * L), 24).astype(int))
    frac = r / L
    series = {
        "dense": [costs.dense_cost(n, H, dh).macs for n in lengths],
        f"ATP, r fixed at {r}": [
            costs.atp_cost(n, r, H, Hkv, dh, d, method=basis_method(n, d, r)).macs for n in lengths
        ],
        f"ATP, r = {frac:.2g} L": [
            costs.atp_cost(n, rn, H, Hkv, dh, d, method=basis_method(n, d, rn)).macs
            for n, rn in ((n, max(1, round(frac * n))) for n in lengths)
        ],
    }
    for (name, ys), dash in zip(series.items(), ("solid", "dash", "dot"), strict=True):
        fig.add_trace(
            go.Scatter(x=lengths, y=ys, name=name, mode="lines", line=dict(dash=dash)), row=1, col=3
        )
    fig.add_trace(
        go.Scatter(
            x=[L],
            y=[dense.macs],
            mode="markers",
            name=f"this text (L = {L:,})",
            marker=dict(size=10, color="black"),
        ),
        row=1,
        col=3,
    )
    fig.update_xaxes(type="log", title_text="sequence length L", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_yaxes(title_text="multiply-adds", row=1, col=1)
    fig.update_yaxes(title_text="bytes", row=1, col=2)
    ratio = atp_c.macs / dense.macs
    verdict = f"{1 / ratio:.1f}x fewer" if ratio < 1 else f"{ratio:.1f}x more"
    title = _title(
        f"L = {L:,}, r = {r}: ATP's linear form needs {verdict} multiply-adds than dense, "
        f"{dense.scores / atp_c.scores:.1f}x less score memory",
        [
            f"one layer: {H} query heads, {Hkv} key/value heads, d_h = {dh}",
            "counted, not timed; Q/K/V/O projections left out (both need them)",
            "basis by the randomised range finder (2 power iterations)"
            if method == "randomized"
            else f"basis by an exact SVD: r = {r} is too close to min(L, d) = {min(L, d)} to save anything",
        ],
    )
    fig.update_layout(
        template=plots.TEMPLATE,
        barmode="stack",
        height=480,
        margin=dict(l=60, r=20, t=_top_margin(title, True), b=50),
        title=title,
        **_TITLE_AT_TOP,
    )
    return fig


# --------------------------------------------------------------------------------------------------
# The 2-D toy example
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Toy:
    """A handful of tokens with d = 2 features, their principal directions and ATP at rank 1.

    ``directions`` ``[2, 2]``: rows v_1, v_2, the right singular vectors of X (directions in feature
    space, orthonormal); ``singular_values`` ``[2]``; ``basis`` ``[n, 1]`` U_1 from
    :func:`atp.principal_basis`; ``projections`` ``[n, 2]`` the rank-1 reconstruction U_1 U_1^T X;
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
    U1 = atp.principal_basis(X, 1, "exact")  # (n, 1)
    # Align v_i with the basis' sign convention so that x'_1 = U_1^T X = sigma_1 v_1 exactly.
    xp1 = (U1.mT @ X)[0]  # (2,)
    if float(xp1 @ Vh[0]) < 0:
        Vh = Vh.clone()
        Vh[0] = -Vh[0]
    proj = U1 @ (U1.mT @ X)  # (n, 2)
    q = k = v = X[None, None]  # (1, 1, n, 2)

    def lin(u: torch.Tensor) -> np.ndarray:
        return atp.atp_attention(q, k, v, u[None], form="linear")[0, 0].numpy()

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
    pts, proj, arrows = toy.points, toy.projections, toy.arrows
    for col, sign in ((1, 1.0), (2, -1.0)):
        first = col == 1
        for p, pr in zip(pts, proj, strict=True):  # dotted segment: where each token moves at rank 1
            fig.add_trace(
                go.Scatter(
                    x=[p[0], pr[0]],
                    y=[p[1], pr[1]],
                    mode="lines",
                    showlegend=False,
                    line=dict(color="lightgrey", dash="dot"),
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=pts[:, 0],
                y=pts[:, 1],
                mode="markers+text",
                name="tokens x_i",
                text=[f"x{i + 1}" for i in range(len(pts))],
                textposition="top center",
                marker=dict(size=10, color=_KEPT),
                showlegend=first,
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=proj[:, 0],
                y=proj[:, 1],
                mode="markers",
                name="rank-1 projection u₁u₁ᵀX",
                marker=dict(size=10, color="white", line=dict(color=_KEPT, width=2)),
                showlegend=first,
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=toy.linear[:, 0],
                y=toy.linear[:, 1],
                mode="markers",
                name="ATP linear-form output (r = 1)",
                marker=dict(size=9, symbol="star", color="#e45756"),
                showlegend=first,
            ),
            row=1,
            col=col,
        )
        for i, color in ((0, _ENERGY), (1, "#72b7b2")):
            a = arrows[i] * (sign if i == 0 else 1.0)
            xref = "x" if col == 1 else "x2"
            yref = "y" if col == 1 else "y2"
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
    every = np.concatenate([pts, proj, arrows, -arrows, toy.linear, np.zeros((1, 2))])
    lo, hi = every.min(axis=0), every.max(axis=0)
    pad = 0.12 * float((hi - lo).max())
    for col in (1, 2):
        fig.update_xaxes(
            range=[lo[0] - pad, hi[0] + pad], zeroline=True, title_text="feature 1", row=1, col=col
        )
        fig.update_yaxes(
            range=[lo[1] - pad, hi[1] + pad],
            zeroline=True,
            title_text="feature 2",
            row=1,
            col=col,
            scaleanchor="x" if col == 1 else "x2",
            scaleratio=1,
        )
    title = _title(
        f"{len(pts)} tokens with 2 features: σ₁ = {toy.singular_values[0]:.2f}, "
        f"σ₂ = {toy.singular_values[1]:.2f}",
        [
            "arrows: σᵢvᵢ / √n; the principal token x'₁ = u₁ᵀX is σ₁v₁",
            f"a softmax over the principal key would move by {soft_change:.2f} when u₁ flips",
        ],
    )
    fig.update_layout(
        template=plots.TEMPLATE,
        height=520,
        margin=dict(l=60, r=20, t=_top_margin(title, True), b=50),
        legend=dict(orientation="h", y=-0.15),
        title=title,
        **_TITLE_AT_TOP,
    )
    return fig


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    explanation: str  # markdown; {L}, {d}, {r}, ... are filled in from TourData.facts()
    formula: str  # LaTeX for st.latex (the encoder's, or every model's when causal_formula is None)
    build: Callable[[TourData], go.Figure]
    causal_formula: str | None = None  # LaTeX for decoders (causal attention), when it differs
    uses_maps: bool = False  # draws L x L attention maps (refused above TourData.max_map_tokens)

    def explain(self, data: TourData) -> str:
        return self.explanation.format(**data.facts())

    def latex(self, data: TourData) -> str:
        """The formula for ``data``'s model: the causal one for a decoder, where the step has one."""
        return self.causal_formula if data.causal and self.causal_formula else self.formula

    def refusal(self, data: TourData) -> str | None:
        """Why this step draws no figure for ``data`` (maps above the deployment's limit), or None."""
        return data.map_refusal if self.uses_maps else None


# The attention step's formulas. Encoder: sums over all L tokens (atp.atp_attention, causal=False).
# Decoder: what atp.atp_attention computes with causal=True (its _causal_linear_attention path), with
# positions counted from 1: prefix sums over j <= i and the count i of tokens up to i instead of L;
# u_j is row j of U_r (token j's weights, an r-vector), not a basis column. The exact form adds the
# causal mask M.
_EXACT = r"\text{exact: } \operatorname{softmax}\!\big(c\,Q K_r^\top\big) V_r,\ K_r = U_r K',\ V_r = U_r V'"
_ATTENTION_FORMULA = (
    _EXACT + r"\qquad \text{linear: } o_i = \frac{(\mathbf{1}^\top U_r)\,V' + c\,(q_i K'^\top)\,V'}"
    r"{L + c\,(q_i K'^\top)(U_r^\top \mathbf{1})}"
)
_ATTENTION_FORMULA_CAUSAL = (
    r"\begin{gathered}"
    r"\text{exact: } \operatorname{softmax}\!\big(c\,Q K_r^\top + M\big) V_r,\ K_r = U_r K',\ V_r = U_r V',"
    r"\ M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i \end{cases}\ \text{(causal mask)}"
    r"\\[4pt]"
    r"\text{linear: } o_i = \frac{s_i^\top V' + c\,(q_i K'^\top)\,P_i V'}{i + c\,(q_i K'^\top)\,s_i},"
    r"\quad s_i = \sum_{j \le i} u_j,\ P_i = \sum_{j \le i} u_j u_j^\top,"
    r"\quad u_j^\top = \text{row } j \text{ of } U_r,\ i = 1, \dots, L"
    r"\end{gathered}"
)


STEPS: tuple[Step, ...] = (
    Step(
        "tokens",
        "Tokens",
        "The model first cuts the text into **tokens**: words or pieces of words. This text has **{L} "
        "tokens** (call that number L). Inside the model every token is a list of {d} numbers, its "
        "vector. The colour shows how long each token's vector is at layer {layer}; hover a cell to read "
        "its token.",
        r"\text{text} \;\to\; t_1, t_2, \dots, t_L \;\to\; x_1, x_2, \dots, x_L \in \mathbb{R}^{d}",
        tokens_figure,
    ),
    Step(
        "matrix",
        "The matrix X",
        "Stack the {L} token vectors as rows and you get one table of numbers: the matrix **X**, {L} rows "
        "(tokens) by {d} columns (features). This is exactly what attention at layer {layer} receives: "
        "its queries, keys and values are all computed from X. Vertical stripes (features that behave "
        "alike across many tokens) are a first hint that X holds much less information than its size "
        "suggests.",
        r"X = \begin{bmatrix} x_1^\top \\ \vdots \\ x_L^\top \end{bmatrix} \in \mathbb{R}^{L \times d}",
        x_figure,
    ),
    Step(
        "svd",
        "Its SVD and spectrum",
        "The singular value decomposition (SVD) writes X as a sum of simple layers, from the most to the "
        "least important. Each bar is a singular value: how much of X one layer carries. The orange curve "
        "is the **cumulative energy**, the share of X captured by the first k layers. ATP keeps the top "
        "**r = {r}** (marked), which hold **{energy}** of the energy here; X has at most min(L, d) = {m} "
        "of them. A spectrum that falls fast means a few directions describe almost all tokens: the "
        "observation ATP is built on.",
        r"X = U S V^\top = \sum_{i} \sigma_i\, u_i v_i^\top,\qquad "
        r"E(r) = \frac{\sigma_1^2 + \dots + \sigma_r^2}{\sum_i \sigma_i^2}",
        spectrum_figure,
    ),
    Step(
        "toy",
        "Principal directions in 2-D (toy example)",
        "The same idea with only 2 numbers per token, so it can be drawn. Each dot is a token. The SVD "
        "finds the direction along which the tokens spread most (orange arrow, its length set by the "
        "singular value) and the one across it. Keeping rank 1 moves each token onto the first direction "
        "(open circles): ATP does the same with r directions. The direction starts at the origin and "
        "points into the cloud, because ATP decomposes X itself, not X minus its average. On the right "
        "the basis vector is flipped: the SVD cannot tell u from -u, and the ATP output (stars) does not "
        "change, because its linear form never depends on that sign.",
        r"X \approx u_1 \sigma_1 v_1^\top,\qquad x'_1 = u_1^\top X = \sigma_1 v_1^\top,\qquad "
        r"u_1 \to -u_1:\ \text{output unchanged}",
        lambda data: toy_figure(),
    ),
    Step(
        "principal_tokens",
        "Principal tokens",
        "Instead of the {L} real tokens, ATP works with r = {r} **principal tokens**. Each principal token "
        "is a weighted mix of all real tokens (right: one column of weights U_r per principal token), and "
        "together they summarise X (left: X' has {r} rows instead of {L}). They come out ordered: the "
        "first principal tokens carry the most energy, so the rows of X' fade from top to bottom. Mixing "
        "them back with the same weights, U_r X', gives the best possible rank-r copy of X.",
        r"X' = U_r^\top X = S_r V_r^\top \in \mathbb{R}^{r \times d},\qquad X \approx U_r X'",
        principal_tokens_figure,
    ),
    Step(
        "principal_kv",
        "Principal keys and values",
        "Attention compares each query with the **keys** and averages the **values**. ATP mixes keys and "
        "values with the same weights as the tokens: K' = U_r^T K gives {r} principal keys and V' = "
        "U_r^T V gives {r} principal values, each with {dh} numbers (one attention head). Shown: key/value "
        "head {kv_head} of layer {layer}. {rope_note} {gqa_note}",
        r"K' = U_r^\top K,\qquad V' = U_r^\top V \;\in\; \mathbb{R}^{r \times d_h}",
        principal_kv_figure,
    ),
    Step(
        "attention",
        "Attention over r principal keys vs L tokens",
        "Dense attention lets each of the {L} queries look at all {L} keys: an L x L map (left). ATP's "
        "**linear form**, the paper's, lets each query look at only {r} principal keys: an L x r map "
        "(right), so the work grows like L times r instead of L squared. It gets there by replacing the "
        "softmax's exp(s) with 1 + s. The middle map is a reference: the ordinary softmax, on keys rebuilt "
        "from the r principal keys; its error is the cost of dropping components alone. The panel titles "
        "give each form's output error for this head. A pretrained model is not trained for either form: "
        "the paper fine-tunes with ATP in place before measuring accuracy, so large errors here are "
        "expected, above all for the linear form. {causal_note}",
        _ATTENTION_FORMULA,
        attention_figure,
        causal_formula=_ATTENTION_FORMULA_CAUSAL,
        uses_maps=True,
    ),
    Step(
        "cost",
        "What it costs",
        "Counting multiply-adds for one layer: dense attention needs about 2 H L^2 d_h, ATP's linear form "
        "about 2 (H + H_kv) L r d_h plus the cost of finding the basis. The attention scores held in "
        "memory drop from L^2 to L r per head. With r a fixed number, ATP's work grows in proportion to "
        "L and its advantage grows with the length of the text; with r a fixed fraction of L (such as L/2) "
        "both grow like L^2 and the saving is a constant factor at best, or none (right panel).",
        r"\text{dense: } "
        + costs.dense_cost(1, 1, 1).formula
        + r"\qquad \text{ATP: } "
        + costs.atp_cost(1, 1, 1, 1, 1, 1).formula,
        cost_figure,
    ),
)
