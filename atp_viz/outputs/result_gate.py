"""The README's table "what the middle's gate can buy": the SmolLM2 run tuned behind a 512-token exact window
(pksoftmax middle of r = 128 principal keys, running sums), read with its per-head middle weight ``b``
shifted by a constant.

The question it answers: at 8192 tokens the run's trained middle made perplexity worse than dropping the
middle. Is that a gate trained at 2048 tokens and mis-scaled at 8192 (then re-fitting ``b`` for the length
would fix it), or do the 128 principal keys of the middle carry too little to close the window's gap to
dense (then no gate can)? The shift is chosen on windows of the run's *training* split; the held-out
window of the prefill benchmark then shows the chosen shift once (measure -> JSON, JSON -> markdown, as in
:mod:`atp_viz.outputs.result_tables`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from atp_viz.core.progress import ProgressFn, steps, within
from atp_viz.outputs.result_tuning import _md

RUN = "data/tuned/smollm2-pksoftmax-r128-window512-two-stage"
FORM, RANK, CHUNK = "pksoftmax", 128, 256
SHIFTS = (-3.0, -2.0, -1.0, 0.0, 1.0)  # added to every head's trained b
LENGTHS = ((2048, 6), (8192, 2))  # (tokens, training-split windows spread over the stream)


def _shifted(params: dict, shift: float) -> dict:
    return {layer: {k: (v + shift if k == "b" else v) for k, v in p.items()} for layer, p in params.items()}


def _score(loaded, windows, progress: ProgressFn, **kw) -> list[dict]:
    """Each window's scored positions (hits, NLLs, predictions) under one setting."""
    import torch

    from atp_viz.analysis import serving
    from atp_viz.analysis.bench import prefill

    out = []
    for ids in steps(progress, windows.ids, lambda _: "window"):
        with torch.inference_mode():
            logits = serving.chunked_logits(loaded, ids, chunk=CHUNK, **kw)
        out.append(prefill._scored(logits, ids, CHUNK))
    return out


def _blocked(scored: list[dict], windows):
    """One setting's scores in blocks of ``CHUNK`` positions (the bootstrap's clusters: two long windows
    are too few clusters to resample; blocks of one text are not independent, so the intervals are a
    guide)."""
    from atp_viz.analysis import protocol
    from atp_viz.analysis.bench.prefill import _blocks

    s = protocol.DecoderScores()
    for one, owner in zip(scored, windows.module_of, strict=True):
        s.hits += _blocks(one["hits"], CHUNK)
        s.nll += _blocks(one["nll"], CHUNK)
        s.modules += _blocks(owner[CHUNK + 1 :], CHUNK)
    return s


def _rows(settings: dict[str, list[dict]], windows) -> list[dict]:
    """Perplexity of every setting and its paired ratios to dense and to the middle dropped."""
    from atp_viz.analysis import protocol

    blocked = {name: _blocked(s, windows) for name, s in settings.items()}
    rows = []
    for name, s in blocked.items():
        own = protocol.decoder_summary(s, windows)
        to_dense = protocol.decoder_summary(s, windows, blocked["dense"])
        to_dropped = protocol.decoder_summary(s, windows, blocked["dropped"])
        rows.append({
            "setting": name, "perplexity": own["perplexity"], "perplexity_ci": own["perplexity_ci"],
            "top1": own["top1"], "n_scored": own["n_scored"],
            "ratio_to_dense": to_dense["perplexity_ratio_to_reference"],
            "ratio_to_dense_ci": to_dense["perplexity_ratio_to_reference_ci"],
            "ratio_to_dropped": to_dropped["perplexity_ratio_to_reference"],
            "ratio_to_dropped_ci": to_dropped["perplexity_ratio_to_reference_ci"],
        })  # fmt: skip
    return rows


def _settings(loaded, windows, keep, trained: dict, shifts, progress: ProgressFn) -> dict[str, list[dict]]:
    from atp_viz.analysis import serving

    runs = {
        "dense": ("dense", {"rank": None}),
        "dropped": (
            "middle dropped",
            {"rank": None, "keep": serving.ExactKeep(keep.sinks, keep.window, True)},
        ),
    }
    for shift in shifts:
        runs[f"b{shift:+g}"] = (f"middle, b {shift:+g}", {
            "rank": RANK, "form": FORM, "basis_from": "keys", "basis_update": "moments", "keep": keep,
            "params": _shifted(trained, shift),
        })  # fmt: skip
    return {
        name: _score(
            loaded, windows, within(progress, i / len(runs), (i + 1) / len(runs), f"{label}, "), **kw
        )
        for i, (name, (label, kw)) in enumerate(runs.items())
    }


