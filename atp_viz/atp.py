"""ATP maths: principal bases, dense attention and the two ATP attention forms.

ATP ("Attention on Top Principal keys", Niu, Prakash, Avestimehr, arXiv 2403.02352) is rebuilt here
from the abstract and the first author's public slides, not from the paper body; see
``ATP_NOTES.md``. Pure tensor maths: torch only, no Streamlit, no transformers.

Shape conventions (stated once):

- ``x``: the input of one attention layer, ``[..., L, d]`` (L tokens, d features).
- ``q``: ``[B, H, L, dh]``; ``k``, ``v``: ``[B, Hkv, L, dh]`` with ``H % Hkv == 0``. Query head ``h``
  uses key/value head ``h // G`` with ``G = H // Hkv`` (the ``repeat_kv`` / ``repeat_interleave``
  convention of Hugging Face models).
- ``basis``: ``U_r``, ``[B, L, r]`` with orthonormal columns (zero rows at padding positions).
- ``key_mask``: ``[B, L]`` bool, True for a real token, False for padding.
- Principal keys/values are taken per key/value head: ``K' = U_r^T K``, ``V' = U_r^T V``,
  ``[B, Hkv, r, dh]``; the ``G`` query heads of a group share them (K/V are never repeated).

Query rows that have no admissible key (a fully padded sequence, or a causal row before the first
real token under left padding) return zeros in every attention function here, never NaN.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "atp_attention",
    "dense_attention",
    "lift_principal_map",
    "linearised_dense_attention",
    "principal_basis",
    "resolve_rank",
]

# Extra random directions of the randomised range finder (Halko, Martinsson & Tropp 2011, sec. 4.2;
# torch.svd_lowrank's docs suggest the same order of oversampling).
RANDOMIZED_OVERSAMPLE = 10
# The number of test vectors is rounded up to a multiple of this: GEMMs whose output width is a multiple
# of the SIMD width run much faster (on AVX-512, [8192, 576] @ [576, 144] takes ~2/3 of the time of
# [576, 138]); the extra directions only add accuracy.
RANDOMIZED_BLOCK = 16
# Block length of the causal linear form: the only quadratic buffer it holds is chunk x chunk per head.
CAUSAL_CHUNK = 128
# Token sample of the "sketch" basis: at least this many rows, and at least this many per basis vector.
SKETCH_MIN_ROWS = 512
SKETCH_FACTOR = 4
# Fixed seed of the directions that complete a basis beyond the numerical rank of x (determinism).
_COMPLETION_SEED = 0


# --------------------------------------------------------------------------------------------------
# Principal basis
# --------------------------------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """A layer's input holds inf or NaN, so it has no singular vectors; the message is for the user."""


