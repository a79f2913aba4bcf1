"""Options, timing and memory measurement shared by the layer and model benchmarks.

Timings: ``time.perf_counter`` around one call (after ``torch.cuda.synchronize`` on CUDA), ``warmup``
untimed calls per path, then rounds in which every path runs once, so that the paths being compared
share the machine's load. After ``repeats`` rounds, a path whose median is not yet known to within
``TARGET_CI`` (the 95% distribution-free interval of the median, :func:`median_ci`, narrower than
+-10% of it) runs again in further rounds, up to ``max_repeats``; the summary says whether it got
there. Ratios are taken between medians of the same run. Peak memory: see :data:`MEMORY_METHOD`.
"""

from __future__ import annotations

import contextlib
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

from atp_viz.core import ranks as _ranks
from atp_viz.core.attention import sdpa_has_gqa

TARGET_CI = 0.10  # stop repeating a path once its median's 95% interval is within +-10% of it
MAX_REPEATS = 30
TIMING_METHOD = (
    "time.perf_counter around one call (torch.cuda.synchronize before and after on CUDA), "
    "torch.inference_mode, float32; `warmup` untimed calls per path, then interleaved rounds (each "
    "unfinished path of one L once per round): at least `repeats`, then more for every path whose "
    "median's 95% interval (order statistics, distribution-free) is wider than +-10% of the median, up "
    "to `max_repeats`; median, its interval and min of the repeats; ratios = ratio of medians from the "
    "same run."
)
MEMORY_METHOD = (
    "CPU: torch.profiler.profile(profile_memory=True) around one extra, untimed call; peak of the "
    "running sum of the allocator's [memory] events (bytes allocated by the path beyond what was live "
    "before it: inputs excluded, the output and every intermediate included). Buffers that do not come "
    "from PyTorch's allocator (MKL's GEMM packing, per-thread LAPACK scratch) are not seen. "
    "CUDA: torch.cuda.max_memory_allocated minus the allocation before the call."
)


def parse_lengths(text: str | Sequence[int]) -> tuple[int, ...]:
    """'512,1024' -> (512, 1024); every length an int >= 2. ValueError with a sentence otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            n = int(str(item).strip())
        except ValueError:
            raise ValueError(f"lengths must be ints separated by commas, got {text!r}") from None
        if n < 2:
            raise ValueError(f"every length must be at least 2 tokens, got {n}")
        out.append(n)
    if not out:
        raise ValueError("give at least one length")
    return tuple(sorted(set(out)))


def parse_ranks(text: str | Sequence[str | int]) -> tuple[str, ...]:
    """'64,128,L/8' -> ('64', '128', 'L/8'): each item read by :func:`atp_viz.core.ranks.parse_rank`
    (an int, a fraction of L or L/k) and kept as written (canonical case), so the JSON names its rows
    by the spec the user gave."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    out = []
    for item in items:
        tok = item.strip().replace(" ", "")
        if not tok:
            continue
        value = _ranks.parse_rank(tok)
        out.append(f"L/{int(tok[2:])}" if tok[:2].upper() == "L/" else str(value))
    if not out:
        raise ValueError("give at least one rank")
    return tuple(dict.fromkeys(out))


def ranks_for(spec: Sequence[str], L: int) -> list[tuple[int, list[str]]]:
    """The distinct ranks of ``spec`` at length L, clamped to [1, L]: ``[(r, [spec tokens giving r])]``."""
    by_rank: dict[int, list[str]] = {}
    for tok in spec:
        r, _notice = _ranks.resolve_rank(_ranks.parse_rank(tok), L)
        by_rank.setdefault(r, []).append(tok)
    return sorted(by_rank.items())


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
        "sdpa_enable_gqa": sdpa_has_gqa(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b not in (None, 0) else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ci(times: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval of the median from order statistics: ``(x_(k), x_(n+1-k))`` with the
    largest k such that P(Binomial(n, 1/2) < k) <= (1 - level) / 2. None when n is too small (n < 6 at
    95%: even (min, max) covers less)."""
    n = len(times)
    xs = sorted(times)
    tail, cdf, k = (1 - level) / 2, 0.0, 0
    for j in range(n + 1):  # cdf = P(Binomial(n, 1/2) <= j - 1) before the update
        if cdf + math.comb(n, j) / 2**n > tail:
            k = j
            break
        cdf += math.comb(n, j) / 2**n
    if k < 1:
        return None
    return xs[k - 1], xs[n - k]


def summary(times: list[float]) -> dict[str, Any]:
    """Median, its 95% interval (and relative half-width), min and every repeat of one path."""
    med = statistics.median(times)
    ci = median_ci(times)
    out: dict[str, Any] = {"repeats_s": list(times), "median_s": med, "min_s": min(times)}
    out["median_ci_s"] = list(ci) if ci else None
    out["median_ci_rel"] = (ci[1] - ci[0]) / 2 / med if ci and med > 0 else None
    out["converged"] = out["median_ci_rel"] is not None and out["median_ci_rel"] <= TARGET_CI
    if ci is None:
        why = f"{len(times)} repeats are too few for a 95% interval of the median (at least 6)"
        out["median_ci_s_skipped"] = out["median_ci_rel_skipped"] = why
    return out


def time_paths(
    paths: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: str,
    *,
    max_repeats: int | None = None,
    keep: Callable[[str, Any], None] | None = None,
) -> dict[str, list[float]]:
    """Warm every path up, then interleaved rounds: every path once per round for ``repeats`` rounds, then
    only the paths whose median is not yet within ``TARGET_CI`` (:func:`summary`), up to ``max_repeats``
    (None: exactly ``repeats``). ``keep(name, output)`` sees each timed output after its clock stopped
    (to score it), before it is freed."""
    cap = repeats if max_repeats is None else max(max_repeats, repeats)
    with torch.inference_mode():
        for fn in paths.values():
            for _ in range(warmup):
                fn()
        sync(device)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(cap):
            todo = [n for n in paths if round_ < repeats or not summary(times[n])["converged"]]
            if not todo:
                break
            for name in todo:
                sync(device)
                t0 = time.perf_counter()
                out = paths[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                if keep is not None:
                    keep(name, out)
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
