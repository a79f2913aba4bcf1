"""Benchmark of one attention layer with SmolLM2-135M's geometry (d = 576, 9 query heads, 3 key/value
heads, dh = 64) on random inputs, non-causal, float32: dense SDPA, dense eager (the L x L map the app
draws), and ATP's linear form with its basis (exact SVD, randomised, or token sketch) computed inside
the timed call. The Q/K/V projections are common to every path and computed once, outside the timed
region (as in the multiply-add count of ATP_NOTES.md). Counted multiply-adds come from the project's
one cost model (:mod:`atp_viz.core.costs`, the forms' own counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from atp_viz import forms
from atp_viz.analysis.bench.timing import (
    MAX_REPEATS,
    MEMORY_METHOD,
    TARGET_CI,
    TIMING_METHOD,
    parse_lengths,
    parse_ranks,
    peak_memory,
    ranks_for,
    ratio,
    summary,
    time_paths,
)
from atp_viz.core import attention as att
from atp_viz.core import basis as _basis
from atp_viz.core import costs
from atp_viz.core.attention import sdpa_has_gqa
from atp_viz.core.progress import ProgressFn

# SmolLM2-135M's attention geometry.
GEOMETRY = {"d": 576, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}
GEOM = costs.Geometry(n_heads=9, n_kv_heads=3, head_dim=64, d_model=576)
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
DEFAULT_RANKS = "64,128,L/8"
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
TINY_LENGTHS = (64, 128)
TINY_RANKS = "8,16"
TINY_REPEATS = 2
EAGER_LIMIT_GB = 8.0  # dense eager is skipped when its L x L x H float32 scores alone would exceed this
PROJECTIONS = (
    "excluded: X W_q, X W_k, X W_v (and the head reshapes) are computed once per L outside the timed "
    "region; they are common to all paths. The ATP paths include the basis of X."
)
LINEAR = forms.get("linear")


def layer_inputs(L: int, *, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random X ``[1, L, d]`` and its q ``[1, H, L, dh]``, k/v ``[1, Hkv, L, dh]``.

    Projection weights have std 1/sqrt(d), like a trained model's. q/k/v are head-transposed views of
    ``[1, L, heads * dh]`` projections, the layout a transformers model hands to its attention function.
    """
    d, H, Hkv, dh = (GEOMETRY[k] for k in ("d", "n_heads", "n_kv_heads", "head_dim"))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, L, d, generator=g)
    w = {
        name: torch.randn(d, n * dh, generator=g) / math.sqrt(d)
        for name, n in (("q", H), ("k", Hkv), ("v", Hkv))
    }
    x = x.to(device)
    with torch.inference_mode():
        q = (x @ w["q"].to(device)).view(1, L, H, dh).transpose(1, 2)  # (1, H, L, dh)
        k = (x @ w["k"].to(device)).view(1, L, Hkv, dh).transpose(1, 2)  # (1, Hkv, L, dh)
        v = (x @ w["v"].to(device)).view(1, L, Hkv, dh).transpose(1, 2)  # (1, Hkv, L, dh)
    return {"x": x, "q": q, "k": k, "v": v}


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused scaled-dot-product attention, non-causal, grouped-query (no L x L tensor on CPU)."""
    return att.fused_attention(q, k, v)


_EAGER_MODULE = torch.nn.Module().eval()


def dense_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The app's dense path (``backend.eager_attention``, transformers' eager attention): it materialises
    the ``H x L x L`` probabilities, the maps the app draws. Returns the output only."""
    from atp_viz.hf.backend import eager_attention

    out, _weights = eager_attention(_EAGER_MODULE, q, k, v, None)
    return out


def atp_layer(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, method: str
) -> torch.Tensor:
    """ATP's serving path: the basis of X (``principal_basis``) and the non-causal linear form."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    basis = _basis.principal_basis(x, rank, method, generator=gen)  # (1, L, r)
    return LINEAR.attend(q, k, v, basis)


def madds(L: int, rank: int | None = None, method: str | None = None) -> dict[str, Any]:
    """Multiply-adds of what each path computes (``rank`` None: dense), from the project's cost model:
    the linear form's own count (what it evaluates, reassociated where cheaper), ATP_NOTES' paper
    order, and the basis the ``method`` really runs (:func:`atp_viz.core.basis.basis_path`)."""
    if rank is None:
        return {"attention": costs.dense_cost(L, GEOM).macs}
    attn = LINEAR.attention_cost(L, rank, GEOM)
    out: dict[str, Any] = {
        "attention": attn.macs,
        "attention_paper_order": attn.detail["paper_order"],
        "basis": costs.basis_macs(L, GEOM.d_model, rank, method or "exact"),
        "basis_computed_by": _basis.basis_path(L, GEOM.d_model, rank, method or "exact"),
    }
    if out["basis_computed_by"] == "exact":
        out["basis_note"] = "exact SVD counted as L d min(L, d), the order of LAPACK's thin SVD"
    return out


def _ceiling(L: int, rank: int, method: str) -> float:
    """Dense multiply-adds / ATP's (attention + basis): the speed-up at equal speed per multiply-add."""
    a = madds(L, rank, method)
    return madds(L)["attention"] / (a["attention"] + a["basis"])