def principal_basis(
    x: torch.Tensor,
    rank: int,
    method: Literal["exact", "randomized", "sketch"] = "exact",
    *,
    valid: torch.Tensor | None = None,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``x``: ``[..., L, d] -> [..., L, rank]``, orthonormal columns.

    ``method="exact"`` uses ``torch.linalg.svd(full_matrices=False)``. We never use an eigen-
    decomposition of ``x x^T`` or ``x^T x``: it is cheaper only by a constant factor and squares the
    condition number, so in float32 the small singular directions (the ones a rank sweep is about)
    would be lost.

    ``method="randomized"`` is the randomised range finder with power iterations (Halko, Martinsson &
    Tropp 2011, Alg. 4.4; the algorithm of ``torch.svd_lowrank``): ``p`` Gaussian test vectors (at least
    ``rank + RANDOMIZED_OVERSAMPLE``, rounded up to a multiple of ``RANDOMIZED_BLOCK``), ``niter`` power
    iterations with the iterate re-normalised after every product, then an exact SVD of the small
    projected matrix; see :func:`_randomized_svd` for how it is kept cheap. Cost O(L d r) instead of
    O(L d min(L, d)). It is written out here rather than calling ``torch.svd_lowrank`` because that
    function takes no ``generator`` and so cannot be made reproducible without touching the global RNG.
    When ``rank + RANDOMIZED_OVERSAMPLE`` reaches ``min(L, d)`` nothing can be saved and the exact SVD is
    used.

    ``method="sketch"`` (cheaper, approximate; the "sketch on a subset of tokens" the serving issue
    suggests): the top-``rank`` right singular vectors V_r of ``s`` tokens sampled uniformly without
    replacement (``s = max(SKETCH_MIN_ROWS, SKETCH_FACTOR * rank)``, real tokens only), then
    ``U = orth(x V_r)`` (Cholesky-QR twice) rotated by the SVD of the small ``r x r`` factor, so the
    columns are the left singular vectors of ``x V_r``. V_r comes from the randomised finder applied to
    the small sample. Cost: one pass over x (``L d r``) plus ``L r^2`` and sample-sized work, instead of
    the randomised method's six passes.
    It spans the top-r subspace of ``x`` only as far as the sample spans x's row space: a direction
    carried by a few unsampled tokens is missed. The app shows the accuracy this costs (explorer, basis
    option). Falls back to the exact SVD when ``s >= L``.

    Sign convention (deterministic): each column is flipped so that its entry of largest absolute
    value is positive (ties: the first such row); an all-zero column is left as is. The ATP linear
    form and the exact form are invariant to these signs anyway.

    Padding: where ``valid`` (bool ``[..., L]``) is False the rows of ``x`` are zeroed before the
    decomposition and the returned basis has exactly zero rows, so padding never enters.

    Rank: an int with ``1 <= rank <= L`` (else ValueError). Columns beyond the numerical rank of ``x``
    (including all columns beyond ``min(L, d)``) are completed with a deterministic orthonormal
    complement inside the valid rows, so at ``rank = L`` the basis spans everything and the exact ATP
    form equals dense attention. With padding at most ``n_valid`` columns can be orthonormal and
    supported on valid rows; further columns are zero (they add nothing to ``U U^T`` or to either ATP
    form).

    Computed in float64 for float64 input and in float32 otherwise; cast back to the input's float
    dtype (float32 for non-float input).

    Gradients: the basis is a constant for backpropagation (``x`` is detached). Gradients of an SVD
    carry 1 / (s_i^2 - s_j^2) terms that blow up on near-equal singular values; low-rank-aware
    fine-tuning (``atp_viz.finetune``) trains the weights through K' = U_r^T K and V' = U_r^T V with
    U_r held fixed, the way a projection chosen from the data is usually treated.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("principal_basis expects a tensor x of shape [..., L, d].")
    if x.is_complex():
        raise TypeError("principal_basis expects a real tensor.")
    L, d = x.shape[-2], x.shape[-1]
    if L < 1 or d < 1:
        raise ValueError(f"principal_basis needs L >= 1 and d >= 1, got x of shape {tuple(x.shape)}.")
    rank = _check_basis_rank(rank, L)
    x = x.detach()
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            "A layer's input holds inf or NaN values, so no basis can be computed. With the linear form "
            "this happens when an earlier layer's denominator L + c (q K'^T)(U_r^T 1) comes close to zero "
            "for some token (1 + s is not a positive kernel): the model breaks down on this text and rank."
        )
    if method not in ("exact", "randomized", "sketch"):
        raise ValueError(f"method must be 'exact', 'randomized' or 'sketch', got {method!r}.")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be a non-negative int, got {niter!r}.")

    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.to(work)
    mask = None
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise ValueError("valid must be a bool tensor (True = real token).")
        if tuple(valid.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"valid must have shape {tuple(x.shape[:-1])} (x without d), got {tuple(valid.shape)}."
            )
        mask = valid.to(device=x.device, dtype=work)
        xw = xw * mask.unsqueeze(-1)  # (..., L, d)

    k = min(L, d)
    m = min(rank, k)
    n_sketch = max(SKETCH_MIN_ROWS, SKETCH_FACTOR * m)
    if method == "randomized" and m + RANDOMIZED_OVERSAMPLE < k:
        U, S = _randomized_svd(xw, m, niter, generator)
    elif method == "sketch" and n_sketch < L and m < min(n_sketch, d):
        U, S = _sketch_svd(xw, m, n_sketch, mask, generator)
    else:
        if method == "randomized":
            logger.debug("randomized basis: rank + oversampling >= min(L, d) = %d, using the exact SVD", k)
        U, S, _ = torch.linalg.svd(xw, full_matrices=False)
        U, S = U[..., :m], S[..., :m]  # (..., L, m), (..., m)

    # Singular directions with (numerically) zero singular value are arbitrary: with padding they may
    # leak into padded rows, so they are rebuilt by the completion step (as are columns beyond min(L, d)).
    tol = S[..., :1] * (max(L, d) * torch.finfo(work).eps)
    good = S.gt(tol)  # (..., m); singular values are sorted, so the good columns are leading
    if rank > m or (mask is not None and not bool(good.all())):
        U = _complete_basis(U, good, mask, rank)
    elif mask is not None:
        U = U * mask.unsqueeze(-1)  # exact zeros on padding rows (the SVD leaves ~eps there)
    return _fix_signs(U).to(out_dtype)


