"""The evaluation protocol behind every accuracy figure: held-out data, scored positions, intervals.

Fine-tuning's held-out metrics, the serving perplexity grid and the prefill benchmark's accuracy all
use this module, so their numbers are comparable:

- **Held-out data** comes from every held-out module (:data:`atp_viz.text.corpus.HELDOUT_MODULES`,
  never trained on; near-duplicates are filtered out of training, see ``corpus.near_duplicates``).
  Decoders: the modules' docstrings as one stream (modules in a fixed seeded order), cut into
  non-overlapping windows; all of them, or an evenly spread subset. Encoders: texts of whole
  paragraphs from every module. Each result records how many predictions (or texts) each module gave
  (``scored_per_module``).
- **Scored positions** (decoders): the predictions made from positions whose past is compressed,
  i.e. positions ``chunk .. L - 2`` of each window (chunk 0 has no past to compress). Every table that
  reports a decoder's top-1 or perplexity scores exactly these positions, dense included.
- **Rank** (decoders): the rank of the compressed past under a mode of :mod:`atp_viz.core.ranks`
  (``past`` or ``effective``), reported together with the mean attended share of the key set.
- **Intervals**: 95% percentile bootstrap over windows (decoders) or texts (encoders), fixed seed,
  :data:`BOOTSTRAP` resamples. Two settings are compared on the same positions (paired): the
  interval of a difference resamples the same windows for both.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atp_viz.core.basis import NonFiniteError
from atp_viz.core.progress import ProgressFn
from atp_viz.core.ranks import RANK_MODES, attended_share, chunk_rank, describe_layer_shares, describe_window
from atp_viz.text import corpus

BOOTSTRAP = 2000
SEED = 0
LEVEL = 0.95


# --------------------------------------------------------------------------------------------------
# Held-out data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Token windows ``[1, L]`` of the held-out stream and, per window, each position's module index."""

    ids: tuple[torch.Tensor, ...]
    module_of: tuple[np.ndarray, ...]  # [L] ints into module_names
    module_names: tuple[str, ...]


def _module_order(modules: Sequence[str], seed: int) -> list[str]:
    order = list(modules)
    random.Random(seed).shuffle(order)
    return order


