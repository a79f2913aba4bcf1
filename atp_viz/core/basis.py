"""Principal bases: the top-r left singular vectors U_r of an attention input X, three ways.

ATP ("Attention on Top Principal keys", Niu, Prakash, Avestimehr, arXiv 2403.02352) is rebuilt in this
project from the abstract and the first author's public slides, not from the paper body; see
``ATP_NOTES.md``. Pure tensor maths: torch only.

- ``x``: the input of one attention layer, ``[..., L, d]`` (L tokens, d features);
- ``valid``: ``[..., L]`` bool, True for a real token, False for padding;
- the basis ``U_r``: ``[..., L, r]`` with orthonormal columns (zero rows at padding positions).

:data:`METHODS` are the ways to compute it; :func:`basis_path` is the one rule saying which
computation really runs for a given L, d, r and method (the cheaper methods fall back to the exact
SVD where they cannot save anything). The cost counts, the benchmark and the tour all read it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "NonFiniteError", "basis_path", "principal_basis", "sketch_rows"]

Method = Literal["exact", "randomized", "sketch"]
METHODS: tuple[str, ...] = ("exact", "randomized", "sketch")
METHOD_LABELS = {
    "exact": "exact SVD",
    "randomized": "randomised (2 power iterations)",
    "sketch": "token sketch (cheapest)",
}


# Extra random directions of the randomised range finder (Halko, Martinsson & Tropp 2011, sec. 4.2;
# torch.svd_lowrank's docs suggest the same order of oversampling).
RANDOMIZED_OVERSAMPLE = 10
# The number of test vectors is rounded up to a multiple of this: GEMMs whose output width is a multiple
# of the SIMD width run much faster (on AVX-512, [8192, 576] @ [576, 144] takes ~2/3 of the time of
# [576, 138]); the extra directions only add accuracy.
RANDOMIZED_BLOCK = 16
# Token sample of the "sketch" basis: at least this many rows, and at least this many per basis vector.
SKETCH_MIN_ROWS = 512
SKETCH_FACTOR = 4
# Fixed seed of the directions that complete a basis beyond the numerical rank of x (determinism).
_COMPLETION_SEED = 0


class NonFiniteError(ValueError):
    """A layer's input holds inf or NaN, so it has no singular vectors; the message is for the user."""


def sketch_rows(rank: int) -> int:
    """Tokens the sketch basis samples for rank r: ``max(SKETCH_MIN_ROWS, SKETCH_FACTOR * r)``."""
    return max(SKETCH_MIN_ROWS, SKETCH_FACTOR * rank)


def basis_path(L: int, d: int, rank: int, method: str) -> str:
    """Which computation :func:`principal_basis` really runs for an ``L x d`` input at ``rank``:

    - ``"randomized"`` only while ``r + RANDOMIZED_OVERSAMPLE < min(L, d)`` (else nothing can be saved);
    - ``"sketch"`` only while its sample is smaller than L and r is below the sample's rank;
    - ``"exact"`` otherwise.
    """
    k = min(L, d)
    m = min(rank, k)
    if method == "randomized" and m + RANDOMIZED_OVERSAMPLE < k:
        return "randomized"
    n = sketch_rows(m)
    if method == "sketch" and n < L and m < min(n, d):
        return "sketch"
    return "exact"


