"""The data of the guided tour "How ATP works": one layer, head and rank of a captured text.

Every step of the tour (:mod:`.steps`) draws from a :class:`TourData`: one layer, one query head and
a rank r of one captured text, with what is derived from it computed once on first use.

Shapes (one sequence, L tokens, d model width, dh head size, r rank), stated once:

- ``x`` ``[L, d]`` the layer's attention input X; ``q`` ``[L, dh]`` the chosen query head;
  ``k``, ``v`` ``[L, dh]`` its key/value head (after rotary embedding where the model has one);
- ``basis`` ``[L, r]`` U_r, orthonormal columns (:func:`atp_viz.core.basis.principal_basis`, exact SVD);
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

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from atp_viz import forms
from atp_viz.analysis import spectra
from atp_viz.analysis.capture import Capture
from atp_viz.core import attention as att
from atp_viz.core.basis import principal_basis
from atp_viz.core.ranks import resolve_rank
from atp_viz.deploy.settings import Settings
from atp_viz.hf.model_info import ModelInfo

MAX_SIDE = 256  # token rows/columns (or principal tokens) a heatmap draws before averaging blocks
MAX_FEATURES = 768  # feature columns drawn before averaging blocks (d of the bundled models fits)
LIBRARY_MAP_LIMIT = 2048  # up to this L the maps are computed whole; beyond, in blocks of query rows
MAP_ROW_CHUNK = 1024  # query rows per block on the blockwise path (chunk x L floats at a time)


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
class FormMap:
    """One attention form's map of the head, pooled for display, and its output error.

    ``kind`` is the form's ``map_kind``: "principal" (an L x r map over principal keys) or "tokens"
    (an L x L map over the reconstructed tokens). ``error`` is ||out - out_dense||_F / ||out_dense||_F.
    """

    pooled: Pooled
    kind: str
    error: float


@dataclass(frozen=True, eq=False)
class HeadMaps:
    """Attention maps of one query head: dense (L x L) and every registered form's, pooled for display.

    ``blockwise``: computed in blocks of query rows (L > LIBRARY_MAP_LIMIT), never holding L x L.
    """

    dense: Pooled
    forms: dict[str, FormMap]
    blockwise: bool


_DERIVED = ("x_principal", "k_principal", "v_principal", "maps", "denominators")
POSITIVITY_FORMS = ("linear", "taylor2")  # the paper's 1 + s, and the positive second-order form


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
    def denominators(self) -> dict[str, np.ndarray]:
        """Each query's normaliser ``[L]`` under the forms of :data:`POSITIVITY_FORMS` (untrained
        parameters), this head, rank r: ``AttentionForm.denominators``. O(L^2) like the maps."""

        def make() -> dict[str, np.ndarray]:
            q, k = _t(self.q)[None, None].double(), _t(self.k)[None, None].double()
            u = _t(self.basis)[None].double()
            return {
                name: _ro(forms.get(name).denominators(q, k, u, causal=self.causal)[0, 0].numpy())
                for name in POSITIVITY_FORMS
            }

        return self._derived("denominators", make)

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
            "keys": "1 principal key" if self.rank == 1 else f"{self.rank} principal keys",
            "values": "1 principal value" if self.rank == 1 else f"{self.rank} principal values",
            "rows": "1 row" if self.rank == 1 else f"{self.rank} rows",
            "instead": f" instead of {self.n_tokens:,}" if self.rank < self.n_tokens else ", as many as X",
            "m": str(self.n_components),
            "layer": str(self.layer),
            "head": str(self.head),
            "kv_head": str(self.kv_head),
            "energy": f"{self.energy_at_rank:.1%}",
            "model": i.label,
            "rope_note": rope,
            "gqa_note": gqa,
            "causal_note": causal,
            "forms_note": "; ".join(f"**{n}**, {forms.get(n).description}" for n in forms.names()),
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
    r, _ = resolve_rank(int(rank), L)
    kv = head // info.gqa_groups
    basis = principal_basis(_t(lc.x), r, "exact")  # (L, r)
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


def _blocks(n_tok: int, block: int) -> list[tuple[int, int]]:
    """Query-row ranges of at most MAP_ROW_CHUNK rows, each a multiple of ``block`` so pooled blocks align."""
    step = max(1, MAP_ROW_CHUNK // block) * block
    return [(a, min(a + step, n_tok)) for a in range(0, n_tok, step)]


def _dense_map(q, k, v, causal: bool, block: int, ranges) -> tuple[Pooled, torch.Tensor]:
    """Dense softmax attention of one head (``core.attention.dense_attention``), a block of query rows at
    a time: the pooled L x L map and the output ``[L, dh]``."""
    L = q.shape[-2]
    pooled, outs = [], []
    for a, b in ranges:
        allowed = torch.arange(L)[None, :] <= torch.arange(a, b)[:, None] if causal else None  # (T, L)
        out, w = att.dense_attention(q[..., a:b, :], k, v, mask=allowed, return_weights=True)
        pooled.append(pool_by(w[0, 0].numpy(), block, block).values)
        outs.append(out[0, 0])
    return Pooled(np.concatenate(pooled, axis=0), block, block, "mean"), torch.cat(outs, dim=0)


def _form_map(
    form, q, k, v, U, causal: bool, block: int, max_side: int, ranges
) -> tuple[Pooled, torch.Tensor]:
    """A form's map (over principal keys, or over reconstructed tokens in row blocks) and its output."""
    if form.map_kind == "principal" or ranges is None:
        out, maps = form.attend(q, k, v, U, causal=causal, return_maps=True)
        m = maps["principal" if form.map_kind == "principal" else "tokens"][0, 0].numpy()
        pooled = pool(m, max_side, max_side) if form.map_kind == "principal" else pool_by(m, block, block)
        return pooled, out[0, 0]
    vr = U.unsqueeze(1) @ (U.mT.unsqueeze(1) @ v)  # (1, 1, L, dh): V_r = U_r U_r^T V
    pooled, outs = [], []
    for a, b in ranges:
        w = form.token_weights(q, k, v, U, causal=causal, rows=(a, b))  # (1, 1, T, L)
        pooled.append(pool_by(w[0, 0].numpy(), block, block).values)
        outs.append((w @ vr)[0, 0])
    return Pooled(np.concatenate(pooled, axis=0), block, block, "mean"), torch.cat(outs, dim=0)


