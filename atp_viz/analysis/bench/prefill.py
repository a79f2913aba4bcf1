"""``bench --prefill``: a decoder's prefill, dense against ATP, timed and scored in the same run.

The paper's speed setting: a long input read in strictly causal chunks, each chunk attending to the
past compressed to a fixed number r of principal keys (basis from those past tokens only, computed
in the timed region) and to itself exactly (:func:`atp_viz.analysis.serving.chunked_logits`), against
the same model's dense prefill (one forward, torch SDPA). Both produce every position's next-token
logits; the run's outputs are scored on the same positions (chunk .. L-2, those whose past is
compressed), so speed and accuracy come from the same computation.

``ceiling`` is what the counted multiply-adds allow: dense total / ATP total for this model, L and r,
the projections, MLP and LM head included (they are the same on both sides, and at a few thousand
tokens they are most of the work). A measured ``speedup`` close to it says the implementation does
what the count says; far below it says where time goes that the count does not see.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from atp_viz import forms
from atp_viz.analysis import protocol
from atp_viz.analysis.bench import timing
from atp_viz.core import costs as _costs
from atp_viz.core import ranks as _ranks
from atp_viz.core.progress import ProgressFn
from atp_viz.hf import backend
from atp_viz.hf.model_info import LoadedModel

DEFAULT_CHUNK = 256
DEFAULT_REPEATS, DEFAULT_MAX_REPEATS = 3, 5


def linear_macs_per_token(model: torch.nn.Module) -> float:
    """Multiply-adds per token of every linear layer (attention projections, MLP, LM head): the sum of
    their weights' sizes (a weight tied to the embedding is counted once, as the LM head)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return float(total)


def geometry(loaded: LoadedModel) -> _costs.Geometry:
    i = loaded.info
    return _costs.Geometry(n_heads=i.n_heads, n_kv_heads=i.n_kv_heads, head_dim=i.head_dim, d_model=i.d_model)


def counted_macs(
    loaded: LoadedModel, L: int, *, rank: int, form: str, chunk: int, basis_from: str, method: str,
    basis_update: str = "recompute", keep=None,
) -> dict[str, float]:  # fmt: skip
    """Multiply-adds of the dense prefill and of the chunked ATP prefill, and their parts.

    Dense attention is counted causally (``H L (L + 1) d_h``: the half a causal kernel computes); ATP's
    chunks as :meth:`AttentionForm.stream_cost` counts them, plus the basis of each chunk's past: an SVD
    of the whole past (:func:`atp_viz.core.costs.basis_macs`), or, from running sums, the chunk's update
    (every token its append moves out of the exact part, the last chunk's too) and a d_s x d_s
    eigendecomposition (:func:`atp_viz.core.costs.moment_basis_macs`; then no
    compression pass over the past either). ``keep`` (:class:`atp_viz.analysis.serving.ExactKeep`): the
    sinks and window are read exactly (``2 H C T d_h`` for T of them) and only the middle is compressed
    (nothing of it when ``keep.drop_rest``)."""
    geom, n_layers = geometry(loaded), loaded.info.n_layers
    f = forms.get(form)
    kv_width = geom.n_kv_heads * geom.head_dim
    d_src = geom.d_model if basis_from == "input" else kv_width
    linear = L * linear_macs_per_token(loaded.model)
    dense_attn = n_layers * float(geom.n_heads) * L * (L + 1) * geom.head_dim

    def compressed(n_past: int) -> tuple[int, int]:  # (exact tokens, compressed tokens) of a past
        a, b = keep.split(n_past) if keep is not None else (0, n_past)
        return n_past - (b - a), 0 if keep is not None and keep.drop_rest else b - a

    attn = basis = 0.0
    for start in range(0, L, chunk):
        C = min(chunk, L - start)
        exact, n = compressed(start)
        attn += 2.0 * geom.n_heads * C * exact * geom.head_dim  # exact sinks and window
        r = _ranks.chunk_rank(rank, n, C) if n else 0
        if basis_update == "moments":
            attn += f.stream_cost(C, 0, 0, geom) + (f.past_macs(C, n, r, geom) if n else 0.0)
            # the chunk's own append feeds the sums every token that leaves the exact part (all C of
            # them without a window), the last chunk's too; the basis is read only over a compressed past
            added = compressed(start + C)[1] - n
            basis += (
                _costs.moment_basis_macs(added, d_src, r, kv_width) if n
                else _costs.moment_sums_macs(added, d_src, kv_width)
            )  # fmt: skip
        else:
            attn += f.stream_cost(C, n, r, geom)
            basis += _costs.basis_macs(n, d_src, r, method) if n else 0.0
    atp_attn, atp_basis = n_layers * attn, n_layers * basis
    return {
        "linear_layers": linear,
        "dense_attention": dense_attn,
        "atp_attention": atp_attn,
        "atp_basis": atp_basis,
        "dense_total": linear + dense_attn,
        "atp_total": linear + atp_attn + atp_basis,
    }