def best_shift(rows: list[dict]) -> float:
    """The shift of b whose middle gave the lowest perplexity (the window alone and dense do not count:
    the choice is among ways of reading the middle)."""
    gated = [r for r in rows if r["setting"].startswith("b")]
    return float(min(gated, key=lambda r: r["perplexity"])["setting"][1:])


def measure_gate_smollm2(out: Path, progress: ProgressFn) -> dict:
    """Every shift of ``SHIFTS`` on training-split windows at each of ``LENGTHS``, then, on the prefill
    benchmark's held-out window of 8192 tokens, the trained gate and the shift that was best on the
    training windows at 8192."""
    from atp_viz.analysis import protocol, serving
    from atp_viz.hf import tuned
    from atp_viz.hf.models import load_model

    meta = tuned.read_settings(RUN)
    s = meta["settings"]
    if (s["form"], s["rank"], s.get("basis_update")) != (FORM, RANK, "moments"):
        raise ValueError(f"{RUN} is not the pksoftmax r = {RANK} running-sums run this table reads.")
    loaded = load_model(f"tuned:{RUN}")
    keep = serving.ExactKeep(s["sinks"], s["window"])
    trained = loaded.form_params(FORM)
    train_mods = meta["split"]["train_modules"]
    parts = []
    n_parts = len(LENGTHS) + 1  # each length's training windows, then the held-out window
    for i, (tokens, n) in enumerate(LENGTHS):
        windows = protocol.module_windows(loaded.tokenizer, train_mods, tokens, max_windows=n)
        say = within(progress, i / n_parts, (i + 1) / n_parts, f"training split, {tokens} tokens: ")
        rows = _rows(_settings(loaded, windows, keep, trained, SHIFTS, say), windows)
        parts.append({"text": "training split", "tokens": tokens, "windows": len(windows.ids), "rows": rows})
    best = best_shift(parts[-1]["rows"])
    say = within(progress, 1 - 1 / n_parts, 1.0, f"held-out 8192 tokens, shift chosen {best:+g}: ")
    windows = protocol.heldout_windows(loaded.tokenizer, 8192, max_windows=1)
    rows = _rows(_settings(loaded, windows, keep, trained, sorted({0.0, best}), say), windows)
    parts.append({"text": "held-out (the prefill benchmark's)", "tokens": 8192, "windows": 1, "rows": rows})
    b = np.array([float(p["b"].mean()) for p in trained.values()])
    return {
        "run": RUN, "form": FORM, "rank": RANK, "chunk": CHUNK, "sinks": s["sinks"], "window": s["window"],
        "basis_from": "keys", "basis_update": "moments", "trained_b_mean": float(b.mean()),
        "shift_chosen_on_training_split": best, "parts": parts,
    }  # fmt: skip


def _ci(x: float, ci, digits: int = 3) -> str:
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _name(setting: str, tag_shift: float, tag: str) -> str:
    if setting == "dense":
        return "dense (tuned weights, exact past)"
    if setting == "dropped":
        return "middle dropped (the window alone)"
    shift = float(setting[1:])
    tags = (["trained"] if shift == 0 else []) + ([tag] if shift == tag_shift else [])
    return f"middle, b {shift:+g}" + "".join(f" ({t})" for t in tags)