def _spread(n_items: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``range(n_items)`` (all of them when ``n`` is None or larger)."""
    if n is None or n >= n_items:
        return list(range(n_items))
    return sorted({int(i * n_items / n) for i in range(n)})


def heldout_windows(tokenizer, seq_len: int, *, max_windows: int | None = None, seed: int = SEED) -> Windows:
    """Non-overlapping windows of ``seq_len`` tokens over every held-out module's docstrings (one stream,
    modules in a seeded order, so windows cross module boundaries); ``max_windows`` keeps an evenly
    spread subset. The last partial window is dropped."""
    return module_windows(tokenizer, corpus.HELDOUT_MODULES, seq_len, max_windows=max_windows, seed=seed)


def module_windows(
    tokenizer, modules: Sequence[str], seq_len: int, *, max_windows: int | None = None, seed: int = SEED
) -> Windows:
    """:func:`heldout_windows` over other modules (e.g. the training split, where a setting may be chosen
    without looking at held-out text)."""
    names = _module_order(modules, seed)
    ids, owner = [], []
    for i, name in enumerate(names):
        text = "\n\n".join(corpus.module_docstrings(name))
        if not text:
            continue
        piece = tokenizer(text + "\n\n", add_special_tokens=False, verbose=False)["input_ids"]
        ids += piece
        owner += [i] * len(piece)
    stream, owners = torch.tensor(ids), np.asarray(owner)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"These modules hold {len(ids)} tokens, fewer than one window of {seq_len}: use "
                         "shorter windows.")  # fmt: skip
    keep = _spread(n, max_windows)
    return Windows(
        ids=tuple(stream[k * seq_len : (k + 1) * seq_len][None] for k in keep),
        module_of=tuple(owners[k * seq_len : (k + 1) * seq_len] for k in keep),
        module_names=tuple(names),
    )


def heldout_texts(
    tokenizer, *, min_tokens: int = 24, max_tokens: int = 128, max_texts: int | None = None, seed: int = SEED
) -> tuple[list[str], list[str]]:
    """(texts, module of each text): every held-out module's docstrings cut at paragraph boundaries to at
    most ``max_tokens`` tokens (at least ``min_tokens``), modules interleaved round-robin in a seeded
    order; ``max_texts`` keeps the first ones of that interleaving (so every module is represented)."""
    from atp_viz.analysis.finetune.data import paragraph_texts

    per_module = [(m, paragraph_texts(corpus.module_docstrings(m), tokenizer, min_tokens, max_tokens))
                  for m in _module_order(corpus.HELDOUT_MODULES, seed)]  # fmt: skip
    texts, modules = [], []
    depth = 0
    while any(depth < len(t) for _, t in per_module):
        for m, t in per_module:
            if depth < len(t):
                texts.append(t[depth])
                modules.append(m)
        depth += 1
    if max_texts is not None:
        texts, modules = texts[:max_texts], modules[:max_texts]
    return texts, modules


def counts_by(labels: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------


def bootstrap(
    stat: Callable[[np.ndarray], float], n_clusters: int, *, resamples: int = BOOTSTRAP, seed: int = SEED
) -> tuple[float, float]:
    """95% percentile interval of ``stat(indices)`` over resamples of ``n_clusters`` clusters (windows or
    texts) with replacement; ``stat`` receives the resampled cluster indices."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n_clusters, n_clusters)) for _ in range(resamples)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def interval(value: float, ci: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    """``0.482 [0.471, 0.493]``: a figure with its 95% interval, as every table prints it."""
    v, lo, hi = (x * scale for x in (value, *ci))
    if max(abs(v), abs(lo), abs(hi)) >= 1e5:  # a perplexity that broke down: 1.86e+08, not 186085779.65
        return f"{v:.3g} [{lo:.3g}, {hi:.3g}]"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# --------------------------------------------------------------------------------------------------
# Decoders: strictly causal next-token prediction on windows
# --------------------------------------------------------------------------------------------------


@dataclass
class DecoderScores:
    """One setting on every window: per window, the scored predictions' hits and NLLs (nats), and the
    module of each predicted token; the mean attended share of the key set over scored positions."""

    hits: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    modules: list[np.ndarray] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    broken: int = 0  # windows on which the setting broke down (inf/NaN), left out

    @property
    def n(self) -> int:
        return int(sum(h.size for h in self.hits))


def decoder_window_scores(
    logits: torch.Tensor, ids: torch.Tensor, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hits and NLLs of the predictions made at positions ``chunk .. L - 2`` (those with a compressed
    past): logits at position i predict token i + 1."""
    target = ids[0, chunk + 1 :].to(logits.device)
    pred = logits[chunk:-1].float()
    nll = torch.nn.functional.cross_entropy(pred, target, reduction="none")
    return (pred.argmax(-1) == target).cpu().numpy(), nll.detach().cpu().numpy().astype(np.float64)


def mean_share(rank, seq_len: int, chunk: int, mode: str, keep=None) -> float:
    """Mean attended share of the key set over the scored positions of a window (1.0 for dense).
    ``keep`` (:class:`atp_viz.analysis.serving.ExactKeep`): sinks and window read exactly, the middle's
    principal keys (none when dropped) standing for the middle."""
    if rank is None and (keep is None or not keep.drop_rest):
        return 1.0
    shares = []
    for start in range(chunk, seq_len - 1, chunk):
        n_q = min(
            chunk, seq_len - 1 - start
        )  # scored queries of this chunk (the last position predicts nothing)
        if keep is None:
            r = chunk_rank(rank, start, min(chunk, seq_len - start), mode)
        else:  # the exact sinks and window count as themselves, the middle as its r principal keys
            a, b = keep.split(start)
            r = start - (b - a) + (chunk_rank(rank, b - a, chunk, mode) if rank and b > a else 0)
        shares += attended_share(r, start, n_q)
    return float(np.mean(shares))


