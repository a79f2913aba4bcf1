"""The README's table "what principal keys add behind an exact window": SmolLM2 at 8192 tokens, the past
read as sinks + a sliding window exactly and the middle either dropped or compressed to r principal keys
under each form (measure -> JSON, JSON -> markdown, as in :mod:`atp_viz.outputs.result_tables`).

The question it answers: a fixed 128 principal keys for the *whole* past lose most of a pretrained
model's accuracy (the prefill table), and an exact sliding window is the usual cure (StreamingLLM's sinks
+ window; LoLCATs' window + linear attention). Behind such a window, how much of the gap to dense do the
middle's principal keys close, under which form, and at what counted cost?
"""

from __future__ import annotations

import time
from pathlib import Path

from atp_viz.core.progress import ProgressFn, within
from atp_viz.outputs.result_tuning import _md

L, CHUNK, RANK, SINKS = 8192, 256, 128, 4
# (window, form or None for the middle dropped, basis update, basis source); one held-out window, untuned.
# The keys' basis is the cheap one (d_s = H_kv d_h = 192 for SmolLM2, its running sums small); the
# attention inputs X are the paper's (d = 576), whose basis also spans what the values need.
SETTINGS = (
    (512, None, "recompute", "keys"),
    (512, "exact", "recompute", "keys"),
    (512, "exact", "recompute", "input"),
    (512, "linear", "moments", "keys"),
    (512, "pksoftmax", "moments", "keys"),
    (1024, None, "recompute", "keys"),
    (1024, "exact", "recompute", "keys"),
    (1024, "exact", "recompute", "input"),
    (2048, None, "recompute", "keys"),
    (2048, "exact", "recompute", "keys"),
)


def measure_window_smollm2(out: Path, progress: ProgressFn) -> dict:
    """Perplexity, top-1 agreement with dense and the counted ceiling of every setting in ``SETTINGS``
    on the prefill benchmark's held-out window (strictly causal chunks of 256, basis from the keys)."""
    import torch

    from atp_viz.analysis import protocol, serving
    from atp_viz.analysis.bench import prefill
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    window = protocol.heldout_windows(loaded.tokenizer, L, max_windows=1)
    ids = window.ids[0]

    n = len(SETTINGS) + 1  # the dense run, then each setting: about the same time each

    def run(i: int, label: str, **kw) -> tuple[dict, float]:
        t0 = time.perf_counter()
        say = within(progress, i / n, (i + 1) / n, f"{label} ({i + 1} of {n}): ")
        with torch.inference_mode():
            logits = serving.chunked_logits(loaded, ids, chunk=CHUNK, progress=say, **kw)
        return prefill._scored(logits, ids, CHUNK), time.perf_counter() - t0

    dense, dense_s = run(0, "dense (chunks, exact past)", rank=None)
    rows = []
    for i, (w, form, update, source) in enumerate(SETTINGS, start=1):
        keep = serving.ExactKeep(SINKS, w, drop_rest=form is None)
        label = f"window {w}, middle {form or 'dropped'}, basis from {source}"
        kw = {"rank": None} if form is None else {"rank": RANK, "form": form, "basis_update": update}
        scored, seconds = run(i, label, keep=keep, basis_from=source, method="randomized", **kw)
        macs = prefill.counted_macs(
            loaded, L, rank=RANK, form=form or "exact", chunk=CHUNK, basis_from=source, method="randomized",
            basis_update=update, keep=keep,
        )  # fmt: skip
        rows.append({
            "window": w, "sinks": SINKS, "middle": form, "basis_update": update, "basis_from": source,
            "seconds": seconds,
            "ceiling": macs["dense_total"] / macs["atp_total"], "macs": macs,
            **prefill.accuracy(dense, scored, window, CHUNK, RANK, keep),
        })  # fmt: skip
    return {
        "model": "smollm2", "tokens": L, "chunk": CHUNK, "rank": RANK, "sinks": SINKS,
        "basis_method": "randomized", "dense_seconds": dense_s, "rows": rows,
        "text": f"held-out window of {L} tokens (atp_viz.analysis.protocol.heldout_windows, max_windows=1)",
        "timing_note": "seconds: one pass of each setting while other work ran, not a benchmark",
    }  # fmt: skip


def _ci(x: float, ci) -> str:
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def render_window(data: list[dict]) -> str:
    (d,) = data
    rows = []
    for r in d["rows"]:
        source = "X" if r.get("basis_from", "keys") == "input" else "the keys"
        middle = (
            "dropped"
            if r["middle"] is None
            else f"{r['middle']}, r = {d['rank']}, basis from {source} ({r['basis_update']})"
        )
        rows.append([
            r["window"], middle, _ci(r["atp_perplexity"], r["atp_perplexity_ci"]),
            _ci(r["perplexity_ratio"], r["perplexity_ratio_ci"]),
            f"{r['top1_agreement']:.3f} [{r['top1_agreement_ci'][0]:.3f}, {r['top1_agreement_ci'][1]:.3f}]",
            f"{r['ceiling']:.2f}x",
        ])  # fmt: skip
    dense = d["rows"][0]
    head = [
        "exact window",
        "middle of the past",
        "perplexity",
        "/ dense",
        "top-1 agrees with dense",
        "ceiling",
    ]
    return _md(head, rows) + (
        f"\n\nSmolLM2, one held-out window of {d['tokens']} tokens, strictly causal chunks of {d['chunk']}: "
        f"each chunk reads the first {d['sinks']} tokens (sinks) and the window before it exactly, and the "
        f"rest of its past (the middle) dropped or compressed to r = {d['rank']} principal keys of the "
        "middle (basis from the middle's keys, or from its attention inputs X as in the paper; recompute: a "
        "randomized SVD of the middle for every chunk; moments: running sums of the tokens that left the "
        "window); untuned. Dense perplexity on the same positions "
        f"{_ci(dense['dense_perplexity'], dense['dense_perplexity_ci'])}; intervals by bootstrap over blocks "
        "of positions of that one window, so a guide only. Ceiling: counted multiply-adds dense / this "
        "setting (the window's exact keys, the middle's basis and attention, projections, MLP and LM head), "
        "nothing timed."
    )
