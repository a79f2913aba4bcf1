"""One query token of one layer and head, the way a reader follows attention: where it looks under dense
attention and under ATP, which principal keys it weighs, and what each of those keys is made of.

Also which key columns of a map are *attention sinks* (a token that takes a large share of every row's
weight, typically the first one in a decoder), so that a map can be drawn without them.

Shapes (one sequence, L tokens, r principal keys): a map row is ``[L]``, the principal weights ``[r]``,
the basis U_r ``[L, r]`` (column a: principal key a's loadings on the tokens). Library code: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp_viz.analysis.compare import AttentionMaps

SINK_SHARE = 0.1  # a sink column holds at least this share of the rows' weight on average...
SINK_FACTOR = 10.0  # ...and at least this many times the share 1/L of a uniform map


def sink_columns(
    dense: np.ndarray, *, share: float = SINK_SHARE, factor: float = SINK_FACTOR
) -> tuple[int, ...]:
    """Key columns of a dense attention map ``[L, L]`` (rows sum to 1) that take, averaged over all query
    rows, at least ``share`` of a row's weight and at least ``factor`` times the uniform share 1/L.

    On SmolLM2 the first token takes 28% to 61% of a row's weight on average in layers 12 to 28
    (``docs/results/sinks-smollm2.json``): a linear colour
    scale then spends its whole range on that one column."""
    if dense.ndim != 2 or dense.shape[0] == 0:
        raise ValueError(f"expected a non-empty [L, L] map, got shape {dense.shape}")
    mean = np.nanmean(np.asarray(dense, dtype=np.float64), axis=0)
    threshold = max(share, factor / dense.shape[1])
    return tuple(int(j) for j in np.flatnonzero(mean >= threshold))


@dataclass(frozen=True)
class QueryView:
    """Query token ``query`` of one layer and head.

    The sign of a basis vector is arbitrary (U_r and -U_r span the same keys), and so is the sign of a
    principal key's weight: only their product means something. Each loading column is therefore
    oriented so that this query's weight on that key is >= 0; a positive loading then means "this
    token's key and value enter what the query reads through this principal key"."""

    query: int
    dense: np.ndarray  # [L] dense attention of the query over the key tokens
    atp: np.ndarray  # [L] ATP's weights on the key tokens (the lifted map's row)
    weights: np.ndarray  # [r] |weight| of the query on each principal key (in singular-value order)
    loadings: np.ndarray  # [L, r] U_r, each column oriented so that its weight is >= 0
    form: str

    @property
    def order(self) -> np.ndarray:
        """Principal keys by weight, largest first (ties: the key of the larger singular value first)."""
        return np.argsort(-self.weights, kind="stable")

    def top(self, k: int) -> np.ndarray:
        return self.order[: max(0, int(k))]

    @property
    def through_keys(self) -> np.ndarray:
        """``loadings @ weights`` ``[L]``: the query's weight on each token through its principal keys.
        For a form whose map is over principal keys (linear) this is exactly the ATP row; for a form
        that attends over the rebuilt keys (exact) it is that row projected on the basis."""
        return self.loadings @ self.weights


def query_view(maps: AttentionMaps, query: int) -> QueryView:
    """The per-token view of ``query`` (0-based token index) from one layer/head's maps."""
    n = maps.dense.shape[0]
    if isinstance(query, bool) or not isinstance(query, int | np.integer) or not 0 <= query < n:
        raise ValueError(f"query token must be an index from 0 to {n - 1}, got {query!r}")
    w = np.asarray(maps.principal[query], dtype=np.float64)
    sign = np.where(w < 0, -1.0, 1.0)
    return QueryView(
        query=int(query),
        dense=np.asarray(maps.dense[query]),
        atp=np.asarray(maps.lifted[query]),
        weights=w * sign,
        loadings=np.asarray(maps.basis, dtype=np.float64) * sign,
        form=maps.form,
    )


def default_query(n_tokens: int, is_decoder: bool) -> int:
    """The token a view starts on: a decoder's last token (the one that predicts the next token), an
    encoder's middle one."""
    return max(0, n_tokens - 1) if is_decoder else n_tokens // 2