def score_decoder(
    loaded,
    windows: Windows,
    *,
    rank,
    form: str,
    chunk: int,
    rank_mode: str = "past",
    basis_from: str = "input",
    keep=None,
    basis_update: str = "recompute",
    progress: ProgressFn | None = None,
    layer_ranks=None,
    centre_basis: bool = False,
) -> DecoderScores:
    """Strictly causal chunked predictions of every window (``rank`` None: dense, the past exact;
    ``keep``: sinks and a window read exactly, :class:`atp_viz.analysis.serving.ExactKeep`;
    ``basis_update``, ``layer_ranks`` and ``centre_basis``: as in
    :func:`atp_viz.analysis.serving.chunked_logits`)."""
    from atp_viz.analysis import serving

    if rank_mode not in RANK_MODES:
        raise ValueError(f"rank mode must be one of {', '.join(RANK_MODES)}, got {rank_mode!r}.")
    out = DecoderScores()
    for i, (ids, owner) in enumerate(zip(windows.ids, windows.module_of, strict=True)):
        try:
            with torch.inference_mode():
                logits = serving.chunked_logits(
                    loaded, ids, rank=rank, form=form, chunk=chunk, rank_mode=rank_mode,
                    basis_from=basis_from, keep=keep, basis_update=basis_update, layer_ranks=layer_ranks,
                    centre_basis=centre_basis,
                )  # fmt: skip
        except NonFiniteError:
            out.broken += 1
            continue
        hits, nll = decoder_window_scores(logits, ids, chunk)
        out.hits.append(hits)
        out.nll.append(nll)
        out.modules.append(owner[chunk + 1 :])
        if progress:
            progress((i + 1) / len(windows.ids), f"window {i + 1} of {len(windows.ids)}")
    seq_len = windows.ids[0].shape[1] if windows.ids else 0
    by_layer = [rank] if rank is None or layer_ranks is None else layer_ranks  # the mean over layers
    out.shares.append(float(np.mean([mean_share(r, seq_len, chunk, rank_mode, keep) for r in by_layer])))
    return out


def ratio_of_sums(
    num: list[np.ndarray], den: list[np.ndarray] | None = None
) -> Callable[[np.ndarray], float]:
    """A statistic for :func:`bootstrap`: the pooled mean (sum over sum of sizes) of the chosen clusters."""
    sums = np.array([a.sum() for a in num], dtype=np.float64)
    sizes = np.array([a.size for a in (den or num)], dtype=np.float64)
    return lambda idx: float(sums[idx].sum() / sizes[idx].sum())


def decoder_summary(scores: DecoderScores, windows: Windows, reference: DecoderScores | None = None) -> dict:
    """Top-1 and perplexity with 95% intervals (bootstrap over windows), the scored counts per module,
    and, against ``reference`` on the same windows (paired), the top-1 difference and perplexity ratio
    with their intervals."""
    n_win = len(scores.hits)
    if n_win == 0:
        return {"n_scored": 0, "n_windows": 0, "n_broken": scores.broken}
    top1 = ratio_of_sums(scores.hits)
    mean_nll = ratio_of_sums(scores.nll)
    all_idx = np.arange(n_win)
    names = windows.module_names
    row = {
        "top1": top1(all_idx),
        "top1_ci": bootstrap(top1, n_win),
        "perplexity": math.exp(mean_nll(all_idx)),
        "perplexity_ci": tuple(math.exp(x) for x in bootstrap(mean_nll, n_win)),
        "n_scored": scores.n,
        "n_windows": n_win,
        "scored_per_module": counts_by([names[k] for m in scores.modules for k in m]),
        "attended_share": scores.shares[0] if scores.shares else 1.0,
    }
    if scores.broken:
        row["n_broken"] = scores.broken
    if (
        reference is not None
        and scores.broken == 0
        and reference.broken == 0
        and len(reference.hits) == n_win
    ):
        row.update(_paired(scores, reference))
    return row