def render_gate(data: list[dict]) -> str:
    (d,) = data
    best = d["shift_chosen_on_training_split"]
    rows = []
    for part in d["parts"]:
        # the training split: the best shift at that length; held out: the shift chosen at 8192 tokens
        held_out = part["text"].startswith("held-out")
        tag_shift = best if held_out else best_shift(part["rows"])
        tag = "chosen on the training split" if held_out else "lowest here"
        for r in part["rows"]:
            rows.append([
                f"{part['text']}, {part['windows']} x {part['tokens']}", _name(r["setting"], tag_shift, tag),
                _ci(r["perplexity"], r["perplexity_ci"], 2),
                "" if r["setting"] == "dense" else _ci(r["ratio_to_dense"], r["ratio_to_dense_ci"]),
                "" if r["setting"] in ("dense", "dropped")
                else _ci(r["ratio_to_dropped"], r["ratio_to_dropped_ci"]),
            ])  # fmt: skip
    head = ["text, windows x tokens", "the past's middle", "perplexity", "/ dense", "/ middle dropped"]
    weight = math.exp(d["trained_b_mean"])
    return _md(head, rows) + (
        f"\n\nThe run `{d['run']}` read as it was tuned (strictly causal chunks of {d['chunk']}, "
        f"{d['sinks']} sinks and a window of {d['window']} exact, the middle as {d['form']} over "
        f"r = {d['rank']} principal keys of its keys, running sums), with every head's trained middle weight "
        f"b (mean {d['trained_b_mean']:.2f}: each principal key weighs about {weight:.3f} of its n / r "
        "tokens) shifted by the same constant. Ratios paired on the same positions; 95% intervals by "
        f"bootstrap over blocks of {d['chunk']} positions, so a guide only. The shift for the held-out "
        f"window ({best:+g}) is the one with the lowest perplexity on the training split at 8192 tokens."
    )


# --------------------------------------------------------------------------------------------------
# How large a window the speed goal allows: counted ceilings at 8192 tokens (nothing timed)
# --------------------------------------------------------------------------------------------------

CEILING_TOKENS = 8192
CEILING_WINDOWS = (256, 512, 768, 1024, 1536, 2048)
# (form or None for the middle dropped, rank, basis source): the keys' basis (d_s = 192) is the cheap one;
# X's (d = 576, the paper's) makes every running-sum update and eigendecomposition larger
CEILING_MIDDLES = (
    (None, None, "keys"),
    ("pksoftmax", 128, "keys"),
    ("pksoftmax", 64, "keys"),
    ("pksoftmax", 128, "input"),
)


def measure_window_ceilings(out: Path, progress: ProgressFn) -> dict:
    """Counted multiply-add ratio dense / windowed prefill of SmolLM2 at ``CEILING_TOKENS`` for each exact
    window (4 sinks) with the middle dropped or as ``pksoftmax`` over r principal keys (running sums of the
    keys or of X), chunks of 256: the most each setting can gain."""
    from atp_viz.analysis import serving
    from atp_viz.analysis.bench import prefill
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    rows = []
    grid = [(w, *middle) for w in CEILING_WINDOWS for middle in CEILING_MIDDLES]
    for w, form, rank, source in steps(progress, grid, lambda s: f"counting window {s[0]}, middle {s[1]}"):
        keep = serving.ExactKeep(4, w, drop_rest=form is None)
        macs = prefill.counted_macs(
            loaded, CEILING_TOKENS, rank=rank or 128, form=form or FORM, chunk=CHUNK, basis_from=source,
            method="randomized", basis_update="moments", keep=keep,
        )  # fmt: skip
        rows.append({"window": w, "middle": form, "rank": rank, "basis_from": source, **macs,
                     "ceiling": macs["dense_total"] / macs["atp_total"]})  # fmt: skip
    return {"model": "smollm2", "tokens": CEILING_TOKENS, "chunk": CHUNK, "sinks": 4, "rows": rows}


def render_window_ceilings(data: list[dict]) -> str:
    (d,) = data
    middles = list(dict.fromkeys((r["middle"], r["rank"], r["basis_from"]) for r in d["rows"]))
    by = {(r["window"], r["middle"], r["rank"], r["basis_from"]): r for r in d["rows"]}
    windows = sorted({r["window"] for r in d["rows"]})
    source = {"keys": "the keys", "input": "X"}
    head = ["exact window"] + [
        "middle dropped" if m is None else f"{m} middle, r = {r}, running sums of {source[s]}"
        for m, r, s in middles
    ]
    rows = [[w] + [f"{by[w, m, r, s]['ceiling']:.2f}x" for m, r, s in middles] for w in windows]
    return _md(head, rows) + (
        f"\n\nCounted multiply-adds of a {d['model']} prefill of {d['tokens']} tokens, dense (causal) / "
        f"chunks of {d['chunk']} that read {d['sinks']} sinks and the window exactly and the rest of the "
        "past as the column says (the basis's running-sum updates and eigendecompositions included; "
        "projections, MLP and LM head included): the most each setting can gain, nothing timed."
    )
