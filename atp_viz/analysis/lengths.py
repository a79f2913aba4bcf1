"""Analyses that run a model over several inputs (the pure maths lives in ``spectra``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atp_viz.analysis import spectra
from atp_viz.analysis.capture import capture
from atp_viz.core.progress import ProgressFn
from atp_viz.hf.model_info import LoadedModel
from atp_viz.text.inputs import Tokenized, tokenize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LengthStudy:
    """Rank needed / L for each layer (rows) at each input (columns), sorted by length."""

    lengths: np.ndarray  # [n_points] tokens
    labels: tuple[str, ...]  # [n_points] where each point came from
    fractions: np.ndarray  # [n_layers, n_points]
    threshold: float
    centered: bool
    skip_first: bool
    notes: tuple[str, ...]

    @property
    def mean_fraction(self) -> np.ndarray:
        return self.fractions.mean(axis=0)


def _prefix(tok: Tokenized, n: int) -> Tokenized:
    return Tokenized(
        input_ids=tok.input_ids[:, :n],
        attention_mask=tok.attention_mask[:, :n],
        tokens=tok.tokens[:n],
        n_original=n,
        max_tokens=tok.max_tokens,
    )


def length_study(
    loaded: LoadedModel,
    texts: Sequence[tuple[str, str]],
    *,
    threshold: float = 0.9,
    centered: bool = False,
    skip_first: bool = False,
    prefixes_of_longest: bool = True,
    max_tokens: int | None = None,
    progress: ProgressFn | None = None,
) -> LengthStudy:
    """How the fraction of components needed changes with sequence length, for this model.

    Each text in ``texts`` (label, text) is one point; with ``prefixes_of_longest`` the longest text
    is also cut at geometric lengths (16, 32, 64, ...), which separates the effect of length from
    the effect of genre. Inputs longer than the model's limit are truncated, and that is noted.
    """
    limit = min(loaded.info.max_tokens, max_tokens or loaded.info.max_tokens)
    toks = [(label, tokenize(loaded.tokenizer, text, limit)) for label, text in texts]
    notes = [f"{label}: {t.notice}" for label, t in toks if t.notice]
    inputs: list[tuple[str, Tokenized]] = list(toks)
    if prefixes_of_longest and toks:
        label, longest = max(toks, key=lambda lt: lt[1].n_tokens)
        for n in spectra.prefix_lengths(longest.n_tokens)[:-1]:
            if n >= 4:
                inputs.append((f"{label}[:{n}]", _prefix(longest, n)))
    inputs.sort(key=lambda lt: lt[1].n_tokens)
    cols = []
    for j, (label, tok) in enumerate(inputs):
        if progress:
            progress(j / len(inputs), f"{label} ({tok.n_tokens} tokens)")
        with torch.inference_mode():
            cap = capture(loaded, tok, attentions="none")
        sps = spectra.layer_spectra(
            [layer.x for layer in cap.layers], centered=centered, skip_first=skip_first
        )
        cols.append([sp.fraction_for(threshold) for sp in sps])
    if progress:
        progress(1.0, "done")
    return LengthStudy(
        lengths=np.array([t.n_tokens for _, t in inputs]),
        labels=tuple(label for label, _ in inputs),
        fractions=np.array(cols).T,
        threshold=threshold,
        centered=centered,
        skip_first=skip_first,
        notes=tuple(notes),
    )


def effective_rank_by_length(
    loaded: LoadedModel, text: str, *, progress: ProgressFn | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Effective rank of every layer's X on geometric prefixes of ``text`` (16, 32, ..., all tokens).

    Returns (lengths ``[n_points]``, effective ranks ``[n_layers, n_points]``). Each prefix is run on
    its own, so an encoder sees only the prefix (for a decoder this equals slicing one run).
    """
    tok = tokenize(loaded.tokenizer, text, loaded.info.max_tokens)
    lengths = [n for n in spectra.prefix_lengths(tok.n_tokens) if n >= 2]
    cols = []
    for j, n in enumerate(lengths):
        if progress:
            progress(j / len(lengths), f"prefix of {n} tokens")
        cap = capture(loaded, _prefix(tok, n), attentions="none")
        cols.append([spectra.spectrum(layer.x).effective_rank for layer in cap.layers])
    return np.array(lengths), np.array(cols).T


def sink_ratio(x: np.ndarray) -> float:
    """Norm of the first token's row of X over the median row norm (attention sinks: >> 1)."""
    norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    if norms.size < 2:
        return 1.0
    med = float(np.median(norms[1:]))
    return float(norms[0] / med) if med > 0 else float("inf")


def describe_length_trend(study: LengthStudy, d_model: int) -> str:
    """One honest sentence on whether longer inputs need a smaller fraction of components here."""
    lengths, mean = study.lengths, study.mean_fraction
    if lengths.size < 2 or lengths.min() == lengths.max():
        return "Only one sequence length was measured; no trend can be read."
    short, long_ = int(np.argmin(lengths)), int(np.argmax(lengths))
    ceiling = min(1.0, d_model / lengths[long_])
    trend = "falls" if mean[long_] < mean[short] else "does not fall"
    sentence = (
        f"Averaged over layers, the fraction of components needed for {study.threshold:.0%} energy {trend} "
        f"from {mean[short]:.0%} of L at L = {lengths[short]} to {mean[long_]:.0%} at L = {lengths[long_]}."
    )
    if ceiling < 1.0:
        sentence += (
            f" Note that at L = {lengths[long_]} no matrix can need more than d/L = {ceiling:.0%} "
            f"(rank <= d = {d_model}), so only the gap below that ceiling "
            f"({ceiling - mean[long_]:.0%} here) is evidence of low rank."
        )
    return sentence