def head_maps(
    data: TourData, *, max_side: int | None = None, library_limit: int = LIBRARY_MAP_LIMIT
) -> HeadMaps:
    """Dense and every registered form's maps of ``data.head``, pooled to at most ``max_side`` a side
    (None: ``data.max_side``). Computes them whatever ``data.max_map_tokens`` says: check
    ``data.map_refusal`` first (``data.maps`` does).

    Up to ``library_limit`` tokens every map is computed whole; beyond, the L x L maps (dense, and the
    forms whose maps are over tokens) are computed a block of query rows at a time and pooled as they
    go. Maps over principal keys are L x r and always computed whole.
    """
    n_tok = data.n_tokens
    max_side = data.max_side if max_side is None else max_side
    q = _t(data.q)[None, None]  # (1, 1, L, dh)
    k = _t(data.k)[None, None]  # (1, 1, L, dh)
    v = _t(data.v)[None, None]
    U = _t(data.basis)[None]  # (1, L, r)
    block = max(1, math.ceil(n_tok / max_side))
    blockwise = n_tok > library_limit
    ranges = _blocks(n_tok, block) if blockwise else [(0, n_tok)]
    dense, dense_out = _dense_map(q, k, v, data.causal, block, ranges)
    per_form = {}
    for name in forms.names():
        form = forms.get(name)
        pooled, out = _form_map(form, q, k, v, U, data.causal, block, max_side, ranges if blockwise else None)
        per_form[name] = FormMap(pooled=pooled, kind=form.map_kind, error=_rel(out, dense_out))
    return HeadMaps(dense=dense, forms=per_form, blockwise=blockwise)