def _paired(a: DecoderScores, b: DecoderScores) -> dict:
    """a minus b on the same windows: top-1 difference and perplexity ratio, with bootstrap intervals."""
    hits_a = np.array([h.sum() for h in a.hits], dtype=np.float64)
    hits_b = np.array([h.sum() for h in b.hits], dtype=np.float64)
    nll_a = np.array([x.sum() for x in a.nll])
    nll_b = np.array([x.sum() for x in b.nll])
    size = np.array([h.size for h in a.hits], dtype=np.float64)

    def diff(idx):
        return float((hits_a[idx].sum() - hits_b[idx].sum()) / size[idx].sum())

    def ratio(idx):
        return float(math.exp((nll_a[idx].sum() - nll_b[idx].sum()) / size[idx].sum()))

    idx = np.arange(len(size))
    return {
        "top1_minus_reference": diff(idx),
        "top1_minus_reference_ci": bootstrap(diff, len(size)),
        "perplexity_ratio_to_reference": ratio(idx),
        "perplexity_ratio_to_reference_ci": bootstrap(ratio, len(size)),
    }


# --------------------------------------------------------------------------------------------------
# Encoders: sentence embeddings of held-out texts
# --------------------------------------------------------------------------------------------------


def encoder_summary(cosines: np.ndarray, modules: Sequence[str], reference: np.ndarray | None = None) -> dict:
    """Mean / min cosine to the reference embeddings with a 95% interval of the mean (bootstrap over
    texts), texts per module, and the paired difference to another setting's cosines if given."""
    cos = np.asarray(cosines, dtype=np.float64)
    n = cos.size

    def mean(idx):
        return float(cos[idx].mean())

    row = {
        "cosine_mean": float(cos.mean()),
        "cosine_mean_ci": bootstrap(mean, n),
        "cosine_min": float(cos.min()),
        "n_texts": n,
        "scored_per_module": counts_by(modules),
    }
    if reference is not None:
        d = cos - np.asarray(reference, dtype=np.float64)
        row["cosine_minus_reference"] = float(d.mean())
        row["cosine_minus_reference_ci"] = bootstrap(lambda idx: float(d[idx].mean()), n)
    return row


