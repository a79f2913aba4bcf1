"""Analytical cost of one attention layer, dense vs ATP, in multiply-adds and floats held.

Counts follow ATP_NOTES.md ("Costs to show"); Q/K/V/O projections are common to both and left out
unless ``lowrank_linear`` asks for the cost of the projections with low-rank inputs (claim 3).

Per layer (H query heads, Hkv key/value heads, head size dh, model width d, rank r, L tokens):

- dense: Q K^T and A V, L^2 dh multiply-adds each per query head; L^2 scores held per head.
- ATP linear form: basis (exact SVD ~ L d min(L, d); randomised range finder ~ (2 q + 2) L d (r + p)
  for q power iterations and p oversampling), U_r^T K and U_r^T V (L r dh each per kv head),
  Q K'^T and (Q K'^T) V' (L r dh each per query head); L r scores held per head.
- low-rank linear layers: X' W (r d d_out) + U_r (X' W) (L r d_out) instead of L d d_out.
"""

from __future__ import annotations

from dataclasses import dataclass

OVERSAMPLE = 10


@dataclass(frozen=True)
class LayerCost:
    macs: float  # multiply-adds
    scores: float  # attention scores held at once (floats), all heads
    formula: str  # LaTeX


def dense_cost(L: int, H: int, dh: int) -> LayerCost:
    return LayerCost(
        macs=2.0 * H * L * L * dh,
        scores=float(H) * L * L,
        formula=r"2\,H\,L^2 d_h",
    )


def basis_macs(L: int, d: int, r: int, method: str = "randomized", niter: int = 2) -> float:
    if method == "exact":
        return float(L) * d * min(L, d)
    return (2.0 * niter + 2.0) * L * d * (r + OVERSAMPLE)


def atp_cost(
    L: int, r: int, H: int, Hkv: int, dh: int, d: int, *, method: str = "randomized", niter: int = 2
) -> LayerCost:
    """The linear form (the paper's), basis included."""
    r = min(r, L)
    attn = 2.0 * Hkv * L * r * dh + 2.0 * H * L * r * dh
    return LayerCost(
        macs=attn + basis_macs(L, d, r, method, niter),
        scores=float(H) * L * r,
        formula=r"2\,H_{kv} L r d_h + 2\,H L r d_h + \text{basis}",
    )


def linear_layer_macs(L: int, r: int, d: int, d_out: int) -> tuple[float, float]:
    """(dense X W, low-rank U_r (X' W)) multiply-adds for one linear layer d -> d_out."""
    r = min(r, L)
    return float(L) * d * d_out, float(r) * d * d_out + float(L) * r * d_out


def speedup_ceiling(L: int, r: int, H: int, Hkv: int, dh: int, d: int, **kw) -> float:
    """Dense over ATP multiply-adds: the best speed-up a perfect implementation could show."""
    return dense_cost(L, H, dh).macs / atp_cost(L, r, H, Hkv, dh, d, **kw).macs


def measured_series(bench: dict, *, basis_method: str = "randomized") -> tuple[list[int], dict[str, list]]:
    """Median seconds per path vs L from a ``python -m atp_viz bench`` JSON (schema atp_viz.bench/1).

    Returns (lengths, {path name: [median seconds or None per length]}); a path skipped at some L
    (dense eager past its memory limit) has None there.
    """
    entries = bench["layer"]["lengths"]
    lengths = [e["L"] for e in entries]
    series: dict[str, list] = {"dense SDPA": [], "dense eager": []}
    for e in entries:
        for key, name in (("dense_sdpa", "dense SDPA"), ("dense_eager", "dense eager")):
            path = e.get(key) or {}
            series[name].append(path.get("median_s"))
    specs = []
    for e in entries:
        for a in e["atp"]:
            if a["basis_method"] == basis_method:
                for spec in a["rank_spec"]:
                    if spec not in specs:
                        specs.append(spec)
    for spec in specs:
        name = f"ATP linear, r = {spec}, {basis_method} basis"
        series[name] = [
            next(
                (
                    a["total"]["median_s"]
                    for a in e["atp"]
                    if a["basis_method"] == basis_method and spec in a["rank_spec"]
                ),
                None,
            )
            for e in entries
        ]
    return lengths, series
