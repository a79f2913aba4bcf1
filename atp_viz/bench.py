"""Benchmark of ATP serving speed and memory (issue "Fast serving with ATP"): ``python -m atp_viz bench``.

Two parts, both printed as a table and written as JSON with every measured repeat:

1. One attention layer with SmolLM2-135M's geometry (d = 576, 9 query heads, 3 key/value heads,
   dh = 64) on random inputs, non-causal, float32: dense SDPA, dense eager (the L x L map the app
   draws), and ATP's linear form with its basis (exact SVD or randomised) computed inside the timed
   call. The Q/K/V projections are common to every path and are computed once, outside the timed
   region (as in the multiply-add count of ATP_NOTES.md).
2. A whole-model prefill of SmolLM2 at L = 2048 (``atp_viz.compare.forward``), dense vs ATP (both
   forms, both basis methods).

Timings: ``time.perf_counter`` around one call (after ``torch.cuda.synchronize`` on CUDA), ``warmup``
untimed calls per path, then ``repeats`` rounds in which every path of one L runs once, so that the
paths being compared share the machine's load; median and min are reported and ratios are taken
between medians of the same run. Peak memory: see :data:`MEMORY_METHOD`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from atp_viz import atp

# SmolLM2-135M's attention geometry.
GEOMETRY = {"d": 576, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
DEFAULT_RANKS = "64,128,L/8"
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
TINY_LENGTHS = (64, 128)
TINY_RANKS = "8,16"
TINY_REPEATS = 2
EAGER_LIMIT_GB = 8.0  # dense eager is skipped when its L x L x H float32 scores alone would exceed this
BASIS_METHODS = ("exact", "randomized", "sketch")
MODEL_KEY, MODEL_LENGTH, MODEL_RANK, MODEL_REPEATS = "smollm2", 2048, 128, 3
TINY_MODEL_KEY, TINY_MODEL_LENGTH, TINY_MODEL_RANK, TINY_MODEL_REPEATS = "tiny-llama", 64, 8, 1
# Standard-library modules whose docstrings make the model's input text (plain English prose, no download).
DOC_MODULES = (
    "collections",
    "functools",
    "itertools",
    "json",
    "re",
    "os",
    "pathlib",
    "typing",
    "argparse",
    "dataclasses",
    "inspect",
    "logging",
    "threading",
    "subprocess",
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "contextlib",
    "decimal",
    "fractions",
    "statistics",
    "datetime",
    "enum",
    "abc",
)

TIMING_METHOD = (
    "time.perf_counter around one call (torch.cuda.synchronize before and after on CUDA), "
    "torch.inference_mode, float32; `warmup` untimed calls per path, then `repeats` interleaved rounds "
    "(each path of one L once per round); median and min of the repeats; ratios = ratio of medians "
    "from the same run."
)
MEMORY_METHOD = (
    "CPU: torch.profiler.profile(profile_memory=True) around one extra, untimed call; peak of the "
    "running sum of the allocator's [memory] events (bytes allocated by the path beyond what was live "
    "before it: inputs excluded, the output and every intermediate included). Buffers that do not come "
    "from PyTorch's allocator (MKL's GEMM packing, per-thread LAPACK scratch) are not seen. "
    "CUDA: torch.cuda.max_memory_allocated minus the allocation before the call."
)
PROJECTIONS = (
    "excluded: X W_q, X W_k, X W_v (and the head reshapes) are computed once per L outside the timed "
    "region; they are common to all paths. The ATP paths include the basis of X."
)

ProgressFn = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def parse_lengths(text: str | Sequence[int]) -> tuple[int, ...]:
    """'512,1024' -> (512, 1024); every length a positive int."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            n = int(str(item).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"lengths must be ints separated by commas, got {text!r}"
            ) from None
        if n < 2:
            raise argparse.ArgumentTypeError(f"every length must be at least 2 tokens, got {n}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("give at least one length")
    return tuple(sorted(set(out)))


def parse_ranks(text: str | Sequence[str | int]) -> tuple[str, ...]:
    """'64,128,L/8' -> ('64', '128', 'L/8'): absolute ranks or 'L/k' (a share of each length)."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    out = []
    for item in items:
        tok = item.strip().replace(" ", "")
        if not tok:
            continue
        if tok.upper().startswith("L/"):
            try:
                den = int(tok[2:])
            except ValueError:
                den = 0
            if den < 1:
                raise argparse.ArgumentTypeError(f"a rank 'L/k' needs a positive int k, got {item!r}")
            out.append(f"L/{den}")
            continue
        try:
            r = int(tok)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"ranks must be ints or 'L/k' separated by commas, got {item!r}"
            ) from None
        if r < 1:
            raise argparse.ArgumentTypeError(f"a rank must be at least 1, got {r}")
        out.append(str(r))
    if not out:
        raise argparse.ArgumentTypeError("give at least one rank")
    return tuple(dict.fromkeys(out))


def ranks_for(spec: Sequence[str], L: int) -> list[tuple[int, list[str]]]:
    """The distinct ranks of ``spec`` at length L, clamped to [1, L]: ``[(r, [spec tokens giving r])]``."""
    by_rank: dict[int, list[str]] = {}
    for tok in spec:
        r = max(1, L // int(tok[2:])) if tok.startswith("L/") else int(tok)
        by_rank.setdefault(min(r, L), []).append(tok)
    return sorted(by_rank.items())


# --------------------------------------------------------------------------------------------------
# Machine, timing, memory
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": device,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "sdpa_enable_gqa": _sdpa_has_gqa(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _summary(times: list[float]) -> dict[str, Any]:
    return {"repeats_s": list(times), "median_s": statistics.median(times), "min_s": min(times)}


def _time_paths(
    paths: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Warm every path up, then run ``repeats`` rounds with each path once per round (interleaved)."""
    with torch.inference_mode():
        for fn in paths.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                del out
    return times


@contextlib.contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (only around the profiler's start and stop)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was live before it (see MEMORY_METHOD)."""
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del out
            return int(peak)
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _fd2_silenced():  # the profiler's C++ side prints a start line on fd 2
            prof.__enter__()
        try:
            out = fn()
            del out
        finally:
            with _fd2_silenced():
                prof.__exit__(None, None, None)
    try:
        events = prof.profiler.kineto_results.events()
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except (AttributeError, RuntimeError):
        return None
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


# --------------------------------------------------------------------------------------------------
# The attention layer
# --------------------------------------------------------------------------------------------------


_GQA: list[bool] = []


def _sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5); probed once on a tiny input."""
    if not _GQA:
        q, kv = torch.zeros(1, 2, 2, 4), torch.zeros(1, 1, 2, 4)
        try:
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            _GQA.append(True)
        except (TypeError, RuntimeError):
            _GQA.append(False)
    return _GQA[0]


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
    F = torch.nn.functional
    if _sdpa_has_gqa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))


_EAGER_MODULE = torch.nn.Module().eval()


def dense_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The app's dense path (``backend.eager_attention``, transformers' eager attention): it materialises
    the ``H x L x L`` probabilities, the maps the app draws. Returns the output only."""
    from atp_viz import backend

    out, _weights = backend.eager_attention(_EAGER_MODULE, q, k, v, None)
    return out


def atp_layer(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, method: str
) -> torch.Tensor:
    """ATP's serving path: the basis of X (``principal_basis``) and the non-causal linear form."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    basis = atp.principal_basis(x, rank, method, generator=gen)  # (1, L, r)
    return atp.atp_attention(q, k, v, basis, form="linear")


def randomized_basis_is_used(L: int, rank: int, d: int = GEOMETRY["d"]) -> bool:
    """False where principal_basis(method="randomized") uses the exact SVD: r + oversampling >= min(L, d)."""
    return min(rank, L, d) + atp.RANDOMIZED_OVERSAMPLE < min(L, d)


def basis_width(L: int, rank: int, d: int = GEOMETRY["d"]) -> int:
    """The number of test vectors ``p`` of principal_basis(method="randomized") (see atp._randomized_svd)."""
    block = atp.RANDOMIZED_BLOCK
    return min(-(-(rank + atp.RANDOMIZED_OVERSAMPLE) // block) * block, min(L, d))


def madds(L: int, rank: int | None = None, method: str | None = None) -> dict[str, Any]:
    """Multiply-adds of what each path computes (``rank`` None: dense), counted like ATP_NOTES.md.

    Dense: Q K^T and A V, ``2 L^2 dh`` per query head. ATP linear, non-causal: ``U^T K``, ``U^T V``
    (``L r dh`` per key/value head each), then per query head either ``q (K'^T [V'|s])``, ``L dh (dh+1)``
    (what atp.py evaluates where it is cheaper, ``atp.reassociate_linear``), or ``(q K'^T) [V'|s]``,
    ``L r (2 dh + 1)``;
    ``attention_paper_order`` is the ATP_NOTES count ``2 L r dh`` per query head. Randomised basis with
    ``niter = 2`` and p test vectors: 6 products of X ``[L, d]`` with thin matrices (``6 L d p``), 7 thin
    ``L p p`` GEMMs (Gram matrices and re-normalisations) and ``Q U_b`` (``L p r``); the ``p x p`` and
    ``d x p`` factorisations are not counted. The exact SVD (LAPACK) is not counted.
    """
    d, H, Hkv, dh = (GEOMETRY[k] for k in ("d", "n_heads", "n_kv_heads", "head_dim"))
    if rank is None:
        return {"attention": 2 * L * L * dh * H}
    principal = 2 * L * rank * dh * Hkv
    if atp.reassociate_linear(rank, dh):
        per_query = L * dh * (dh + 1) * H + rank * dh * (dh + 1) * Hkv
    else:
        per_query = L * rank * (2 * dh + 1) * H
    out: dict[str, Any] = {
        "attention": principal + per_query,
        "attention_paper_order": principal + 2 * L * rank * dh * H,
    }
    if method == "randomized" and randomized_basis_is_used(L, rank, d):
        p = basis_width(L, rank, d)
        out["basis"] = 6 * L * d * p + 7 * L * p * p + L * p * rank
        out["basis_p"] = p
    elif method == "sketch" and sketch_basis_is_used(L, rank, d):
        s_rows = max(atp.SKETCH_MIN_ROWS, atp.SKETCH_FACTOR * rank)
        p = basis_width(s_rows, rank, d)
        # x V_r, CholeskyQR2 (2 Grams + 2 applications), Q^T y and Q U_b: one pass over x, 6 thin GEMMs;
        # plus the randomised finder on the s x d sample (6 s d p + 7 d p^2 + d p r).
        out["basis"] = L * d * rank + 6 * L * rank * rank + 6 * s_rows * d * p + 7 * d * p * p + d * p * rank
        out["basis_sample_rows"] = s_rows
    else:
        out["basis"] = "not counted (LAPACK SVD)"
    return out


def sketch_basis_is_used(L: int, rank: int, d: int = GEOMETRY["d"]) -> bool:
    """False where principal_basis(method="sketch") falls back to the exact SVD (see atp.principal_basis)."""
    n = max(atp.SKETCH_MIN_ROWS, atp.SKETCH_FACTOR * min(rank, L, d))
    return n < L and min(rank, L, d) < min(n, d)


def _ceiling(L: int, rank: int, method: str) -> float | str:
    """Dense multiply-adds / ATP's (attention + basis): the speed-up at equal speed per multiply-add."""
    atp_count = madds(L, rank, method)
    if not isinstance(atp_count["basis"], int):
        return "not counted (exact SVD)"
    return madds(L)["attention"] / (atp_count["attention"] + atp_count["basis"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def run_layer_bench(
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    ranks: str | Sequence[str] = DEFAULT_RANKS,
    *,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    methods: Sequence[str] = BASIS_METHODS,
    eager_limit_gb: float = EAGER_LIMIT_GB,
    device: str = "cpu",
    measure_memory: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Time and measure one attention layer at each L: dense SDPA, dense eager and ATP (linear form).

    For each rank and basis method the ATP path is timed as a whole (basis + attention, the figure the
    ratios use) and in its two parts (basis alone; attention alone on a precomputed basis).
    """
    spec = parse_ranks(ranks)
    rows = []
    for L in parse_lengths(lengths):
        if progress:
            progress(f"layer bench: L = {L}")
        rows.append(_layer_row(L, spec, repeats, warmup, methods, eager_limit_gb, device, measure_memory))
    return {
        "geometry": dict(GEOMETRY),
        "causal": False,
        "dtype": "float32",
        "device": device,
        "repeats": repeats,
        "warmup": warmup,
        "rank_spec": list(spec),
        "projections": PROJECTIONS,
        "timing_method": TIMING_METHOD,
        "memory_method": MEMORY_METHOD if measure_memory else "not measured",
        "lengths": rows,
        "crossover": crossover(rows, spec, methods),
    }


def _layer_row(
    L: int,
    spec: Sequence[str],
    repeats: int,
    warmup: int,
    methods: Sequence[str],
    eager_limit_gb: float,
    device: str,
    measure_memory: bool,
) -> dict[str, Any]:
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
        return lambda: atp.principal_basis(x, r, method, generator=gen.manual_seed(0))

    combos = []
    for r, toks in ranks_for(spec, L):
        with torch.inference_mode():
            fixed = atp.principal_basis(x, r, "exact")  # for the attention-only timing
        paths[f"attn/{r}"] = lambda u=fixed: atp.atp_attention(q, k, v, u, form="linear")
        for method in methods:
            combos.append((r, toks, method))
            paths[f"atp/{r}/{method}"] = lambda r=r, m=method: atp_layer(x, q, k, v, r, m)
            paths[f"basis/{r}/{method}"] = basis_fn(r, method)
    times = _time_paths(paths, repeats, warmup, device)
    mem: dict[str, int | None] = {}
    if measure_memory:
        for name in ("dense_sdpa", "dense_eager", *(f"atp/{r}/{m}" for r, _, m in combos)):
            if name in paths:
                mem[name] = peak_memory(paths[name], device)
    no_mem = "not measured" if not measure_memory else "the profiler gave no memory events"
    sdpa = {**_summary(times["dense_sdpa"]), "peak_bytes": mem.get("dense_sdpa"), "madds": madds(L)}
    if sdpa["peak_bytes"] is None:
        sdpa["peak_bytes_skipped"] = no_mem
    sdpa["implementation"] = (
        "F.scaled_dot_product_attention(enable_gqa=True)"
        if _sdpa_has_gqa()
        else "F.scaled_dot_product_attention on repeat_interleave'd K/V"
    )
    if eager_skip:
        eager: dict[str, Any] = {"skipped": eager_skip, "median_s": None, "min_s": None, "peak_bytes": None}
    else:
        eager = {**_summary(times["dense_eager"]), "peak_bytes": mem.get("dense_eager"), "madds": madds(L)}
        eager["implementation"] = "atp_viz.backend.eager_attention (softmax(c Q K^T) V, K/V repeated)"
        if eager["peak_bytes"] is None:
            eager["peak_bytes_skipped"] = no_mem
    eager["probabilities_bytes"] = eager_bytes
    atp_rows = []
    for r, toks, method in combos:
        total = _summary(times[f"atp/{r}/{method}"])
        peak = mem.get(f"atp/{r}/{method}")
        if method == "randomized" and randomized_basis_is_used(L, r):
            how = "randomized range finder (niter=2)"
        elif method == "randomized":
            how = "exact SVD (the randomized method falls back: rank + oversampling >= min(L, d))"
        elif method == "sketch" and sketch_basis_is_used(L, r):
            how = f"token sketch ({max(atp.SKETCH_MIN_ROWS, atp.SKETCH_FACTOR * r)} sampled tokens)"
        elif method == "sketch":
            how = "exact SVD (the sketch falls back: the sample would be the whole input)"
        else:
            how = "exact SVD"
        row: dict[str, Any] = {
            "rank": r,
            "rank_spec": toks,
            "basis_method": method,
            "basis_computed_by": how,
            "total": total,
            "basis": _summary(times[f"basis/{r}/{method}"]),
            "attention": _summary(times[f"attn/{r}"]),
            "peak_bytes": peak,
            "madds": madds(L, r, method),
            "speedup_vs_dense_sdpa": _ratio(sdpa["median_s"], total["median_s"]),
            "counted_speedup_ceiling": _ceiling(L, r, method),
            "speedup_vs_dense_eager": _ratio(eager["median_s"], total["median_s"]),
            "memory_vs_dense_sdpa": _ratio(peak, sdpa["peak_bytes"]),
            "memory_vs_dense_eager": _ratio(peak, eager["peak_bytes"]),
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
        atp_rows.append(row)
    return {"L": L, "dense_sdpa": sdpa, "dense_eager": eager, "atp": atp_rows}


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


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


def docstring_text(modules: Sequence[str] = DOC_MODULES) -> str:
    """English prose from the standard library: module, class and function docstrings, concatenated."""
    parts = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(doc)
    return "\n\n".join(parts)


def run_model_bench(
    model_key: str = MODEL_KEY,
    length: int = MODEL_LENGTH,
    rank: int = MODEL_RANK,
    *,
    repeats: int = MODEL_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Whole-model prefill (``compare.forward``, which times the model call): dense vs ATP, both forms, both
    basis methods, on ``length`` tokens of standard-library docstrings. ``warmup`` untimed dense calls, then
    ``repeats`` interleaved rounds of every configuration."""
    from atp_viz import compare
    from atp_viz.engine import ATPConfig
    from atp_viz.models import load_model
    from atp_viz.texts import tokenize

    if progress:
        progress(f"model bench: loading {model_key}")
    t0 = time.perf_counter()
    loaded = load_model(model_key, device=device)
    load_s = time.perf_counter() - t0
    n = min(length, loaded.info.max_tokens)
    tok = tokenize(loaded.tokenizer, docstring_text(), n)
    configs: dict[str, ATPConfig | None] = {"dense": None}
    for form in ("linear", "exact"):
        for method in BASIS_METHODS:
            configs[f"atp_{form}_{method}"] = ATPConfig(rank=rank, form=form, basis_method=method)
    for i in range(warmup):
        if progress:
            progress(f"model bench: warm-up {i + 1}/{warmup}")
        compare.forward(loaded, tok, None)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, Any] = {}
    for rep in range(repeats):
        for name, cfg in configs.items():
            if progress:
                progress(f"model bench: round {rep + 1}/{repeats}, {name}")
            run = compare.forward(loaded, tok, cfg)
            seconds[name].append(run.seconds)
            last[name] = run
    how_dense = "torch SDPA (atp_viz backend, dense pass keeping no maps)"
    dense = {**_summary(seconds["dense"]), "attention": how_dense}
    runs = {}
    for name, cfg in configs.items():
        if cfg is None:
            continue
        s = _summary(seconds[name])
        runs[name] = {
            **s,
            "form": cfg.form,
            "basis_method": cfg.basis_method,
            "rank": last[name].ranks[0] if last[name].ranks else rank,
            "speedup_vs_dense": _ratio(dense["median_s"], s["median_s"]),
        }
        if last["dense"].next_logits is not None:
            runs[name]["next_token_kl_dense_to_atp"] = compare.kl_divergence(
                last["dense"].next_logits, last[name].next_logits
            )
    return {
        "model": model_key,
        "label": loaded.info.label,
        "n_tokens": tok.n_tokens,
        "requested_tokens": length,
        "text": f"docstrings of the standard-library modules {', '.join(DOC_MODULES)}",
        "load_seconds": load_s,
        "repeats": repeats,
        "warmup": warmup,
        "timing_method": (
            "compare.forward's own timer around the model call (the basis is computed per layer inside "
            f"it); all {loaded.info.n_layers} layers use ATP; warm-up: untimed dense forwards; interleaved "
            "rounds, every configuration once per round"
        ),
        "dense": dense,
        "atp": runs,
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_report(result: dict[str, Any]) -> str:
    """The readable table of a bench result."""
    lines = []
    m = result["machine"]
    cpus = m.get("usable_cpus", m["logical_cpus"])
    lines.append(
        f"machine: {m['cpu_model']}, {cpus} CPUs, torch {m['torch_version']}, {m['torch_threads']} threads, "
        f"device {m['device']}, load average at start {m.get('load_average_at_start')}"
    )
    layer = result.get("layer")
    if layer:
        g = layer["geometry"]
        lines.append(
            f"\nAttention layer, SmolLM2 geometry (d={g['d']}, {g['n_heads']} query / {g['n_kv_heads']} kv "
            f"heads, dh={g['head_dim']}), non-causal, float32. Times in ms: median (min) of "
            f"{layer['repeats']} after {layer['warmup']} warm-up. Q/K/V projections excluded; "
            "ATP = basis + linear form."
        )
        lines.append(
            "Peak memory: torch.profiler allocator events (MiB beyond the inputs; see JSON memory_method)."
        )
        head = (
            f"{'L':>6}  {'path':<28} {'median':>9} {'min':>9} {'basis':>8} {'attn':>7} "
            f"{'sdpa/x':>7} {'eager/x':>8} {'peak MiB':>9} {'mem/eager':>9}"
        )
        lines.append(head)
        lines.append("-" * len(head))
        for row in layer["lengths"]:
            L, sd, eg = row["L"], row["dense_sdpa"], row["dense_eager"]
            lines.append(
                f"{L:>6}  {'dense SDPA':<28} {_ms(sd['median_s']):>9} {_ms(sd['min_s']):>9} {'':>8} {'':>7} "
                f"{'1.00x':>7} {'':>8} {_mib(sd['peak_bytes']):>9} {'':>9}"
            )
            if "skipped" in eg:
                lines.append(f"{L:>6}  {'dense eager':<28} {eg['skipped']}")
            else:
                ratio = _x(_ratio(sd["median_s"], eg["median_s"]))
                lines.append(
                    f"{L:>6}  {'dense eager':<28} {_ms(eg['median_s']):>9} {_ms(eg['min_s']):>9} "
                    f"{'':>8} {'':>7} {ratio:>7} {'1.00x':>8} {_mib(eg['peak_bytes']):>9} {'':>9}"
                )
            for a in row["atp"]:
                name = f"ATP r={a['rank']} ({','.join(a['rank_spec'])}) {a['basis_method'][:5]}"
                t = a["total"]
                lines.append(
                    f"{L:>6}  {name:<28} {_ms(t['median_s']):>9} {_ms(t['min_s']):>9} "
                    f"{_ms(a['basis']['median_s']):>8} {_ms(a['attention']['median_s']):>7} "
                    f"{_x(a['speedup_vs_dense_sdpa']):>7} {_x(a['speedup_vs_dense_eager']):>8} "
                    f"{_mib(a['peak_bytes']):>9} {_x(a['memory_vs_dense_eager']):>9}"
                )
        lines.append(
            "(sdpa/x, eager/x: dense median / this median; mem/eager: this peak / dense eager's peak)"
        )
        cross = [
            f"{c['rank_spec']} {c['basis_method']}: "
            + (f"L >= {c['crossover_L']}" if c["crossover_L"] is not None else "not within the measured L")
            for c in layer["crossover"]
        ]
        lines.append("Crossover (ATP faster than dense SDPA from this L on): " + "; ".join(cross))
    model = result.get("model")
    if model and "skipped" not in model:
        lines.append(
            f"\nWhole-model prefill: {model['label']}, {model['n_tokens']} tokens, seconds: median (min) of "
            f"{model['repeats']}"
        )
        d = model["dense"]
        lines.append(f"  {'dense (SDPA via the backend)':<42} {d['median_s']:8.3f} ({d['min_s']:.3f})")
        for a in model["atp"].values():
            kl = a.get("next_token_kl_dense_to_atp")
            label = f"ATP {a['form']} form, {a['basis_method']} basis, r={a['rank']}"
            lines.append(
                f"  {label:<42} "
                f"{a['median_s']:8.3f} ({a['min_s']:.3f})  {_x(a['speedup_vs_dense'])} vs dense"
                + (f", next-token KL {kl:.3g} nats" if kl is not None else "")
            )
    elif model:
        lines.append(f"\nWhole-model prefill: {model['skipped']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    """Handler of ``atp-viz bench``: run, print the table, write the JSON."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    lengths = parse_lengths(args.lengths) if args.lengths else (TINY_LENGTHS if tiny else DEFAULT_LENGTHS)
    ranks = parse_ranks(args.ranks or (TINY_RANKS if tiny else DEFAULT_RANKS))
    repeats = args.repeats if args.repeats is not None else (TINY_REPEATS if tiny else DEFAULT_REPEATS)
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be at least 1 and --warmup at least 0")
    device = args.device
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "schema": "atp_viz.bench/1",
        "argv": list(sys.argv),
        "settings": {
            "lengths": list(lengths),
            "ranks": list(ranks),
            "repeats": repeats,
            "warmup": warmup,
            "tiny": tiny,
            "threads": torch.get_num_threads(),
            "threads_option": args.threads,
            "eager_limit_gb": args.eager_limit_gb,
            "device": device,
            "model": not args.no_model,
        },
        "machine": machine_info(device),
    }
    verbose = not getattr(args, "quiet", False)
    result["layer"] = run_layer_bench(
        lengths,
        ranks,
        repeats=repeats,
        warmup=warmup,
        eager_limit_gb=args.eager_limit_gb,
        device=device,
        progress=_progress if verbose else None,
    )
    if args.no_model:
        result["model"] = {"skipped": "skipped: --no-model"}
    else:
        key = TINY_MODEL_KEY if tiny else MODEL_KEY
        result["model"] = run_model_bench(
            key,
            args.model_length or (TINY_MODEL_LENGTH if tiny else MODEL_LENGTH),
            args.model_rank or (TINY_MODEL_RANK if tiny else MODEL_RANK),
            repeats=args.model_repeats or (TINY_MODEL_REPEATS if tiny else min(repeats, MODEL_REPEATS)),
            warmup=warmup,
            device=device,
            progress=_progress if verbose else None,
        )
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - t0
    print(format_report(result))
    text = json.dumps(result, indent=2, allow_nan=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse subparsers object; returns its parser."""
    b = subparsers.add_parser(
        "bench",
        help="benchmark ATP vs dense attention (one layer, and a whole-model prefill)",
        description=(
            "Time and measure one attention layer with SmolLM2's geometry (dense SDPA, dense eager, ATP "
            "linear form with its basis) at several lengths, and a SmolLM2 prefill dense vs ATP."
        ),
    )
    b.add_argument("--json", metavar="OUT", help="write every figure here as JSON")
    b.add_argument(
        "--lengths",
        type=parse_lengths,
        help=f"comma-separated L (default {','.join(map(str, DEFAULT_LENGTHS))})",
    )
    b.add_argument(
        "--ranks", type=parse_ranks, help=f"comma-separated ranks, ints or 'L/k' (default {DEFAULT_RANKS})"
    )
    b.add_argument("--repeats", type=int, help=f"timed runs per path (default {DEFAULT_REPEATS})")
    b.add_argument("--warmup", type=int, help=f"untimed runs per path first (default {DEFAULT_WARMUP})")
    b.add_argument("--no-model", action="store_true", help="skip the whole-model part")
    b.add_argument(
        "--tiny",
        action="store_true",
        help=f"tiny sizes for tests: lengths {','.join(map(str, TINY_LENGTHS))}, ranks {TINY_RANKS}, "
        f"{TINY_REPEATS} repeats, model {TINY_MODEL_KEY}",
    )
    b.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: leave as is)")
    b.add_argument(
        "--eager-limit-gb",
        type=float,
        default=EAGER_LIMIT_GB,
        help="skip dense eager where its H x L x L float32 probabilities would exceed this many GB "
        f"(default {EAGER_LIMIT_GB:g})",
    )
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    b.add_argument("--model-length", type=int, help=f"model prefill tokens (default {MODEL_LENGTH})")
    b.add_argument("--model-rank", type=int, help=f"ATP rank for the model (default {MODEL_RANK})")
    b.add_argument(
        "--model-repeats", type=int, help=f"timed model forwards per configuration (default {MODEL_REPEATS})"
    )
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=cmd_bench)
    return b


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m atp_viz.bench``), for use before the main CLI wires it in."""
    p = argparse.ArgumentParser(prog="atp-viz")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