def _sketch_svd(
    xw: torch.Tensor, m: int, n_rows: int, mask: torch.Tensor | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis from a row sample (principal_basis, method "sketch"): U ``[..., L, m]``, S ``[..., m]``."""
    if generator is None or generator.device.type != "cpu":
        generator = torch.Generator().manual_seed(_COMPLETION_SEED)  # deterministic sample
    batch = xw.shape[:-2]
    L, d = xw.shape[-2], xw.shape[-1]
    flat = xw.reshape(-1, L, d)  # (N, L, d)
    flat_mask = None if mask is None else mask.reshape(-1, L)
    us, ss = [], []
    for b in range(flat.shape[0]):
        rows = torch.arange(L, device=xw.device)
        if flat_mask is not None:
            rows = rows[flat_mask[b] > 0]
        order = torch.randperm(rows.numel(), generator=generator)[:n_rows].to(xw.device)
        pick = rows[order]
        xs = flat[b, pick.sort().values]  # (s', d): the sampled tokens
        if m + RANDOMIZED_OVERSAMPLE < min(xs.shape):
            # The sample's top right singular vectors by the randomised finder on xs^T (d x s', small).
            rand_gen = generator if xw.device.type == "cpu" else None
            vr, _ = _randomized_svd(xs.mT.contiguous(), m, 2, rand_gen)  # (d, m)
        else:
            vr = torch.linalg.svd(xs, full_matrices=False).Vh[:m].mT  # (d, m)
        y = flat[b] @ vr  # (L, m): x V_r, one pass over x
        q1, t = _orthonormal_tall(y)
        q = q1 if t is None else q1 @ t  # (L, m), orthonormal
        ub, sv, _ = torch.linalg.svd(q.mT @ y)  # rotate to the left singular vectors of x V_r
        us.append(q @ ub)
        ss.append(sv)
    return torch.stack(us).reshape(*batch, L, m), torch.stack(ss).reshape(*batch, m)


def _check_basis_rank(rank: Any, L: int) -> int:
    if isinstance(rank, bool) or type(rank).__name__ in ("bool", "bool_") or not hasattr(rank, "__index__"):
        raise TypeError(f"rank must be an int (number of principal keys), got {rank!r}.")
    rank = rank.__index__()
    if rank < 1 or rank > L:
        raise ValueError(f"rank must satisfy 1 <= rank <= L = {L}, got {rank}. Use resolve_rank() to clamp.")
    return rank


def _randomized_svd(
    xw: torch.Tensor, m: int, niter: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomised range finder + small exact SVD; returns U ``[..., L, m]`` and S ``[..., m]``.

    The range is ``Q = orth((X X^T)^niter X Omega)`` (Halko et al. 2011, Alg. 4.4) with ``p`` test vectors.
    After every product the iterate is re-normalised so that float32 keeps its small directions: the
    ``d x p`` ones by QR (cheap), the tall ``L x p`` ones by :func:`_normalise_tall` (a Cholesky factor of
    their ``p x p`` Gram matrix, LU as fallback). Re-normalising changes the basis of an iterate, never its
    span, so ``Q``'s span and hence U are those of the QR-at-every-step algorithm (up to rounding). The
    final orthonormal ``Q`` is Cholesky-QR applied twice (:func:`_orthonormal_tall`; Householder QR where
    that would be inaccurate), kept implicit as ``Q = Q1 T``.

    Everything tall is a GEMM with X (6 passes over X for ``niter = 2``) or a thin GEMM; the tall QRs of
    the textbook algorithm (slow, and serial inside LAPACK) are gone.
    """
    L, d = xw.shape[-2], xw.shape[-1]
    k = min(L, d)
    p = min(-(-(m + RANDOMIZED_OVERSAMPLE) // RANDOMIZED_BLOCK) * RANDOMIZED_BLOCK, k)
    omega = torch.randn(*xw.shape[:-2], d, p, generator=generator, dtype=xw.dtype, device=xw.device)
    Y = xw @ omega  # (..., L, p)
    for _ in range(niter):
        Z = torch.linalg.qr(xw.mT @ _normalise_tall(Y)).Q  # (..., d, p)
        Y = xw @ Z.contiguous()  # (..., L, p); a row-major Z is the fast GEMM layout
    Q1, T = _orthonormal_tall(Y)  # Q = Q1 T: (..., L, p), (..., p, p) or None
    B = Q1.mT @ xw  # (..., p, d)
    if T is not None:
        B = T.mT @ B  # Q^T X
    # SVD of the wide B via its R factor: B^T = Q_b R_b, so B = R_b^T Q_b^T has the left singular vectors
    # and singular values of the p x p matrix R_b^T (half the time of LAPACK's SVD of B here).
    Rb = torch.linalg.qr(B.mT, mode="r").R  # (..., p, p)
    Ub, S, _ = torch.linalg.svd(Rb.mT)  # (..., p, p), (..., p)
    Ub = Ub[..., :m]
    return Q1 @ (Ub if T is None else T @ Ub), S[..., :m]


def _cholesky_inverse_factor(y: torch.Tensor) -> torch.Tensor | None:
    """``R^{-1}`` for ``y^T y = R^T R`` (upper-triangular R), or None where the Gram matrix is not
    numerically positive definite (y rank-deficient or too ill-conditioned for its dtype)."""
    R, info = torch.linalg.cholesky_ex(y.mT @ y, upper=True)  # (..., p, p)
    if bool(info.ne(0).any()):
        return None
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)  # (..., p, p)
    return Rinv if bool(torch.isfinite(Rinv).all()) else None


def _normalise_tall(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned matrix with the column span of the tall ``y`` ``[..., L, p]`` (not orthonormal).

    ``y R^{-1}`` with R the Cholesky factor of ``y^T y``: two thin GEMMs and a ``p x p`` factorisation.
    Any invertible R keeps the span; the Cholesky one makes the columns near-orthonormal whenever
    ``cond(y)^2 eps < 1``. Where the Gram matrix is not positive definite the LU normaliser is used.
    """
    Rinv = _cholesky_inverse_factor(y)
    if Rinv is None:
        return _lu_normalise(y)
    return y @ Rinv


def _orthonormal_tall(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An orthonormal basis of the columns of a full-rank tall ``y``, as ``(Q1, T)`` with ``Q = Q1 T``.

    Cholesky-QR twice ("CholeskyQR2", Fukaya et al. 2014): ``Q1 = y R1^{-1}``, then ``T = R2^{-1}`` from
    ``Q1^T Q1 = R2^T R2``; orthonormal to working precision when ``cond(y)^2 eps`` is well below 1, which is
    checked on ``Q1^T Q1`` (it must be within 0.5 of the identity). Otherwise Householder QR, ``T`` None.
    """
    Rinv = _cholesky_inverse_factor(y)
    if Rinv is not None:
        Q1 = y @ Rinv  # (..., L, p)
        G = Q1.mT @ Q1  # (..., p, p)
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        if bool(((G - eye).abs().amax() < 0.5).all()):
            R2, info = torch.linalg.cholesky_ex(G, upper=True)
            if bool(info.eq(0).all()):
                return Q1, torch.linalg.solve_triangular(R2, eye, upper=True)
    return torch.linalg.qr(y).Q, None


def _lu_normalise(y: torch.Tensor) -> torch.Tensor:
    """``P L`` from the partial-pivoting LU ``y = P L U`` of a tall ``[..., L, p]`` matrix: the same span as
    y (a superset if y is rank-deficient), unit lower-trapezoidal up to the row permutation (entries at
    most 1 in magnitude). The "LU" normaliser of scikit-learn's ``randomized_svd``; here the fallback of
    :func:`_normalise_tall`."""
    LU, piv, _ = torch.linalg.lu_factor_ex(y)  # (..., L, p), (..., p); a singular U still yields L
    n_rows, p = LU.shape[-2], LU.shape[-1]
    top = LU[..., :p, :]  # (..., p, p): U on and above the diagonal, L below
    top.copy_(top.tril(-1))
    top.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    low_t = LU.mT.reshape(-1, p, n_rows)  # (N, p, L): L^T, row-major (LAPACK's factors are column-major)
    outs = []
    rows = torch.arange(n_rows, device=y.device)
    for b, pivots in enumerate(piv.reshape(-1, p).tolist()):
        perm = list(range(n_rows))  # LAPACK swaps row i with row pivots[i] - 1, in order: y[perm] = L U
        for i, pv in enumerate(pivots):
            perm[i], perm[pv - 1] = perm[pv - 1], perm[i]
        inv = torch.empty_like(rows)
        inv[torch.tensor(perm, device=y.device)] = rows  # (P L) = L[inv]
        outs.append(low_t[b].index_select(1, inv))  # (p, L)
    out = outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)  # (N, p, L)
    return out.reshape(*y.shape[:-2], p, n_rows).mT  # (..., L, p), column-major


def _complete_basis(
    U: torch.Tensor, good: torch.Tensor, mask: torch.Tensor | None, rank: int
) -> torch.Tensor:
    """Keep the well-defined leading columns, add an orthonormal complement inside the valid rows.

    Per matrix (the number of good columns and of valid rows differ across the batch), so a loop.
    The complement is a fixed-seed Gaussian block projected twice off the kept columns ("twice is
    enough" for Gram-Schmidt), then QR: deterministic, orthonormal, and zero on padded rows.
    """
    batch = U.shape[:-2]
    L, m = U.shape[-2], U.shape[-1]
    Uf = U.reshape(-1, L, m)  # (N, L, m)
    goodf = good.reshape(-1, m)  # (N, m)
    maskf = None if mask is None else mask.reshape(-1, L)  # (N, L)
    out = torch.zeros(Uf.shape[0], L, rank, dtype=U.dtype, device=U.device)
    gen = torch.Generator(device=U.device)
    for n in range(Uf.shape[0]):
        g = int(goodf[n].sum())
        kept = Uf[n, :, :g]  # (L, g)
        n_avail = L
        if maskf is not None:
            kept = kept * maskf[n].unsqueeze(-1)
            n_avail = int(maskf[n].sum())
        need = min(rank, n_avail) - g
        cols = [kept]
        if need > 0:
            gen.manual_seed(_COMPLETION_SEED)
            G = torch.randn(L, need, generator=gen, dtype=U.dtype, device=U.device)  # (L, need)
            if maskf is not None:
                G = G * maskf[n].unsqueeze(-1)
            for _ in range(2):
                G = G - kept @ (kept.mT @ G)
            Qc = torch.linalg.qr(G).Q  # (L, need)
            if maskf is not None:
                Qc = Qc * maskf[n].unsqueeze(-1)
            cols.append(Qc)
        filled = torch.cat(cols, dim=-1)  # (L, min(rank, n_avail))
        out[n, :, : filled.shape[-1]] = filled
    return out.reshape(*batch, L, rank)  # (..., L, rank)


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry (first one on ties) is positive.

    The column max and min decide it without an ``|U|`` temporary; only a column whose max and min have
    equal magnitude (a tie between a positive and a negative entry) needs the position of the first one.
    """
    hi = U.amax(dim=-2, keepdim=True)  # (..., 1, r)
    lo = U.amin(dim=-2, keepdim=True)  # (..., 1, r)
    negative = -lo > hi
    tie = -lo == hi
    if bool(tie.any()):
        idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
        negative = torch.where(tie, U.gather(-2, idx) < 0, negative)
    return U * torch.where(negative, -1.0, 1.0).to(U.dtype)


def resolve_rank(rank: int | float, L: int) -> tuple[int, str | None]:
    """Turn a user's rank into ``(r, notice)`` for a sequence of ``L`` tokens.

    - int: an absolute number of principal keys; ``rank > L`` is clamped to ``L`` and ``notice``
      says so; ``rank <= 0`` raises ValueError.
    - float in (0, 1]: a fraction of ``L``, rounded half up, at least 1 (so ``1.0`` means all L
      tokens, while the int ``1`` means one principal key); outside (0, 1] raises ValueError.
    - bool (and any non-number) raises TypeError: ``True`` would otherwise silently mean rank 1.
    """
    if isinstance(L, bool) or not hasattr(L, "__index__") or L.__index__() < 1:
        raise ValueError(f"The sequence length L must be a positive int, got {L!r}.")
    L = L.__index__()
    if isinstance(rank, bool) or type(rank).__name__ in ("bool", "bool_"):  # numpy's bool too
        raise TypeError(
            "rank must be an int (number of principal keys) or a float fraction of L, not a bool."
        )
    if hasattr(rank, "__index__") and not isinstance(rank, float):
        r = rank.__index__()
        if r <= 0:
            raise ValueError(f"The rank must be at least 1 principal key, got {r}.")
        if r > L:
            return L, f"Rank {r} exceeds the sequence length L = {L}; using r = {L} (full rank)."
        return r, None
    if hasattr(rank, "__float__") and not isinstance(rank, str):
        frac = float(rank)
        if not math.isfinite(frac) or frac <= 0.0 or frac > 1.0:
            raise ValueError(
                f"A fractional rank must lie in (0, 1] (a share of the {L} tokens), got {rank}. "
                "Give an int for an absolute number of principal keys."
            )
        return max(1, min(L, math.floor(frac * L + 0.5))), None
    raise TypeError(f"rank must be an int or a float in (0, 1], got {type(rank).__name__}.")


# --------------------------------------------------------------------------------------------------
# Shared checks and masks
# --------------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate q/k/v; return ``(B, H, Hkv, L, dh, G)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, heads, L, dh], got {getattr(t, 'shape', t)}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    B, H, L, dh = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    Bk, Hkv, Lk, dhk = k.shape
    if Bk != B or Lk != L or dhk != dh:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: batch, length and head "
            "size must agree (self-attention over one sequence)."
        )
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"The number of query heads ({H}) must be a multiple of key/value heads ({Hkv}).")
    return B, H, Hkv, L, dh, H // Hkv


def _scale(scaling: float | None, dh: int) -> float:
    return dh**-0.5 if scaling is None else float(scaling)


def _check_key_mask(
    key_mask: torch.Tensor | None, B: int, L: int, device: torch.device
) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise ValueError("key_mask must be a bool tensor [B, L] (True = real token).")
    if tuple(key_mask.shape) != (B, L):
        raise ValueError(f"key_mask must have shape {(B, L)}, got {tuple(key_mask.shape)}.")
    return key_mask.to(device)


def _allowed(
    L: int, causal: bool, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask of admissible (query, key) pairs, broadcastable to ``(B, Hkv, G, L, L)``; None = all."""
    allowed = None
    if causal:
        allowed = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L)
    if key_mask is not None:
        km = key_mask[:, None, None, None, :]  # (B, 1, 1, 1, L)
        allowed = km if allowed is None else allowed & km
    return allowed


def _grouped(q: torch.Tensor, Hkv: int, G: int) -> torch.Tensor:
    B, _, L, dh = q.shape
    return q.reshape(B, Hkv, G, L, dh)  # (B, Hkv, G, L, dh)


def _ungrouped(t: torch.Tensor) -> torch.Tensor:
    B, Hkv, G, L, e = t.shape
    return t.reshape(B, Hkv * G, L, e)  # (B, H, L, e)


# --------------------------------------------------------------------------------------------------
# Dense references
# --------------------------------------------------------------------------------------------------


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Standard softmax attention ``softmax(c Q K^T + mask) V``; q ``[B, H, L, dh]``, k/v ``[B, Hkv, L, dh]``.

    Grouped-query attention by broadcasting (query head h reads key/value head h // G). ``key_mask``
    ``[B, L]`` masks padding keys. Returns ``[B, H, L, dh]``, plus the probabilities ``[B, H, L, L]``
    if ``return_weights``. ``scaling`` defaults to ``dh ** -0.5``. Cost: O(L^2 dh) per head.
    """
    B, H, Hkv, L, dh, G = _check_qkv(q, k, v)
    c = _scale(scaling, dh)
    km = _check_key_mask(key_mask, B, L, q.device)
    qg = _grouped(q, Hkv, G)  # (B, Hkv, G, L, dh)
    scores = c * (qg @ k.unsqueeze(2).mT)  # (B, Hkv, G, L, L)
    probs = _masked_softmax(scores, _allowed(L, causal, km, q.device))
    out = _ungrouped(probs @ v.unsqueeze(2))  # (B, H, L, dh)
    if return_weights:
        return out, probs.reshape(B, H, L, L)  # (B, H, L, L)
    return out


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    if allowed is None:
        return scores.softmax(dim=-1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    # A row with no admissible key is all -inf -> NaN; define it as zeros.
    return torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype))


def linearised_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """First-order attention on the FULL keys: ``A_ij = 1 + c q_i k_j^T`` (admissible j), ``out = A V / A 1``.

    No basis is involved, so comparing it with dense attention isolates the linearisation error,
    and comparing the ATP linear form with it isolates the error of dropping bases. Reference only:
    it builds the ``L x L`` matrix. The denominator ``A 1`` can be near zero or negative (1 + s is
    not a positive kernel); that is the method, not a bug, and it is not guarded.
    """
    B, H, Hkv, L, dh, G = _check_qkv(q, k, v)
    c = _scale(scaling, dh)
    km = _check_key_mask(key_mask, B, L, q.device)
    qg = _grouped(q, Hkv, G)  # (B, Hkv, G, L, dh)
    A = 1.0 + c * (qg @ k.unsqueeze(2).mT)  # (B, Hkv, G, L, L)
    allowed = _allowed(L, causal, km, q.device)
    if allowed is not None:
        A = A.masked_fill(~allowed, 0.0)
    num = A @ v.unsqueeze(2)  # (B, Hkv, G, L, dh)
    den = A.sum(dim=-1, keepdim=True)  # (B, Hkv, G, L, 1)
    out = num / den
    if allowed is not None:
        out = torch.where(allowed.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))
    return _ungrouped(out)  # (B, H, L, dh)


# --------------------------------------------------------------------------------------------------
# ATP
# --------------------------------------------------------------------------------------------------


def atp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    basis: torch.Tensor,
    *,
    form: Literal["linear", "exact"] = "linear",
    causal: bool = False,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    return_maps: bool = False,
    chunk_size: int = CAUSAL_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention on the top-r principal keys: q ``[B, H, L, dh]``, k/v ``[B, Hkv, L, dh]``, U ``[B, L, r]``.

    Principal keys/values per key/value head, ``K' = U_r^T K``, ``V' = U_r^T V`` ``[B, Hkv, r, dh]``;
    the G = H // Hkv query heads of a group share them. Returns ``[B, H, L, dh]``.

    ``form="linear"`` (the paper's linear-cost form, exp(s) ~ 1 + s), for query row i with
    ``c = scaling``, ``n`` = number of real tokens (``key_mask``) or L::

        numerator   = (1^T U_r) V' + c (q_i K'^T) V'
        denominator = n + c (q_i K'^T) (U_r^T 1)

    Non-causal cost O(L r dh) time and O(L r) extra memory per head; no L x L tensor is built.
    Causal: sums over all tokens become prefix sums over j <= i, ``s_i = sum u_j``,
    ``P_i = sum u_j u_j^T``: numerator ``s_i^T V' + c q_i K'^T P_i V'``, denominator
    ``n_i + c q_i K'^T s_i`` with ``n_i`` the number of real tokens up to i. ``s_i^T V'`` is a cumulative
    sum of ``U_r V'`` and ``(q_i K'^T) P_i V' = sum_{j<=i} (phi_i . u_j)(u_j^T V')`` with
    ``phi_i = c q_i K'^T`` is a causal linear attention, computed in blocks of ``chunk_size``: a masked
    chunk x chunk matrix inside a block, a running ``r x dh`` state across blocks. Cost
    O(L r dh + L chunk (r + dh)) time, O(L (r + dh) + r dh + chunk^2) memory per head; never L x L, never
    ``[L, r, r]``. The denominator can be near zero or negative: 1 + s is not a positive kernel.

    ``form="exact"`` (quadratic reference): ``softmax(c Q K_r^T + mask) V_r`` with
    ``K_r = U_r U_r^T K``, ``V_r = U_r U_r^T V``; equals dense attention once U_r spans K and V.

    ``key_mask`` ``[B, L]`` (True = real token): basis rows at padding are zeroed, padding keys are
    masked (exact form) and counted out of the denominator (linear form). Pass the same mask as
    ``valid`` to :func:`principal_basis`.

    ``return_maps=True`` also returns a dict with key ``"principal"``: for the linear form the map over
    principal keys ``A'`` ``[B, H, L, r]`` (row i: ``(U_r^T 1 + c K' q_i^T) / denominator``, causal:
    ``(s_i + c P_i K' q_i^T) / denominator``), so ``out = A' V'`` and :func:`lift_principal_map` gives the
    token-level map; for the exact form the softmax probabilities ``[B, H, L, L]`` over the
    reconstructed keys. Maps are for visualisation at small L.

    The linear form is invariant to the sign of each basis column (every term is quadratic in u);
    softmax over principal keys would not be. Computed in the input dtype.
    """
    B, H, Hkv, L, dh, G = _check_qkv(q, k, v)
    if not isinstance(basis, torch.Tensor) or basis.dim() != 3 or not basis.is_floating_point():
        raise ValueError("basis must be a floating-point tensor [B, L, r].")
    if basis.shape[0] != B or basis.shape[1] != L or basis.shape[2] < 1:
        raise ValueError(
            f"basis shape {tuple(basis.shape)} does not match q {tuple(q.shape)}: "
            f"expected [B={B}, L={L}, r>=1]."
        )
    if form not in ("linear", "exact"):
        raise ValueError(f"form must be 'linear' or 'exact', got {form!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    c = _scale(scaling, dh)
    km = _check_key_mask(key_mask, B, L, q.device)
    U = basis.to(device=q.device, dtype=q.dtype)
    if km is not None:
        U = U * km.unsqueeze(-1).to(U.dtype)  # (B, L, r): padding never enters

    if form == "linear" and not causal and not return_maps:
        return _linear_noncausal(q, k, v, U, km, c, G)

    Ut = U.mT.unsqueeze(1)  # (B, 1, r, L)
    Kp = Ut @ k  # (B, Hkv, r, dh)  principal keys K'
    Vp = Ut @ v  # (B, Hkv, r, dh)  principal values V'

    if form == "exact":
        Kr = U.unsqueeze(1) @ Kp  # (B, Hkv, L, dh)  K_r = U U^T K
        Vr = U.unsqueeze(1) @ Vp  # (B, Hkv, L, dh)  V_r = U U^T V
        res = dense_attention(q, Kr, Vr, causal=causal, scaling=c, key_mask=km, return_weights=return_maps)
        if return_maps:
            out, probs = res
            return out, {"principal": probs}
        return res

    qg = _grouped(q, Hkv, G)  # (B, Hkv, G, L, dh)
    phi = c * (qg @ Kp.unsqueeze(2).mT)  # (B, Hkv, G, L, r)  c q_i K'^T
    if not causal:
        s = U.sum(dim=1)  # (B, r)  U_r^T 1
        s5 = s[:, None, None, None, :]  # (B, 1, 1, 1, r)
        n = torch.full((B,), L, dtype=q.dtype, device=q.device) if km is None else km.sum(-1).to(q.dtype)
        n5 = n[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        num = (s5 + phi) @ Vp.unsqueeze(2)  # (B, Hkv, G, L, dh)
        den = n5 + phi @ s5.mT  # (B, Hkv, G, L, 1)
        pmap = (s5 + phi) / den if return_maps else None  # (B, Hkv, G, L, r)
    else:
        W = U.unsqueeze(1) @ Vp  # (B, Hkv, L, dh)  row j = u_j^T V'
        r = U.shape[-1]
        vals = [W.unsqueeze(2), torch.ones(B, Hkv, 1, L, 1, dtype=q.dtype, device=q.device)]
        if return_maps:
            vals.append(U[:, None, None].expand(B, Hkv, 1, L, r))  # (B, Hkv, 1, L, r)
        res = _causal_linear_attention(phi, U[:, None, None], torch.cat(vals, dim=-1), chunk_size)
        n = (
            torch.arange(1, L + 1, dtype=q.dtype, device=q.device).expand(B, L)
            if km is None
            else km.to(q.dtype).cumsum(-1)
        )
        n5 = n[:, None, None, :, None]  # (B, 1, 1, L, 1)
        num = W.cumsum(dim=-2).unsqueeze(2) + res[..., :dh]  # (B, Hkv, G, L, dh)
        den = n5 + res[..., dh : dh + 1]  # (B, Hkv, G, L, 1)
        pmap = (U.cumsum(dim=1)[:, None, None] + res[..., dh + 1 :]) / den if return_maps else None

    out = torch.where(n5 > 0, num / den, torch.zeros((), dtype=q.dtype))
    out = _ungrouped(out)  # (B, H, L, dh)
    if return_maps:
        pmap = torch.where(n5 > 0, pmap, torch.zeros((), dtype=q.dtype))
        return out, {"principal": _ungrouped(pmap)}  # (B, H, L, r)
    return out


def _principal(U: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``U_r^T t`` per key/value head: U ``[B, L, r]``, t ``[B, Hkv, L, dh]`` -> ``[B, Hkv, r, dh]``.

    When t is a head-transposed view of a ``[B, L, Hkv * dh]`` projection (how models hand over keys and
    values) the Hkv heads are one matrix and this is one GEMM with no copy; otherwise a batched GEMM.
    """
    B, Hkv, L, dh = t.shape
    flat = t.transpose(1, 2)  # (B, L, Hkv, dh)
    if flat.is_contiguous():
        out = U.mT @ flat.reshape(B, L, Hkv * dh)  # (B, r, Hkv*dh)
        return out.reshape(B, -1, Hkv, dh).transpose(1, 2)  # (B, Hkv, r, dh)
    return U.mT.unsqueeze(1) @ t  # (B, Hkv, r, dh)


def reassociate_linear(r: int, dh: int) -> bool:
    """Whether the non-causal linear form is evaluated as ``q (K'^T V')`` (True) or ``(q K'^T) V'``: the
    cheaper per query, ``dh (dh + 1)`` vs ``r (2 dh + 1)`` multiply-adds."""
    return dh * (dh + 1) < r * (2 * dh + 1)


def _linear_noncausal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    U: torch.Tensor,
    km: torch.Tensor | None,
    c: float,
    G: int,
) -> torch.Tensor:
    """The non-causal linear form without maps (the serving path); same formula as ``atp_attention``.

    With ``phi_i = c q_i K'^T`` and ``s = U_r^T 1``, numerator and denominator are one product with the
    value matrix augmented by the column ``s``::

        [num_i | den_i] = [s^T V' | n] + phi_i [V' | s]

    Evaluated in the cheaper association (same maths, a different order of the same sums): as
    ``q_i (c K'^T [V' | s])``, with one ``dh x (dh + 1)`` matrix per key/value head, when its per-query cost
    ``dh (dh + 1)`` is below the ``r (2 dh + 1)`` of ``(c q_i K'^T) [V' | s]`` (r > ~dh / 2); then no
    ``L x r`` scores are held either. Either way: no L x L tensor, no float64, no K/V repeat. The result
    is a view of the numerator buffer (divided in place), so it may be non-contiguous.
    """
    B, H, L, dh = q.shape
    Hkv = H // G
    r = U.shape[-1]
    Kp = _principal(U, k)  # (B, Hkv, r, dh)  principal keys K'
    Vp = _principal(U, v)  # (B, Hkv, r, dh)  principal values V'
    s = U.sum(dim=1)  # (B, r)  U_r^T 1
    n = torch.full((B,), L, dtype=q.dtype, device=q.device) if km is None else km.sum(-1).to(q.dtype)
    s_col = s[:, None, :, None].expand(B, Hkv, r, 1)
    Vaug = torch.cat([Vp, s_col], dim=-1)  # (B, Hkv, r, dh + 1)  [V' | s]
    bias = torch.cat(
        [s[:, None, None, :] @ Vp, n[:, None, None, None].expand(B, Hkv, 1, 1)], dim=-1
    )  # (B, Hkv, 1, dh + 1)  [s^T V' | n]
    qg = _grouped(q, Hkv, G)  # (B, Hkv, G, L, dh)
    if reassociate_linear(r, dh):
        M = (c * Kp.mT) @ Vaug  # (B, Hkv, dh, dh + 1)
        nd = torch.matmul(qg, M.unsqueeze(2))  # (B, Hkv, G, L, dh + 1)
    else:
        phi = torch.matmul(qg, (c * Kp.mT).unsqueeze(2))  # (B, Hkv, G, L, r)
        nd = phi @ Vaug.unsqueeze(2)  # (B, Hkv, G, L, dh + 1)
    # In place (a view with row stride dh + 1) except under autograd (fine-tuning), which needs the
    # denominator unmodified for the backward pass.
    grad = nd.requires_grad
    nd = nd + bias.unsqueeze(2) if grad else nd.add_(bias.unsqueeze(2))
    num, den = nd[..., :dh], nd[..., dh:]
    out = num / den if grad else num.div_(den)  # (B, Hkv, G, L, dh)
    if km is not None:
        n5 = n[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        out = torch.where(n5 > 0, out, torch.zeros((), dtype=q.dtype))
    return _ungrouped(out)  # (B, H, L, dh)


def _causal_linear_attention(
    phi: torch.Tensor, u: torch.Tensor, values: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``out_i = sum_{j<=i} (phi_i . u_j) values_j``, blockwise; never an L x L buffer.

    phi ``(B, Hkv, G, L, r)``, u ``(B, 1, 1, L, r)``, values ``(B, Hkv, 1, L, e)`` -> ``(B, Hkv, G, L, e)``.
    The state ``sum_{j<block} u_j values_j^T`` is ``(B, Hkv, 1, r, e)``, shared by the G query heads.
    """
    L = phi.shape[-2]
    state = None
    outs = []
    for a in range(0, L, chunk):
        b = min(a + chunk, L)
        ph, uc, vc = phi[..., a:b, :], u[..., a:b, :], values[..., a:b, :]
        blk = torch.tril(ph @ uc.mT) @ vc  # (B, Hkv, G, T, T) @ (B, Hkv, 1, T, e) -> (B, Hkv, G, T, e)
        if state is not None:
            blk = blk + ph @ state  # (B, Hkv, G, T, r) @ (B, Hkv, 1, r, e)
        outs.append(blk)
        upd = uc.mT @ vc  # (B, Hkv, 1, r, e)
        state = upd if state is None else state + upd
    return torch.cat(outs, dim=-2)  # (B, Hkv, G, L, e)


def lift_principal_map(principal_map: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Token-level map implied by ATP: ``A' U_r^T``, ``[B, H, L, r] x [B, L, r] -> [B, H, L, L]``.

    ``lift_principal_map(A', U) @ V`` equals the ATP output. In causal mode the lifted map is not
    lower-triangular: U_r is computed from the whole sequence, so row i weighs later tokens too.
    """
    if principal_map.dim() != 4 or basis.dim() != 3:
        raise ValueError("lift_principal_map expects principal_map [B, H, L, r] and basis [B, L, r].")
    B, _, L, r = principal_map.shape
    if tuple(basis.shape) != (B, L, r):
        raise ValueError(
            f"basis shape {tuple(basis.shape)} does not match the map's [B, L, r] = {(B, L, r)}."
        )
    return principal_map @ basis.to(principal_map.dtype).mT.unsqueeze(1)  # (B, H, L, L)
