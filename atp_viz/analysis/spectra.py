"""Singular-value spectra of attention inputs and keys: pure functions, arrays in, arrays out.

Definitions used throughout (and shown in the UI):

- singular values s_1 >= s_2 >= ... of X (``[L, d]``), uncentred (SVD, what ATP uses: its basis is
  the top left singular vectors of X itself) or centred (PCA: the mean token is subtracted first);
- energy of component i: s_i^2 / sum_j s_j^2; cumulative energy E(k) = sum_{i<=k} s_i^2 / sum_j s_j^2;
- rank needed for a threshold t: the smallest k with E(k) >= t;
- effective rank (Roy & Vetterli, 2007): exp(H(p)) with p_i = s_i / sum_j s_j and
  H(p) = -sum_i p_i log p_i. It is 1 for a rank-1 matrix and min(L, d) for a flat spectrum.

The first token of a decoder is often an attention sink with activations tens of times larger than
the rest; it alone can make X look "rank 1 at 90% energy". ``skip_first`` leaves it out so the user
can see the structure of the other tokens; the UI explains why the option exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

THRESHOLDS: tuple[float, ...] = (0.9, 0.95, 0.99)
EFFECTIVE_RANK_FORMULA = (
    r"\operatorname{erank}(X) = \exp\Big(-\sum_i p_i \log p_i\Big),"
    r"\quad p_i = \frac{\sigma_i}{\sum_j \sigma_j}"
)


@dataclass(frozen=True)
class Spectrum:
    """The spectrum of one matrix with ``n_rows`` rows (tokens) and ``n_cols`` features."""

    singular_values: np.ndarray  # [min(n_rows, n_cols)], descending
    n_rows: int
    n_cols: int
    centered: bool

    @property
    def normalized(self) -> np.ndarray:
        """s_i / s_1."""
        s = self.singular_values
        return s / s[0] if s.size and s[0] > 0 else np.zeros_like(s)

    @property
    def energy(self) -> np.ndarray:
        """s_i^2 / sum_j s_j^2."""
        e = self.singular_values.astype(np.float64) ** 2
        total = e.sum()
        return e / total if total > 0 else np.zeros_like(e)

    @property
    def cumulative_energy(self) -> np.ndarray:
        return np.cumsum(self.energy)

    def rank_for(self, threshold: float) -> int:
        return rank_for_energy(self.singular_values, threshold)

    @property
    def effective_rank(self) -> float:
        return effective_rank(self.singular_values)

    def fraction_for(self, threshold: float) -> float:
        """Rank needed as a fraction of the number of tokens (r / L: what ATP's cost depends on)."""
        return self.rank_for(threshold) / self.n_rows


def skip_first_refusal(n_tokens: int) -> str | None:
    """Why the first token cannot be left out of a text of ``n_tokens`` (None: it can). Two tokens would
    leave one, a rank-1 matrix by definition: no spectrum to read."""
    if n_tokens >= 3:
        return None
    return f"Leaving out the first token needs at least 3 tokens; the text has {n_tokens}."


def singular_values(
    x: np.ndarray | torch.Tensor, *, centered: bool = False, skip_first: bool = False
) -> np.ndarray:
    """Singular values of ``x`` ``[L, d]`` (float64, descending); optionally centred / without row 0."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        t = torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: captured arrays are read-only
    if t.ndim != 2:
        raise ValueError(f"expected a matrix [L, d], got shape {tuple(t.shape)}")
    if skip_first:
        t = t[1:]
    if t.shape[0] == 0:
        raise ValueError("The text has a single token: leaving out the first leaves nothing to analyse.")
    if centered:
        t = t - t.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(t).numpy()


def basis_values(x: np.ndarray | torch.Tensor, *, centre: bool = False) -> np.ndarray:
    """The singular values of ``x`` ``[L, d]`` in the order a basis of it keeps them (their squares: the
    energy each further column keeps). ``centre=True``: the centred basis's
    (:func:`atp_viz.core.basis.principal_basis`): its mean column keeps sqrt(L) |mean token|, then the
    centred input's singular values follow; as many values as ``x`` has (min(L, d)). The mean's value
    need not be the largest, so this curve need not be concave at its first step."""
    if not centre:
        return singular_values(x)
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    mean_part = np.sqrt(a.shape[0]) * np.linalg.norm(a.mean(axis=0))
    return np.concatenate([[mean_part], singular_values(a, centered=True)])[: min(a.shape)]


def spectrum(x: np.ndarray | torch.Tensor, *, centered: bool = False, skip_first: bool = False) -> Spectrum:
    s = singular_values(x, centered=centered, skip_first=skip_first)
    n_rows = x.shape[0] - (1 if skip_first else 0)
    return Spectrum(singular_values=s, n_rows=n_rows, n_cols=x.shape[1], centered=centered)


def rank_for_energy(s: np.ndarray, threshold: float) -> int:
    """Smallest k with sum_{i<=k} s_i^2 >= threshold * sum_i s_i^2 (0 for an all-zero matrix)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 0
    cum = np.cumsum(e) / total
    # A small tolerance so that threshold 1.0 is reached despite rounding in the cumulative sum.
    return int(np.searchsorted(cum, threshold - 1e-12) + 1)


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = s_i / sum_j s_j (see module docstring)."""
    s = np.asarray(s, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def layer_spectra(
    xs: Sequence[np.ndarray], *, centered: bool = False, skip_first: bool = False
) -> list[Spectrum]:
    """One spectrum per layer, from each layer's attention input X ``[L, d]``."""
    return [spectrum(x, centered=centered, skip_first=skip_first) for x in xs]


def head_spectra(k: np.ndarray, *, centered: bool = False, skip_first: bool = False) -> list[Spectrum]:
    """One spectrum per key/value head, from keys ``[Hkv, L, dh]``."""
    return [spectrum(kh, centered=centered, skip_first=skip_first) for kh in k]


def ranks_table(spectra: Sequence[Spectrum], thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """``[n_layers, n_thresholds]`` ranks needed (int)."""
    return np.array([[sp.rank_for(t) for t in thresholds] for sp in spectra], dtype=np.int64)


def prefix_lengths(n_tokens: int, *, start: int = 16, factor: float = 2.0) -> list[int]:
    """Geometric prefix lengths up to ``n_tokens`` (which is always included)."""
    out, n = [], start
    while n < n_tokens:
        out.append(int(n))
        n *= factor
    out.append(n_tokens)
    return out


# --------------------------------------------------------------------------------------------------
# Per-layer ranks under one budget
# --------------------------------------------------------------------------------------------------

ALLOCATION_GRID = 64  # shares of L are allocated in steps of 1/64


def energy_curve(s: np.ndarray, grid: int = ALLOCATION_GRID) -> np.ndarray:
    """Cumulative energy E at shares 0, 1/grid, ..., 1 of the singular values (linear in between):
    ``[grid + 1]``, from 0 to 1, concave (the values are sorted)."""
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return np.linspace(0.0, 1.0, grid + 1)
    cum = np.concatenate([[0.0], np.cumsum(e) / total])
    return np.interp(np.linspace(0, 1, grid + 1), np.linspace(0, 1, e.size + 1), cum)


def allocate(curves: np.ndarray, share: float) -> tuple[float, ...]:
    """Per-layer shares of L with mean ``share`` (one budget) that keep the most energy summed over
    layers: ``curves`` ``[n_layers, grid + 1]`` (:func:`energy_curve`, e.g. averaged over calibration
    texts). Every layer keeps at least one step; the rest of the budget goes, step by step, to whichever
    layer gains the most energy from it. The curves are concave, so this greedy choice is optimal."""
    curves = np.asarray(curves, dtype=np.float64)
    n_layers, grid = curves.shape[0], curves.shape[1] - 1
    if not 0 < share <= 1:
        raise ValueError(f"The budget must be a share of L in (0, 1], got {share}.")
    steps = max(n_layers, round(share * grid * n_layers))
    gains = np.diff(curves, axis=1)  # [n_layers, grid]: energy of each further step
    taken = np.ones(n_layers, dtype=int)
    # Step-major order, so equal gains go round the layers (a flat spectrum everywhere: equal shares).
    rest = gains[:, 1:].T.ravel()
    order = np.argsort(-rest, kind="stable")[: steps - n_layers]
    np.add.at(taken, order % n_layers, 1)
    return tuple(float(k) / grid for k in taken)