def text_windows(
    tokenizer, text: str, seq_len: int, label: str = "text", *, max_windows: int | None = None
) -> Windows:
    """A user's text cut into non-overlapping windows of ``seq_len`` tokens (the last partial one
    dropped; ``max_windows`` keeps an evenly spread subset), all labelled ``label``; ValueError when not
    even one window fits."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        tokens = f"{len(ids)} token{'' if len(ids) == 1 else 's'}"
        raise ValueError(f"The text has {tokens}, fewer than one window of {seq_len}: use a longer text or a "
                         "shorter window.")  # fmt: skip
    stream, keep = torch.tensor(ids), _spread(n, max_windows)
    return Windows(
        ids=tuple(stream[k * seq_len : (k + 1) * seq_len][None] for k in keep),
        module_of=tuple(np.zeros(seq_len, dtype=int) for _ in keep),
        module_names=(label,),
    )


def perplexity_grid(
    loaded,
    windows: Windows,
    settings: Sequence[tuple[int | float, str]],
    *,
    chunk: int,
    rank_mode: str = "past",
    basis_from: str = "input",
    keep=None,
    progress: ProgressFn | None = None,
    original=None,
    basis_update: str = "recompute",
    layer_split: Callable[[float], tuple[float, ...] | None] | None = None,
    centre_basis: bool = False,
) -> list[dict]:
    """Dense, then each ``(rank, form)`` setting, on the same windows and scored positions: top-1 and
    perplexity with intervals, and each setting's paired difference to dense. One row per setting.
    ``basis_from``, ``centre_basis`` and ``keep`` (sinks and a window read exactly, the middle compressed)
    apply to every ATP setting; with ``keep``, the window alone (the middle dropped) is a row of its own
    after dense.

    ``original`` (a fine-tuned model's base model): its dense scores come first as the row "original
    dense", and every row also gets its paired difference to it (``top1_minus_original_dense``,
    ``perplexity_ratio_to_original_dense``), so a tuned model is checked against the untouched one.

    ``basis_update="moments"`` (running sums of the past) applies to the forms that can use it (``linear``,
    ``pksoftmax``); a form that rebuilds past keys from U_r recomputes its basis, and each row says which
    it used (``basis_update``).

    ``layer_split`` (a share of L -> one share per layer, e.g. the spectra's split of that budget, or None
    for one rank): each ATP setting with a share it splits runs its layers at their own shares, and its
    row lists them (``layer_ranks``); a setting with a key count keeps one rank."""
    from atp_viz import forms
    from atp_viz.core.progress import within

    if not loaded.info.is_decoder:
        raise ValueError("perplexity needs a decoder (causal LM)")
    if windows.ids and chunk >= windows.ids[0].shape[1] - 1:
        raise ValueError(f"The chunk ({chunk}) must be shorter than a window ({windows.ids[0].shape[1]}).")
    runs = [(None, "exact"), *settings]
    if keep is not None:
        runs.insert(1, ("window", "exact"))
    rows, dense, base = [], None, None
    n = len(runs) + (original is not None)
    if original is not None:
        sub = within(progress, 0.0, 1 / n, "original model, dense: ")
        base = score_decoder(original, windows, rank=None, form="exact", chunk=chunk, progress=sub)
        rows.append({"rank": "original dense", "form": "-", **decoder_summary(base, windows)})
    for j, (rank, form) in enumerate(runs, start=n - len(runs)):
        label = "dense" if rank is None else "window alone" if rank == "window" else f"{form} r={rank:g}"
        sub = within(progress, j / n, (j + 1) / n, f"{label}: ")
        if rank == "window":
            drop = dataclasses.replace(keep, drop_rest=True)
            scores = score_decoder(
                loaded, windows, rank=None, form=form, chunk=chunk, keep=drop, progress=sub
            )
        else:
            update = "recompute" if rank is None or forms.get(form).needs_basis_rows else basis_update
            per_layer = layer_split(rank) if layer_split and isinstance(rank, float) else None
            scores = score_decoder(
                loaded, windows, rank=rank, form=form, chunk=chunk, rank_mode=rank_mode,
                basis_from=basis_from, keep=keep, basis_update=update, progress=sub, layer_ranks=per_layer,
                centre_basis=centre_basis,
            )  # fmt: skip
        dense = scores if rank is None else dense
        row = {"rank": "dense" if rank is None else rank, "form": "-" if rank in (None, "window") else form}
        if rank not in (None, "window"):
            row["basis_update"] = update
            if per_layer is not None:
                row["layer_ranks"] = list(per_layer)
        if keep is not None and rank is not None:
            row.update(
                sinks=keep.sinks,
                window=keep.window,
                middle="dropped" if rank == "window" else "principal keys",
            )
        row.update(decoder_summary(scores, windows, None if rank is None else dense))
        if base is not None:
            vs = decoder_summary(scores, windows, base)
            for key in ("top1_minus_reference", "perplexity_ratio_to_reference"):
                if key in vs:
                    new = key.replace("reference", "original_dense")
                    row[new], row[f"{new}_ci"] = vs[key], vs[f"{key}_ci"]
        rows.append(row)
    return rows


def grid_table(rows: Sequence[dict]) -> list[dict]:
    """The grid as flat rows for display and export: figures with their intervals as text and numbers."""
    out = []
    for r in rows:
        exact = f", {describe_window(r['window'], r['sinks'])}" if "window" in r else ""
        exact += " (running sums)" if r.get("basis_update") == "moments" else ""
        exact += (
            f" on average, per layer {describe_layer_shares(r['layer_ranks'])}" if "layer_ranks" in r else ""
        )
        flat = {
            "rank": ("middle dropped" if r["rank"] == "window" else str(r["rank"])) + exact,
            "form": r["form"],
            "attended share": round(r.get("attended_share", 1.0), 3),
            "top-1 [95% CI]": interval(r["top1"], r["top1_ci"]) if r.get("n_scored") else "broke down",
            "perplexity [95% CI]": interval(r["perplexity"], r["perplexity_ci"], 2)
            if r.get("n_scored")
            else "-",
        }
        if "top1_minus_reference" in r:
            flat["top-1 - dense, pt [95% CI]"] = interval(
                r["top1_minus_reference"], r["top1_minus_reference_ci"], 1, scale=100
            )
        if "top1_minus_original_dense" in r:
            flat["top-1 - original dense, pt [95% CI]"] = interval(
                r["top1_minus_original_dense"], r["top1_minus_original_dense_ci"], 1, scale=100
            )
        flat["scored predictions"] = r.get("n_scored", 0)
        out.append(flat)
    return out