def randomized_width(L: int, d: int, rank: int) -> int:
    """Test vectors p of the randomised finder: ``rank + RANDOMIZED_OVERSAMPLE`` rounded up to a multiple
    of ``RANDOMIZED_BLOCK``, at most ``min(L, d)``."""
    return min(
        -(-(min(rank, L, d) + RANDOMIZED_OVERSAMPLE) // RANDOMIZED_BLOCK) * RANDOMIZED_BLOCK, min(L, d)
    )


def principal_basis(
    x: torch.Tensor,
    rank: int,
    method: Literal["exact", "randomized", "sketch"] = "exact",
    *,
    valid: torch.Tensor | None = None,
    niter: int = 2,
    generator: torch.Generator | None = None,
    centre: bool = False,
) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``x``: ``[..., L, d] -> [..., L, rank]``, orthonormal columns.

    ``centre=True`` (the centred basis, see :func:`_centred`): the first column is the mean direction
    ``1 / sqrt(n)`` over the real tokens, the other ``rank - 1`` the top left singular vectors of ``x``
    with its mean token subtracted. Still ``rank`` orthonormal columns, so every cost and cache is the
    same; the mean key and value are then rebuilt exactly.

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
    Without a ``generator`` the test vectors come from a fixed seed: the same input gives the same basis.
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
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

    scale = None
    if centre:
        # Directions are judged against the input as given: centring a near-constant input leaves only a
        # rounding residue along the mean itself, which must not count as a direction of its own.
        scale = torch.linalg.matrix_norm(xw)[..., None]  # (..., 1)
        xw, mean_col = _centred(xw, mask)
        if rank == 1:
            return mean_col.to(out_dtype)
    m = min(rank, L, d)
    path = basis_path(L, d, rank, method)
    if path == "randomized":
        U, S = _randomized_svd(xw, m, niter, generator)
    elif path == "sketch":
        U, S = _sketch_svd(xw, m, sketch_rows(m), mask, generator)
    else:
        if method != "exact":
            logger.debug("%s basis falls back to the exact SVD (L = %d, d = %d, r = %d)", method, L, d, rank)
        U, S, _ = torch.linalg.svd(xw, full_matrices=False)
        U, S = U[..., :m], S[..., :m]  # (..., L, m), (..., m)

    # Singular directions with (numerically) zero singular value are arbitrary: with padding they may
    # leak into padded rows, so they are rebuilt by the completion step (as are columns beyond min(L, d)).
    tol = (S[..., :1] if scale is None else scale) * (max(L, d) * torch.finfo(work).eps)
    good = S.gt(tol)  # (..., m); singular values are sorted, so the good columns are leading
    if centre:  # the mean column leads; the centred directions with sigma > 0 are orthogonal to it, up to
        # rounding, which is taken out (twice is enough) so that the columns stay orthonormal
        U = U[..., : rank - 1]
        for _ in range(2):
            U = U - mean_col @ (mean_col.mT @ U)
        U = U / U.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(work).tiny)
        U = torch.cat([mean_col, U], dim=-1)
        good = torch.cat([torch.ones_like(good[..., :1]), good[..., : rank - 1]], dim=-1)
        m = U.shape[-1]
    if rank > m or not bool(good.all()) and (mask is not None or centre):
        U = _complete_basis(U, good, mask, rank)
    elif mask is not None:
        U = U * mask.unsqueeze(-1)  # exact zeros on padding rows (the SVD leaves ~eps there)
    return _fix_signs(U).to(out_dtype)


def _centred(xw: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` less its mean token over the real rows (zero on padding), and the mean direction
    ``1 / sqrt(n)`` on the real rows as a column ``[..., L, 1]``.

    Why: attention inputs and keys share a large common part (BERT's keys carry the bias b_k in every
    token; hidden states are anisotropic), so the top singular vector of the raw input is roughly the
    all-ones direction mixed with real structure, and every later direction is bent by it. Giving the
    mean its own column and the remaining r - 1 to the centred input's principal directions rebuilds the
    mean key and value exactly and spends the rest on how tokens differ. That is the part a softmax sees:
    adding one vector to every key moves all of a query's logits by the same amount.
    """
    w = torch.ones(xw.shape[:-1], dtype=xw.dtype, device=xw.device) if mask is None else mask
    n = w.sum(dim=-1, keepdim=True).clamp_min(1)  # (..., 1)
    mean = (xw * w.unsqueeze(-1)).sum(dim=-2, keepdim=True) / n.unsqueeze(-1)  # (..., 1, d)
    return (xw - mean) * w.unsqueeze(-1), (w / n.sqrt()).unsqueeze(-1)


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
            rand_gen = generator if xw.device.type == "cpu" else None  # None: a fixed seed on xw's device
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
    p = randomized_width(L, d, m)
    if generator is None or generator.device != xw.device:
        # A fixed seed by default: the same input gives the same basis (and the same numbers) every time,
        # whatever other code did with the global random state.
        generator = torch.Generator(device=xw.device).manual_seed(_COMPLETION_SEED)
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
