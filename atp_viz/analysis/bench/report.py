"""The benchmark's printed table, and the measured series the Cost page plots."""

from __future__ import annotations

from typing import Any

from atp_viz.analysis.bench.timing import ratio


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _pm(t: dict) -> str:
    """``+-4%``: the half-width of a median's 95% interval relative to it (``?`` when too few repeats)."""
    rel = t.get("median_ci_rel")
    return "?" if rel is None else f"+-{rel:.0%}"


def _layer_lines(layer: dict[str, Any]) -> list[str]:
    g = layer["geometry"]
    lines = [
        f"\nAttention layer, SmolLM2 geometry (d={g['d']}, {g['n_heads']} query / {g['n_kv_heads']} kv "
        f"heads, dh={g['head_dim']}), non-causal, float32. Times in ms: median, its 95% interval (+-) and "
        f"min of {layer['repeats']} to {layer.get('max_repeats') or layer['repeats']} repeats after "
        f"{layer['warmup']} warm-up. Q/K/V projections excluded; ATP = basis + linear form.",
        "Peak memory: torch.profiler allocator events (MiB beyond the inputs; see JSON memory_method).",
    ]
    head = (
        f"{'L':>6}  {'path':<28} {'median':>9} {'+-':>5} {'min':>9} {'basis':>8} {'attn':>7} "
        f"{'sdpa/x':>7} {'eager/x':>8} {'peak MiB':>9} {'mem/eager':>9}"
    )
    lines += [head, "-" * len(head)]
    for row in layer["lengths"]:
        L, sd, eg = row["L"], row["dense_sdpa"], row["dense_eager"]
        lines.append(
            f"{L:>6}  {'dense SDPA':<28} {_ms(sd['median_s']):>9} {_pm(sd):>5} {_ms(sd['min_s']):>9} {'':>8} "
            f"{'':>7} {'1.00x':>7} {'':>8} {_mib(sd['peak_bytes']):>9} {'':>9}"
        )
        if "skipped" in eg:
            lines.append(f"{L:>6}  {'dense eager':<28} {eg['skipped']}")
        else:
            eager_x = _x(ratio(sd["median_s"], eg["median_s"]))
            lines.append(
                f"{L:>6}  {'dense eager':<28} {_ms(eg['median_s']):>9} {_pm(eg):>5} {_ms(eg['min_s']):>9} "
                f"{'':>8} {'':>7} {eager_x:>7} {'1.00x':>8} {_mib(eg['peak_bytes']):>9} {'':>9}"
            )
        for a in row["atp"]:
            name = f"ATP r={a['rank']} ({','.join(a['rank_spec'])}) {a['basis_method'][:5]}"
            t = a["total"]
            lines.append(
                f"{L:>6}  {name:<28} {_ms(t['median_s']):>9} {_pm(t):>5} {_ms(t['min_s']):>9} "
                f"{_ms(a['basis']['median_s']):>8} {_ms(a['attention']['median_s']):>7} "
                f"{_x(a['speedup_vs_dense_sdpa']):>7} {_x(a['speedup_vs_dense_eager']):>8} "
                f"{_mib(a['peak_bytes']):>9} {_x(a['memory_vs_dense_eager']):>9}"
            )
        lines += [f"{L:>6}  ! inconsistent: {flag}" for flag in row.get("flags", [])]
    lines.append("(sdpa/x, eager/x: dense median / this median; mem/eager: this peak / dense eager's peak)")
    cross = [
        f"{c['rank_spec']} {c['basis_method']}: "
        + (f"L >= {c['crossover_L']}" if c["crossover_L"] is not None else "not within the measured L")
        for c in layer["crossover"]
    ]
    lines.append("Crossover (ATP faster than dense SDPA from this L on): " + "; ".join(cross))
    return lines


def _model_lines(model: dict[str, Any]) -> list[str]:
    if "skipped" in model:
        return [f"\nWhole-model prefill: {model['skipped']}"]
    lines = [
        f"\nWhole-model prefill: {model['label']}, {model['n_tokens']} tokens, seconds: median (min) of "
        f"{model['repeats']}"
    ]
    d = model["dense"]
    lines.append(f"  {'dense (SDPA via the backend)':<42} {d['median_s']:8.3f} ({d['min_s']:.3f})")
    for a in model["atp"].values():
        kl = a.get("next_token_kl_dense_to_atp")
        label = f"ATP {a['form']} form, {a['basis_method']} basis, r={a['rank']}"
        lines.append(
            f"  {label:<42} {a['median_s']:8.3f} ({a['min_s']:.3f})  {_x(a['speedup_vs_dense'])} vs dense"
            + (f", next-token KL {kl:.3g} nats" if kl is not None else "")
        )
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The readable table of a bench result."""
    m = result["machine"]
    cpus = m.get("usable_cpus", m["logical_cpus"])
    lines = [
        f"machine: {m['cpu_model']}, {cpus} CPUs, torch {m['torch_version']}, {m['torch_threads']} threads, "
        f"device {m['device']}, load average at start {m.get('load_average_at_start')}"
    ]
    if result.get("layer"):
        lines += _layer_lines(result["layer"])
    if result.get("model"):
        lines += _model_lines(result["model"])
    return "\n".join(lines)


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
