"""The cost model: multiply-adds and floats held by one attention layer, dense and ATP.

One count for the whole project (the Cost page, the tour, the benchmark's ceilings, ``bench
--prefill``). Each attention form counts its own attention (``AttentionForm.cost`` in
:mod:`atp_viz.forms`); this module holds what they share: the layer geometry, the dense count, the
basis count (following :func:`atp_viz.core.basis.basis_path`, so a method that falls back to the exact
SVD is counted as the exact SVD) and the low-rank linear layers of the paper's claim 3.

Counts follow ATP_NOTES.md ("Costs to show"); the Q/K/V/O projections are common to every path and
left out unless a caller adds :func:`projection_macs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atp_viz.core import basis as _basis

BYTES_PER_FLOAT = 4  # float32


@dataclass(frozen=True)
class Geometry:
    """One attention layer: query heads, key/value heads, head size, model width."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer: multiply-adds (attention + basis) and attention scores held at once (floats,
    all heads). ``formula`` is LaTeX for display; ``detail`` holds named parts (e.g. the paper's order)."""

    macs: float
    scores: float
    formula: str
    basis_macs: float = 0.0
    detail: dict = field(default_factory=dict)

    @property
    def attention_macs(self) -> float:
        return self.macs - self.basis_macs


def dense_cost(L: int, geom: Geometry) -> LayerCost:
    """Q K^T and A V: ``L^2 dh`` multiply-adds each per query head; ``L^2`` scores per head."""
    H, dh = geom.n_heads, geom.head_dim
    return LayerCost(macs=2.0 * H * L * L * dh, scores=float(H) * L * L, formula=r"2\,H\,L^2 d_h")


def basis_macs(L: int, d: int, r: int, method: str, niter: int = 2) -> float:
    """Multiply-adds of the rank-r basis of an ``L x d`` input, for the computation that really runs.

    - exact SVD: ``L d min(L, d)``, the order of LAPACK's thin SVD (an estimate, not an exact count);
    - randomised range finder (``niter`` power iterations, p test vectors): ``2 (niter + 1)`` products of
      X with thin matrices (``L d p`` each), ``2 niter + 3`` thin ``L p p`` GEMMs (Gram matrices and
      re-normalisations) and ``Q U_b`` (``L p r``); the small ``p x p`` / ``d x p`` factorisations are
      left out;
    - token sketch (s sampled tokens): ``x V_r`` (one pass, ``L d r``), CholeskyQR2 and the rotation
      (``6 L r^2``), plus the randomised finder on the ``s x d`` sample.
    """
    path = _basis.basis_path(L, d, r, method)
    r = min(r, L, d)
    if path == "randomized":
        p = _basis.randomized_width(L, d, r)
        return float(2 * (niter + 1) * L * d * p + (2 * niter + 3) * L * p * p + L * p * r)
    if path == "sketch":
        s = _basis.sketch_rows(r)
        p = _basis.randomized_width(d, s, r)
        return float(L * d * r + 6 * L * r * r + 6 * s * d * p + 7 * d * p * p + d * p * r)
    return float(L) * d * min(L, d)


def moment_sums_macs(C: int, d_s: int, kv_width: int) -> float:
    """C tokens added to a past kept as running sums (:mod:`atp_viz.analysis.moments`):
    ``C d_s (d_s + 2 kv_width + 1)`` (S^T S, S^T K, S^T V and S^T 1 for the basis source S)."""
    return float(C) * d_s * (d_s + 2 * kv_width + 1)


def moment_basis_macs(C: int, d_s: int, r: int, kv_width: int) -> float:
    """A chunk of C tokens added to running sums, then the basis read from them: the sums
    (:func:`moment_sums_macs`), about ``4 d_s^3`` for the d_s x d_s eigendecomposition (LAPACK's
    order, an estimate) and ``2 r d_s kv_width`` for K' and V'."""
    return moment_sums_macs(C, d_s, kv_width) + 4.0 * d_s**3 + 2.0 * r * d_s * kv_width


def basis_formula(L: int, d: int, r: int, method: str) -> str:
    """LaTeX of the basis count used, e.g. ``(2q+2)\\,L\\,d\\,p`` for the randomised finder."""
    path = _basis.basis_path(L, d, r, method)
    return {
        "randomized": r"6\,L\,d\,p + 7\,L\,p^2 + L\,p\,r",
        "sketch": r"L\,d\,r + 6\,L\,r^2 + \text{sample}",
        "exact": r"L\,d\,\min(L, d)",
    }[path]


def linear_layer_macs(L: int, r: int, d: int, d_out: int) -> tuple[float, float]:
    """(dense X W, low-rank U_r (X' W)) multiply-adds for one linear layer d -> d_out (claim 3)."""
    r = min(r, L)
    return float(L) * d * d_out, float(r) * d * d_out + float(L) * r * d_out


def projection_macs(L: int, geom: Geometry) -> float:
    """Q, K, V and output projections of one layer: ``L d (H + 2 Hkv) dh + L H dh d``."""
    H, Hkv, dh, d = geom.n_heads, geom.n_kv_heads, geom.head_dim, geom.d_model
    return float(L) * d * (H + 2 * Hkv) * dh + float(L) * H * dh * d