def _scored(logits: torch.Tensor, ids: torch.Tensor, chunk: int) -> dict[str, np.ndarray]:
    """Hits, NLLs and predicted tokens of positions chunk .. L-2 of logits [L, V] (or [1, L, V])."""
    logits = logits.reshape(-1, logits.shape[-1])
    hits, nll = protocol.decoder_window_scores(logits, ids, chunk)
    return {"hits": hits, "nll": nll, "pred": logits[chunk:-1].argmax(-1).cpu().numpy()}


def _blocks(a: np.ndarray, size: int) -> list[np.ndarray]:
    return [a[i : i + size] for i in range(0, a.size, size)]


def accuracy(
    dense: dict, atp: dict, window: protocol.Windows, chunk: int, rank: int, keep=None, original=None
) -> dict[str, Any]:
    """Perplexities, top-1 and the top-1 agreement of ATP with dense on the same positions, with 95%
    intervals by bootstrap over blocks of ``chunk`` consecutive positions (one text: the blocks are
    not independent texts, so the intervals are a guide, not a guarantee). ``keep``: the exact sinks and
    window of the ATP run (its attended share counts them). ``original``: for a tuned model, the original
    model's dense scores on the same positions (tuning on docstrings also changes the dense model)."""
    if keep is not None and keep.drop_rest:
        rank = None  # no principal key: the window alone
    owner = window.module_of[0][chunk + 1 :]

    def scores(s: dict) -> protocol.DecoderScores:
        return protocol.DecoderScores(
            hits=_blocks(s["hits"], chunk), nll=_blocks(s["nll"], chunk), modules=_blocks(owner, chunk),
            shares=[protocol.mean_share(rank, int(window.ids[0].shape[1]), chunk, "past", keep)],
        )  # fmt: skip

    d = protocol.decoder_summary(scores(dense), window)
    a = protocol.decoder_summary(scores(atp), window, scores(dense))
    extra = {}
    if original is not None:
        o = protocol.decoder_summary(scores(original), window)
        vs = protocol.decoder_summary(scores(atp), window, scores(original))
        extra = {
            "original_dense_perplexity": o["perplexity"], "original_dense_perplexity_ci": o["perplexity_ci"],
            "perplexity_ratio_to_original_dense": vs["perplexity_ratio_to_reference"],
            "perplexity_ratio_to_original_dense_ci": vs["perplexity_ratio_to_reference_ci"],
            "top1_minus_original_dense": vs["top1_minus_reference"],
            "top1_minus_original_dense_ci": vs["top1_minus_reference_ci"],
        }  # fmt: skip
    agree = _blocks((dense["pred"] == atp["pred"]).astype(np.float64), chunk)
    share = protocol.ratio_of_sums(agree)
    return {
        "dense_perplexity": d["perplexity"], "dense_perplexity_ci": d["perplexity_ci"],
        "atp_perplexity": a["perplexity"], "atp_perplexity_ci": a["perplexity_ci"],
        "perplexity_ratio": a["perplexity_ratio_to_reference"],
        "perplexity_ratio_ci": a["perplexity_ratio_to_reference_ci"],
        "dense_top1": d["top1"], "atp_top1": a["top1"],
        "top1_minus_dense": a["top1_minus_reference"], "top1_minus_dense_ci": a["top1_minus_reference_ci"],
        "top1_agreement": share(np.arange(len(agree))),
        "top1_agreement_ci": protocol.bootstrap(share, len(agree)),
        "attended_share": a["attended_share"], "n_scored": d["n_scored"],
        "scored_per_module": d["scored_per_module"], **extra,
    }  # fmt: skip


