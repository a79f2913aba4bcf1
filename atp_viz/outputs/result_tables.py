"""The README's result tables: what each measures (``measure_*``, writing a JSON) and how it is shown
(``render_*``, JSON -> markdown). :mod:`atp_viz.outputs.results` lists them and checks the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atp_viz import forms
from atp_viz.analysis.protocol import interval
from atp_viz.core.progress import ProgressFn, steps, within

ROOT = Path(__file__).resolve().parents[2]
NEWS = ROOT / "data" / "05_news_report.txt"
FRACTIONS = (0.5, 0.25)


def _md(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Untuned models on one text (deterministic: no interval)
# --------------------------------------------------------------------------------------------------


def _compare_grid(model: str, progress: ProgressFn) -> dict:
    from atp_viz.analysis import compare
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model
    from atp_viz.text.inputs import tokenize

    loaded = load_model(model)
    tok = tokenize(loaded.tokenizer, NEWS.read_text(), loaded.info.max_tokens)
    dense = compare.forward(loaded, tok)
    rows: dict[str, dict] = {}
    grid = [(form, frac) for form in forms.names() for frac in FRACTIONS]
    for form, frac in steps(progress, grid, lambda s: f"{s[0]} at r = {s[1]:g} L"):
        c = compare.compare(dense, compare.forward(loaded, tok, ATPConfig(rank=frac, form=form)))
        rows.setdefault(form, {})[str(frac)] = c.as_dict(loaded.tokenizer)
    return {"model": model, "text": str(NEWS.relative_to(ROOT)), "n_tokens": tok.n_tokens, "rows": rows}


def measure_untuned_minilm(out: Path, progress: ProgressFn) -> dict:
    return _compare_grid("minilm", progress)


def measure_untuned_smollm2(out: Path, progress: ProgressFn) -> dict:
    return _compare_grid("smollm2", progress)


def render_untuned_minilm(data: list[dict]) -> str:
    d = data[0]
    rows = [
        [f"{f} form: sentence-embedding cosine to dense"]
        + [f"{d['rows'][f][str(x)]['embedding_cosine_to_dense']:.3f}" for x in FRACTIONS]
        for f in d["rows"]
    ]
    return _md([f"MiniLM, `{d['text']}` (L = {d['n_tokens']})", "r = L/2", "r = L/4"], rows)


def render_untuned_smollm2(data: list[dict]) -> str:
    d = data[0]
    rows = []
    for f in d["rows"]:
        cells = [d["rows"][f][str(x)] for x in FRACTIONS]
        rows.append(
            [f"{f} form: next-token KL(dense \\|\\| ATP), nats; top-1 agrees"]
            + [
                f"{c['next_token_kl_dense_to_atp']:.2f}; {'yes' if c['next_token_top1_agree'] else 'no'}"
                for c in cells
            ]
        )
    return _md([f"SmolLM2, `{d['text']}` (L = {d['n_tokens']})", "r = L/2", "r = L/4"], rows)


# --------------------------------------------------------------------------------------------------
# Strictly causal perplexity on the held-out windows (protocol)
# --------------------------------------------------------------------------------------------------

PPL_WINDOWS, PPL_SEQ, PPL_CHUNK = 24, 512, 128
PPL_RANKS = (32, 128)


def measure_perplexity(out: Path, progress: ProgressFn) -> dict:
    from atp_viz.analysis import protocol
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    windows = protocol.heldout_windows(loaded.tokenizer, PPL_SEQ, max_windows=PPL_WINDOWS)
    rows = []
    for i, (mode, ranks) in enumerate((("past", PPL_RANKS), ("effective", FRACTIONS))):
        settings = [(r, f) for f in forms.names() for r in ranks]
        sub = within(progress, i / 2, (i + 1) / 2, f"rank as {mode}: ")
        grid = protocol.perplexity_grid(
            loaded, windows, settings, chunk=PPL_CHUNK, rank_mode=mode, progress=sub
        )
        rows += [dict(r, rank_mode=mode) for r in (grid if mode == "past" else grid[1:])]
    return {
        "model": "smollm2",
        "n_windows": len(windows.ids),
        "seq_len": PPL_SEQ,
        "chunk": PPL_CHUNK,
        "rows": rows,
    }


def render_perplexity(data: list[dict]) -> str:
    d = data[0]
    rows = []
    for r in d["rows"]:
        rank = (
            r["rank"]
            if r["rank"] == "dense"
            else (f"{r['rank']:g} L ({r['rank_mode']})" if isinstance(r["rank"], float) else str(r["rank"]))
        )
        if not r.get("n_scored"):
            rows.append([r["form"], rank, "-", "broke down", "-", "-"])
            continue
        diff = r.get("top1_minus_reference")
        rows.append(
            [
                "dense" if r["rank"] == "dense" else r["form"],
                rank,
                f"{r['attended_share']:.2f}",
                interval(r["perplexity"], r["perplexity_ci"], 2),
                interval(r["top1"], r["top1_ci"]),
                "" if diff is None else interval(diff, r["top1_minus_reference_ci"], 1, scale=100),
            ]
        )
    n = d["rows"][0]["n_scored"]
    head = [
        "attention",
        "past kept as r",
        "attended share",
        "perplexity [95% CI]",
        "top-1 [95% CI]",
        "top-1 - dense, pt [95% CI]",
    ]
    note = (
        f"\n\n{d['n_windows']} held-out windows of {d['seq_len']} tokens (every held-out module), chunks of "
        f"{d['chunk']}; {n} scored predictions per row (positions {d['chunk']}..{d['seq_len'] - 2} of each "
        "window, the same for every row); intervals: bootstrap over windows, differences paired."
    )
    return _md(head, rows) + note


# --------------------------------------------------------------------------------------------------
# A decoder's per-layer ranks under one budget (same windows and protocol, untuned)
# --------------------------------------------------------------------------------------------------

SPLIT_FORM, SPLIT_BASIS, SPLIT_MODE = "exact", "keys", "effective"


def measure_layer_split(out: Path, progress: ProgressFn) -> dict:
    """SmolLM2 untuned, strictly causal: one rank in every layer against the spectra's split of the same
    budget (chosen on training texts), at L/2 and L/4 of the attended keys; the split paired with one rank."""
    from atp_viz.analysis import allocation, protocol
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    # every held-out window (135), as the fine-tuning runs are evaluated: a gain this small needs them
    windows = protocol.heldout_windows(loaded.tokenizer, PPL_SEQ)
    curves = allocation.split_measurement(
        "spectrum", loaded, basis_source=SPLIT_BASIS, progress=within(progress, 0.0, 0.05, "spectra: ")
    )
    runs = [(None, None)] + [(s, None) for s in FRACTIONS]
    runs += [(s, allocation.split_budget("spectrum", curves, s)) for s in FRACTIONS]
    scores = []
    for i, (share, split) in enumerate(runs):
        what = "dense" if share is None else f"r = {share:g} L" + (", per layer" if split else "")
        lo, hi = 0.05 + 0.95 * i / len(runs), 0.05 + 0.95 * (i + 1) / len(runs)
        scores.append(
            protocol.score_decoder(
                loaded, windows, rank=share, form=SPLIT_FORM, chunk=PPL_CHUNK, rank_mode=SPLIT_MODE,
                basis_from=SPLIT_BASIS, layer_ranks=split,
                progress=within(progress, lo, hi, f"{what}: "),
            )
        )  # fmt: skip
    rows = []
    for (share, split), sc in zip(runs, scores, strict=True):
        row = {"rank": "dense" if share is None else share, "layer_ranks": list(split) if split else None}
        row.update(protocol.decoder_summary(sc, windows, None if share is None else scores[0]))
        if split:
            one = scores[1 + FRACTIONS.index(share)]
            vs = protocol.decoder_summary(sc, windows, one)
            for key in ("top1_minus_reference", "perplexity_ratio_to_reference"):
                new = key.replace("reference", "one_rank")
                row[new], row[f"{new}_ci"] = vs[key], vs[f"{key}_ci"]
        rows.append(row)
    return {
        "model": "smollm2", "form": SPLIT_FORM, "basis_from": SPLIT_BASIS, "rank_mode": SPLIT_MODE,
        "n_windows": len(windows.ids), "seq_len": PPL_SEQ, "chunk": PPL_CHUNK, "rows": rows,
    }  # fmt: skip


def render_layer_split(data: list[dict]) -> str:
    from atp_viz.core.ranks import describe_layer_shares

    d = data[0]
    rows = []
    for r in d["rows"]:
        dense = r["rank"] == "dense"
        split = r["layer_ranks"]
        pt = ("top1_minus_reference_ci", "top1_minus_one_rank_ci")
        rows.append(
            [
                "dense" if dense else f"{r['rank']:g} L",
                "-" if dense else ("the spectra's split (below)" if split else "one rank"),
                f"{r['attended_share']:.2f}",
                interval(r["perplexity"], r["perplexity_ci"], 2),
                interval(r["top1"], r["top1_ci"]),
                "" if dense else interval(r["top1_minus_reference"], r[pt[0]], 1, scale=100),
                interval(r["top1_minus_one_rank"], r[pt[1]], 1, scale=100) if split else "",
                interval(r["perplexity_ratio_to_one_rank"], r["perplexity_ratio_to_one_rank_ci"])
                if split
                else "",
            ]
        )
    head = [
        "budget (mean share)", "ranks per layer", "attended share", "perplexity [95% CI]", "top-1 [95% CI]",
        "top-1 - dense, pt [95% CI]", "top-1 - one rank, pt [95% CI]", "perplexity / one rank [95% CI]",
    ]  # fmt: skip
    note = (
        f"\n\nSmolLM2 untuned, {d['form']} form, basis from the {d['basis_from']}, rank as a share of the "
        f"attended keys ({d['rank_mode']}); {d['n_windows']} held-out windows of {d['seq_len']} tokens, "
        f"chunks of {d['chunk']}, {d['rows'][0]['n_scored']} scored predictions per row. Intervals: "
        "bootstrap over windows, differences paired. The spectra's split (the energy each layer keeps, on 32 "
        "training-split texts), layer 0 first:"
    )
    for r in d["rows"]:
        if r["layer_ranks"]:
            note += f"\n- {r['rank']:g} L: {describe_layer_shares(r['layer_ranks'])}"
    return _md(head, rows) + note


# --------------------------------------------------------------------------------------------------
# Generation with a compressed KV cache (one prompt: no interval)
# --------------------------------------------------------------------------------------------------


def measure_generation(out: Path, progress: ProgressFn) -> dict:
    from atp_viz.analysis import serving
    from atp_viz.core.ranks import resolve_rank
    from atp_viz.hf.models import load_model
    from atp_viz.text.inputs import tokenize

    loaded = load_model("smollm2")
    tok = tokenize(loaded.tokenizer, NEWS.read_text(), loaded.info.max_tokens, min_tokens=1)
    dense = serving.generate(loaded, tok.input_ids, rank=None, max_new_tokens=32)
    rows = []
    grid = [(form, frac) for form in forms.names() for frac in FRACTIONS]
    for form, frac in steps(progress, grid, lambda s: f"{s[0]} at r = {s[1]:g} L, 32 tokens"):
        r, _ = resolve_rank(frac, tok.n_tokens)
        g = serving.generate(loaded, tok.input_ids, rank=r, form=form, max_new_tokens=32)
        share, first = serving.agreement(dense.new_ids, g.new_ids)
        rows.append(
            {
                "form": form,
                "fraction": frac,
                "rank": r,
                "kv_cache_bytes": g.kv_cache_bytes,
                "agreement": share,
                "first_divergence": first,
                "text": loaded.tokenizer.decode(list(g.new_ids)),
            }
        )
    return {
        "prompt": str(NEWS.relative_to(ROOT)),
        "prompt_tokens": tok.n_tokens,
        "new_tokens": 32,
        "dense_kv_cache_bytes": dense.kv_cache_bytes,
        "dense_text": loaded.tokenizer.decode(list(dense.new_ids)),
        "rows": rows,
    }


def render_generation(data: list[dict]) -> str:
    d = data[0]
    rows = [
        [
            f"{r['form']}, r = L/{round(1 / r['fraction'])} ({r['rank']})",
            f"{r['kv_cache_bytes'] / 1e6:.1f} MB",
            f"{r['kv_cache_bytes'] / d['dense_kv_cache_bytes']:.0%}",
            f"{r['agreement']:.0%}",
            r["first_divergence"],
        ]
        for r in d["rows"]
    ]
    head = [
        "past kept as",
        "KV cache at the end",
        "of dense",
        "token agreement with dense",
        "first divergence",
    ]
    return _md(head, rows) + (
        f"\n\nDense cache: {d['dense_kv_cache_bytes'] / 1e6:.1f} MB; prompt `{d['prompt']}` "
        f"({d['prompt_tokens']} tokens), {d['new_tokens']} new tokens, greedy."
    )


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def _ms(t: dict | None) -> str:
    if not t or t.get("median_s") is None:
        return "-"
    rel = t.get("median_ci_rel")
    return f"{t['median_s'] * 1e3:.3g} ms" + ("" if rel is None else f" +-{rel:.0%}")


def render_bench_layer(data: list[dict]) -> str:
    layer = data[0]["layer"]
    rows, flags = [], []
    for e in layer["lengths"]:
        at128 = {a["basis_method"]: a for a in e["atp"] if a["rank"] == 128}
        cells = [e["L"], _ms(e["dense_sdpa"]), _ms(e.get("dense_eager"))]
        cells += [_ms(at128[m]["total"]) if m in at128 else "-" for m in ("exact", "randomized", "sketch")]
        cells += [
            f"{at128[m]['speedup_vs_dense_sdpa']:.2f}x" if m in at128 else "-"
            for m in ("randomized", "sketch")
        ]
        rows.append(cells)
        flags += [f"L = {e['L']}: {f}" for f in e.get("flags", [])]
    head = [
        "L",
        "dense SDPA",
        "dense eager",
        "ATP r = 128, exact basis",
        "randomised",
        "sketch",
        "SDPA / ATP (rand.)",
        "SDPA / ATP (sketch)",
    ]
    m = data[0]["machine"]
    text = _md(head, rows) + (
        f"\n\nMedians with the half-width of their 95% interval; {layer['repeats']} to "
        f"{layer.get('max_repeats') or layer['repeats']} interleaved repeats per path. Machine: "
        f"{m['cpu_model']}, {m['torch_threads']} torch thread(s), load average (1 / 5 / 15 min) at start "
        f"{' / '.join(f'{x:.1f}' for x in m.get('load_average_at_start') or []) or 'unknown'}. "
        "No row was flagged as inconsistent." * (not flags)
    )
    if flags:
        text += "\n\nFlagged as inconsistent (rerun before quoting): " + "; ".join(flags) + "."
    return text


# --------------------------------------------------------------------------------------------------
# Attention sinks, the sketch basis's accuracy, the whole-model benchmark
# --------------------------------------------------------------------------------------------------

SINK_TEXT = ROOT / "data" / "04_attention_explainer.txt"
LONG_TEXT = ROOT / "data" / "08_long_essay_history_of_computing.txt"


def measure_sinks(out: Path, progress: ProgressFn) -> dict:
    """SmolLM2's residual stream vs its attention input X: the first token's row norm over the median
    token's, and the components each needs for 90% of the energy (with and without the first token);
    on the short text also the first token's share of attention (the maps of the long one would need
    ~2 GB)."""
    from atp_viz.analysis import spectra
    from atp_viz.analysis.capture import capture
    from atp_viz.analysis.lengths import sink_ratio
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    rows = []
    for path in steps(progress, (SINK_TEXT, LONG_TEXT), lambda p: f"capturing every layer on {p.name}"):
        cap = capture(loaded, path.read_text(), attentions="all" if path == SINK_TEXT else "none")
        for i, lc in enumerate(cap.layers):
            row = {
                "text": str(path.relative_to(ROOT)),
                "n_tokens": cap.n_tokens,
                "layer": i,
                "sink_ratio": sink_ratio(lc.resid),
                "resid_rank90": spectra.spectrum(lc.resid).rank_for(0.9),
                "resid_rank90_without_first": spectra.spectrum(lc.resid, skip_first=True).rank_for(0.9),
                "x_rank90": spectra.spectrum(lc.x).rank_for(0.9),
            }
            if lc.attn is not None:  # [H, L, L]; row 0 can only read the first token: left out
                share = lc.attn[:, 1:, 0].mean(axis=1)
                row["first_token_attention"] = {"mean": float(share.mean()), "heads_min": float(share.min()),
                                                "heads_max": float(share.max())}  # fmt: skip
            rows.append(row)
    return {"model": "smollm2", "rows": rows}


def _span(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if values else "-"


def render_sinks(data: list[dict]) -> str:
    rows = data[0]["rows"]
    out = []
    for text in dict.fromkeys(r["text"] for r in rows):
        rs = [r for r in rows if r["text"] == text]
        sink = [r for r in rs if r["sink_ratio"] > 10]
        ratios = [r["sink_ratio"] for r in sink]
        mid = rs[len(rs) // 2]
        shares = [r["first_token_attention"]["mean"] for r in sink if "first_token_attention" in r]
        out.append(
            [
                f"`{text}` (L = {rs[0]['n_tokens']})",
                f"{sink[0]['layer']}-{sink[-1]['layer']}" if sink else "none",
                f"{min(ratios):.0f}-{max(ratios):.0f}x" if sink else "-",
                _span([r["resid_rank90"] for r in sink]),
                _span([r["resid_rank90_without_first"] for r in sink]),
                f"{mid['x_rank90']} (layer {mid['layer']})",
                f"{min(shares):.0%}-{max(shares):.0%}" if shares else "not measured",
            ]
        )
    head = [
        "SmolLM2 on",
        "sink layers (first row > 10x median)",
        "first row / median",
        "residual: components for 90%",
        "without the first token",
        "attention input X: components for 90%",
        "first token's share of attention (sink layers)",
    ]
    return _md(head, out) + (
        "\n\nShare of attention: the weight a query row puts on the first token, averaged over the rows after"
        " the first and over heads, per layer; its range over the sink layers. Not measured on the long text"
        " (its maps would need about 2 GB)."
    )


def measure_basis_energy(out: Path, progress: ProgressFn) -> dict:
    """How much of the exact top-128 subspace's energy the randomised and sketch bases capture, on
    SmolLM2's attention inputs at L = 8192 (standard-library docstrings)."""
    import torch

    from atp_viz.analysis.capture import capture
    from atp_viz.core.basis import principal_basis
    from atp_viz.hf.models import load_model
    from atp_viz.text.corpus import bench_text

    loaded = load_model("smollm2")
    progress(0.0, "capturing every layer at 8192 tokens")
    cap = capture(loaded, bench_text(), attentions="none")  # cut to the model's 8192 tokens, with a notice
    rows = []
    for layer in steps(within(progress, 0.3, 1.0), (2, 12, 25), lambda i: f"bases of layer {i}"):
        x = torch.from_numpy(cap.layers[layer].x.copy()).double()
        best = torch.linalg.svdvals(x)[:128].square().sum()
        row = {"layer": layer, "n_tokens": cap.n_tokens}
        for method in ("randomized", "sketch"):
            u = principal_basis(x, 128, method)
            row[method] = float((u.mT @ x).square().sum() / best)
        rows.append(row)
    return {"model": "smollm2", "rank": 128, "rows": rows}


def render_basis_energy(data: list[dict]) -> str:
    d = data[0]
    rows = [[r["layer"], r["n_tokens"], f"{r['randomized']:.2%}", f"{r['sketch']:.2%}"] for r in d["rows"]]
    head = ["SmolLM2 layer", "L", "randomised basis", "token sketch"]
    return (
        _md(head, rows)
        + f"\n\nShare of the energy of the exact top-{d['rank']} subspace of X that each basis keeps."
    )


def render_bench_model(data: list[dict]) -> str:
    m = data[0]["model"]
    if "skipped" in m:
        return f"Whole-model prefill: {m['skipped']}."
    d = m["dense"]
    rows = [["dense (SDPA)", "-", f"{d['median_s']:.2f} s", "1.00x", "-"]]
    for a in m["atp"].values():
        kl = a.get("next_token_kl_dense_to_atp")
        rows.append(
            [
                f"ATP {a['form']} form, r = {a['rank']}",
                a["basis_method"],
                f"{a['median_s']:.2f} s",
                f"{a['speedup_vs_dense']:.2f}x",
                "-" if kl is None else f"{kl:.2f}",
            ]
        )
    head = ["whole-model prefill", "basis", "median", "dense / this", "next-token KL to dense, nats"]
    return _md(head, rows) + (
        f"\n\n{m['label']}, {m['n_tokens']} tokens, median of {m['repeats']} interleaved "
        "repeats (the basis is computed per layer inside the timed call)."
    )