def _how(L: int, r: int, method: str) -> str:
    path = _basis.basis_path(L, GEOM.d_model, r, method)
    if path == "randomized":
        return "randomized range finder (niter=2)"
    if path == "sketch":
        return f"token sketch ({_basis.sketch_rows(r)} sampled tokens)"
    if method == "randomized":
        return "exact SVD (the randomized method falls back: rank + oversampling >= min(L, d))"
    if method == "sketch":
        return "exact SVD (the sketch falls back: the sample would be the whole input)"
    return "exact SVD"


def run_layer_bench(
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    ranks: str | Sequence[str] = DEFAULT_RANKS,
    *,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    methods: Sequence[str] = _basis.METHODS,
    eager_limit_gb: float = EAGER_LIMIT_GB,
    device: str = "cpu",
    measure_memory: bool = True,
    max_repeats: int | None = MAX_REPEATS,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Time and measure one attention layer at each L: dense SDPA, dense eager and ATP (linear form).

    For each rank and basis method the ATP path is timed as a whole (basis + attention, the figure the
    ratios use) and in its two parts (basis alone; attention alone on a precomputed basis). Rows whose
    figures contradict each other beyond their intervals are flagged (:func:`inconsistencies`), not hidden.
    """
    spec = parse_ranks(ranks)
    rows = []
    lengths = parse_lengths(lengths)
    for i, L in enumerate(lengths):
        if progress:
            progress(i / len(lengths), f"layer bench: L = {L}")
        row = _layer_row(
            L, spec, repeats, warmup, methods, eager_limit_gb, device, measure_memory, max_repeats
        )
        row["flags"] = inconsistencies(row)
        rows.append(row)
    return {
        "geometry": dict(GEOMETRY),
        "causal": False,
        "dtype": "float32",
        "device": device,
        "repeats": repeats,
        "max_repeats": max_repeats,
        **({} if max_repeats else {"max_repeats_skipped": "no repeats beyond `repeats` (asked for)"}),
        "target_ci": TARGET_CI,
        "warmup": warmup,
        "rank_spec": list(spec),
        "projections": PROJECTIONS,
        "timing_method": TIMING_METHOD,
        "memory_method": MEMORY_METHOD if measure_memory else "not measured",
        "lengths": rows,
        "crossover": crossover(rows, spec, methods),
    }


def _paths(L, spec, methods, eager_limit_gb, device):
    """The timed callables of one L, the (rank, spec tokens, method) combinations, and why dense eager
    is skipped (or None)."""
    t = layer_inputs(L, device=device)
    x, q, k, v = t["x"], t["q"], t["k"], t["v"]
    paths: dict[str, Callable[[], Any]] = {"dense_sdpa": lambda: dense_sdpa(q, k, v)}
    eager_bytes = GEOMETRY["n_heads"] * L * L * 4
    eager_skip = None
    if eager_bytes > eager_limit_gb * 1e9:
        eager_skip = (
            f"skipped: would need {eager_bytes / 1e9:.3g} GB for the H x L x L float32 probabilities "
            f"alone (limit {eager_limit_gb:g} GB)"
        )
    else:
        paths["dense_eager"] = lambda: dense_eager(q, k, v)

    def basis_fn(r: int, method: str) -> Callable[[], torch.Tensor]:
        gen = torch.Generator(device=x.device)
        return lambda: _basis.principal_basis(x, r, method, generator=gen.manual_seed(0))

    combos = []
    for r, toks in ranks_for(spec, L):
        with torch.inference_mode():
            fixed = _basis.principal_basis(x, r, "exact")  # for the attention-only timing
        paths[f"attn/{r}"] = lambda u=fixed: LINEAR.attend(q, k, v, u)
        for method in methods:
            combos.append((r, toks, method))
            paths[f"atp/{r}/{method}"] = lambda r=r, m=method: atp_layer(x, q, k, v, r, m)
            paths[f"basis/{r}/{method}"] = basis_fn(r, method)
    return paths, combos, eager_skip, eager_bytes


def _dense_entries(L, times, mem, eager_skip, eager_bytes, no_mem):
    sdpa = {**summary(times["dense_sdpa"]), "peak_bytes": mem.get("dense_sdpa"), "madds": madds(L)}
    if sdpa["peak_bytes"] is None:
        sdpa["peak_bytes_skipped"] = no_mem
    sdpa["implementation"] = (
        "F.scaled_dot_product_attention(enable_gqa=True)"
        if sdpa_has_gqa()
        else "F.scaled_dot_product_attention on repeat_interleave'd K/V"
    )
    if eager_skip:
        eager: dict[str, Any] = {"skipped": eager_skip, "median_s": None, "min_s": None, "peak_bytes": None}
    else:
        eager = {**summary(times["dense_eager"]), "peak_bytes": mem.get("dense_eager"), "madds": madds(L)}
        eager["implementation"] = (
            "atp_viz.hf.backend.eager_attention (softmax(c Q K^T) V, the L x L map kept)"
        )
        if eager["peak_bytes"] is None:
            eager["peak_bytes_skipped"] = no_mem
    eager["probabilities_bytes"] = eager_bytes
    return sdpa, eager


def _atp_entry(L, r, toks, method, times, mem, sdpa, eager, eager_skip, no_mem) -> dict[str, Any]:
    total = summary(times[f"atp/{r}/{method}"])
    peak = mem.get(f"atp/{r}/{method}")
    row: dict[str, Any] = {
        "rank": r,
        "rank_spec": toks,
        "basis_method": method,
        "basis_computed_by": _how(L, r, method),
        "total": total,
        "basis": summary(times[f"basis/{r}/{method}"]),
        "attention": summary(times[f"attn/{r}"]),
        "peak_bytes": peak,
        "madds": madds(L, r, method),
        "speedup_vs_dense_sdpa": ratio(sdpa["median_s"], total["median_s"]),
        "counted_speedup_ceiling": _ceiling(L, r, method),
        "speedup_vs_dense_eager": ratio(eager["median_s"], total["median_s"]),
        "memory_vs_dense_sdpa": ratio(peak, sdpa["peak_bytes"]),
        "memory_vs_dense_eager": ratio(peak, eager["peak_bytes"]),
    }
    if r > GEOMETRY["d"]:
        row["note"] = (
            f"r > d = {GEOMETRY['d']}: columns beyond rank(X) are a deterministic completion "
            "(they add nothing: K and V lie in the span of X)"
        )
    if eager_skip:
        row["speedup_vs_dense_eager_skipped"] = eager_skip
    for key, base in (("memory_vs_dense_sdpa", sdpa), ("memory_vs_dense_eager", eager)):
        if row[key] is None:
            row[f"{key}_skipped"] = eager_skip if "skipped" in base else no_mem
    if peak is None:
        row["peak_bytes_skipped"] = no_mem
    return row


def _layer_row(L, spec, repeats, warmup, methods, eager_limit_gb, device, measure_memory, max_repeats):
    paths, combos, eager_skip, eager_bytes = _paths(L, spec, methods, eager_limit_gb, device)
    times = time_paths(paths, repeats, warmup, device, max_repeats=max_repeats)
    mem: dict[str, int | None] = {}
    if measure_memory:
        for name in ("dense_sdpa", "dense_eager", *(f"atp/{r}/{m}" for r, _, m in combos)):
            if name in paths:
                mem[name] = peak_memory(paths[name], device)
    no_mem = "not measured" if not measure_memory else "the profiler gave no memory events"
    sdpa, eager = _dense_entries(L, times, mem, eager_skip, eager_bytes, no_mem)
    atp_rows = [
        _atp_entry(L, r, toks, method, times, mem, sdpa, eager, eager_skip, no_mem)
        for r, toks, method in combos
    ]
    return {"L": L, "dense_sdpa": sdpa, "dense_eager": eager, "atp": atp_rows}


def _ci(t: dict) -> tuple[float, float]:
    """A timing's median interval, or (median, median) when there were too few repeats for one."""
    ci = t.get("median_ci_s")
    return (ci[0], ci[1]) if ci else (t["median_s"], t["median_s"])


def inconsistencies(row: dict[str, Any]) -> list[str]:
    """What in one length's figures cannot be right, beyond the intervals: a part (basis alone, attention
    alone) slower than the whole, or a larger rank cheaper than a smaller one with the same basis method.
    Such rows are flagged in the JSON and the printed table, so they are rerun, not published."""
    flags = []
    for a in row["atp"]:
        total_hi = _ci(a["total"])[1]
        for part in ("basis", "attention"):
            if _ci(a[part])[0] > total_hi:
                flags.append(f"r={a['rank']} {a['basis_method']}: {part} alone slower than basis + attention")
    by_method: dict[str, list[dict]] = {}
    for a in row["atp"]:
        by_method.setdefault(a["basis_method"], []).append(a)
    for method, entries in by_method.items():
        entries = sorted(entries, key=lambda a: a["rank"])
        for small, large in zip(entries, entries[1:], strict=False):
            if _ci(large["total"])[1] < _ci(small["total"])[0]:
                flags.append(
                    f"{method}: r={large['rank']} faster than r={small['rank']} beyond their intervals"
                )
    return flags


def crossover(rows: list[dict], spec: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per rank spec and basis method: the smallest measured L from which ATP (basis included) is faster
    than dense SDPA at every measured L up to the largest (None if it never is)."""
    out = []
    for tok in spec:
        for method in methods:
            faster = []
            for row in rows:
                for a in row["atp"]:
                    if tok in a["rank_spec"] and a["basis_method"] == method:
                        faster.append((row["L"], a["total"]["median_s"] < row["dense_sdpa"]["median_s"]))
            cross = None
            for L, ok in reversed(faster):
                if not ok:
                    break
                cross = L
            out.append(
                {
                    "rank_spec": tok,
                    "basis_method": method,
                    "crossover_L": cross,
                    "faster_than_sdpa_at": [L for L, ok in faster if ok],
                }
            )
    return out