def run_prefill(
    loaded: LoadedModel,
    L: int,
    *,
    form: str,
    rank: int,
    chunk: int = DEFAULT_CHUNK,
    basis_from: str = "input",
    method: str = "randomized",
    basis_update: str = "recompute",
    repeats: int = DEFAULT_REPEATS,
    max_repeats: int = DEFAULT_MAX_REPEATS,
    keep=None,
    original: LoadedModel | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Dense and ATP prefill of one held-out window of L tokens, timed in interleaved rounds (warmed up
    on a short prefix), and the last run of each scored on the same positions. ``keep``
    (:class:`atp_viz.analysis.serving.ExactKeep`): sinks and a window read exactly, only the middle
    compressed (or, with ``drop_rest``, left out: the window alone, whatever ``form`` says).
    ``original``: for a tuned model, the untouched base model, whose dense prefill is scored on the same
    positions too (not timed)."""
    from atp_viz.analysis import serving

    if not loaded.info.is_decoder:
        raise ValueError("--prefill needs a decoder (a causal LM); this model is an encoder.")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"--rank for --prefill is a number of principal keys (an int >= 1), got {rank!r}.")
    if not 1 <= chunk < L:
        raise ValueError(f"The chunk ({chunk}) must be at least 1 and smaller than --tokens ({L}).")
    if loaded.info.max_tokens < L:
        raise ValueError(f"{loaded.info.label} reads at most {loaded.info.max_tokens} tokens; got {L}.")
    forms.get(form)
    say = progress or (lambda f, m: None)
    window = protocol.heldout_windows(loaded.tokenizer, L, max_windows=1)
    if not window.ids:
        raise ValueError(f"The held-out text has fewer than {L} tokens; choose a smaller --tokens.")
    ids = window.ids[0].to(loaded.device)

    def dense(x=ids):
        # Inside an (empty) backend block the dense layers run torch SDPA; a bare call runs transformers'
        # eager attention (the backend's bit-for-bit default), which holds every L x L probability and
        # made dense look twice as slow as its multiply-adds say.
        with backend.activate(loaded.model):
            return loaded.model(input_ids=x, use_cache=False).logits

    if keep is not None and keep.drop_rest:
        form = "exact"  # the window alone is a softmax; no principal key is made

    def atp(x=ids):
        return serving.chunked_logits(
            loaded, x, rank=None if keep is not None and keep.drop_rest else rank, form=form, chunk=chunk,
            basis_from=basis_from, method=method, basis_update=basis_update, keep=keep,
        )  # fmt: skip

    say(0.02, f"prefill {L}: warming up on {min(L, 2 * chunk + 1)} tokens")
    with torch.inference_mode():
        short = ids[:, : min(L, 2 * chunk + 1)]
        dense(short), atp(short)
    kept: dict[str, dict] = {}
    done = [0]

    def record(name: str, out: torch.Tensor) -> None:
        kept[name] = _scored(out, ids, chunk)
        done[0] += 1
        say(min(0.95, 0.05 + 0.9 * done[0] / (2 * max_repeats)), f"prefill {L}: {name} run {done[0]}")

    t0 = time.perf_counter()
    times = timing.time_paths(
        {"dense": dense, "atp": atp}, repeats, 0, str(loaded.device), max_repeats=max_repeats, keep=record
    )
    d, a = timing.summary(times["dense"]), timing.summary(times["atp"])
    if original is not None:
        say(0.96, f"prefill {L}: the original model, dense")
        with torch.inference_mode(), backend.activate(original.model):
            kept["original"] = _scored(original.model(input_ids=ids, use_cache=False).logits, ids, chunk)
    macs = counted_macs(
        loaded, L, rank=rank, form=form, chunk=chunk, basis_from=basis_from, method=method,
        basis_update=basis_update, keep=keep,
    )  # fmt: skip
    return {
        "model": loaded.info.key, "label": loaded.info.label, "tokens": L, "form": form, "rank": rank,
        "chunk": chunk, "basis_from": basis_from, "basis_method": method, "basis_update": basis_update,
        "exact_sinks": keep.sinks if keep else 0, "exact_window": keep.window if keep else 0,
        "middle": None if keep is None else "dropped" if keep.drop_rest else "principal keys",
        "dense_seconds": d["median_s"], "atp_seconds": a["median_s"],
        "speedup": d["median_s"] / a["median_s"],
        "ceiling": macs["dense_total"] / macs["atp_total"],
        "dense_timing": d, "atp_timing": a, "macs": macs,
        **accuracy(kept["dense"], kept["atp"], window, chunk, rank, keep, kept.get("original")),
        "text": f"held-out window of {L} tokens (atp_viz.analysis.protocol.heldout_windows, max_windows=1)",
        "dense_how": "one forward of the whole window, the model's causal attention through torch SDPA",
        "atp_how": _how(keep, chunk, rank, basis_from, basis_update, method),
        "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _how(keep, chunk: int, rank: int, basis_from: str, basis_update: str, method: str) -> str:
    """What the ATP side of a prefill run computes, in words (for its JSON)."""
    head = f"strictly causal chunks of {chunk}: each attends to itself exactly"
    if keep is not None:
        head += f", to the first {keep.sinks} tokens and to the {keep.window} tokens before it exactly"
        if keep.drop_rest:
            return head + " (one softmax), and to nothing else of its past"
    source = "attention inputs X" if basis_from == "input" else "keys"
    update = (
        "from running sums of the past updated chunk by chunk and an eigendecomposition per chunk and layer"
        if basis_update == "moments"
        else f"{method} SVD of the whole past for every chunk and layer"
    )
    rest = "the rest of its past" if keep is not None else "its past"
    basis = f"basis from the past's {source}, {update}, timed"
    return f"{head}, and to {rest} compressed to {rank} principal keys ({basis})"


def crossover(runs: list[dict]) -> int | None:
    """The shortest measured length from which ATP is faster than dense at every longer one, or None."""
    ordered = sorted(runs, key=lambda r: r["tokens"])
    for i, run in enumerate(ordered):
        if all(r["speedup"] > 1 for r in ordered[i:]):
            return run["tokens"]
    return None


def report(runs: list[dict]) -> str:
    """The runs as a plain-text table."""
    lines = [
        "Prefill, dense SDPA vs ATP (strictly causal chunks), medians; accuracy on the same positions:",
        f"{'L':>6} {'dense s':>9} {'ATP s':>9} {'speedup':>8} {'ceiling':>8} {'dense ppl':>10} "
        f"{'ATP ppl':>10} {'top-1 agree':>12}",
    ]
    for r in sorted(runs, key=lambda r: r["tokens"]):
        lines.append(
            f"{r['tokens']:>6} {r['dense_seconds']:>9.2f} {r['atp_seconds']:>9.2f} {r['speedup']:>7.2f}x "
            f"{r['ceiling']:>7.2f}x {r['dense_perplexity']:>10.2f} {r['atp_perplexity']:>10.2f} "
            f"{r['top1_agreement']:>12.3f}"
        )
    if runs:
        r = runs[0]
        window = _ranks.describe_window(r.get("exact_window", 0), r.get("exact_sinks", 0))
        if r.get("middle") == "dropped":
            setting = f"{window} alone"
        else:
            setting = f"form {r['form']}, r = {r['rank']}" + (f", {window}" if r.get("middle") else "")
        lines.append(f"{r['label']}, {setting}, chunk {r['chunk']}.")
        cross = crossover(runs)
        lines.append(
            f"ATP faster than dense from L = {cross} on." if cross else "ATP was not faster at any length."
        )
    return "\n".join(lines)


def nan_to_none(obj):
    """JSON has no NaN: a figure that could not be computed is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj
