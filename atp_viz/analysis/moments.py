"""A layer's past kept as running sums, from which its top-r principal keys and values come at any time.

Reading a long text in chunks, each chunk needs the principal keys/values of *everything before it*.
Recomputing an SVD of the whole past for every chunk costs O(n d r) per chunk, O(L^2) in all: more than
dense attention at the lengths where ATP should pay. But with S the past's basis source (its attention
inputs X, or its keys), S = U Sigma W^T, and U_r = S W_r Sigma_r^-1, everything a linear-cost form needs
is a function of a few running sums over the past tokens:

    G = S^T S  (eigenvectors W, eigenvalues Sigma^2),   K' = U_r^T K = Sigma_r^-1 W_r^T (S^T K),
    V' = Sigma_r^-1 W_r^T (S^T V),                      U_r^T 1 = Sigma_r^-1 W_r^T (S^T 1).

Appending a chunk of C tokens costs C d_s (d_s + 2 H_kv d_h) multiply-adds, and the principal past an
eigendecomposition of the d_s x d_s matrix G: independent of how long the past is. d_s is d (input) or
H_kv d_h (keys: 192 for SmolLM2, so "keys" is the cheap choice). The basis is the same as the SVD's, up
to the sign of each vector; here each is signed so that U_r^T 1 >= 0 (the SVD path signs by the largest
entry of U_r, which needs U_r itself), which only a sign-dependent form (``pksoftmax``) can notice.

What it cannot give is U_r itself (n x r): forms that rebuild every past key (``exact``, ``taylor2``)
need the recomputed SVD (``chunked_logits(basis_update="recompute")``).
"""

from __future__ import annotations

import torch

from atp_viz.forms import PrincipalPast

RELATIVE_FLOOR = 1e-7  # eigenvalues below this share of the largest are numerically zero: not a direction


class MomentStore:
    """Running sums of one layer's past (``append`` a chunk, ``past(r)`` for its principal keys/values).

    Duck-types :class:`atp_viz.analysis.serving.LayerMemory` where ``StreamPlan`` appends to its stores.
    Sums are kept in float64 (a long past adds many chunks); the eigendecomposition runs in float32 on
    G / n (the d_s x d_s matrix: float64 LAPACK there costs more than the rest of the step).
    """

    def __init__(self, basis_from: str = "keys") -> None:
        if basis_from not in ("input", "keys"):
            raise ValueError(f"basis_from must be 'input' or 'keys', got {basis_from!r}")
        self.basis_from = basis_from
        self.n = 0
        self.G: torch.Tensor | None = None  # (d_s, d_s)
        self.SK: torch.Tensor | None = None  # (d_s, Hkv * dh)
        self.SV: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None  # (d_s,)
        self.shape: tuple[int, int] | None = None  # (Hkv, dh)
        self.dtype = torch.float32  # the keys' dtype, for what past() returns

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Add a chunk: k/v ``[Hkv, C, dh]``, x ``[C, d]``."""
        Hkv, C, dh = k.shape
        kf = k.transpose(0, 1).reshape(C, Hkv * dh)
        vf = v.transpose(0, 1).reshape(C, Hkv * dh)
        # The basis source is a constant under autograd, as U_r is on the recomputed path
        # (core.basis.principal_basis): gradients reach K' and V' through the keys and values only.
        S = (kf if self.basis_from == "keys" else x).detach()
        parts = (S.mT @ S, S.mT @ kf, S.mT @ vf, S.sum(dim=0))  # float32 GEMMs, float64 sums
        if self.G is None:
            self.G, self.SK, self.SV, self.s1 = (p.double() for p in parts)
            self.shape, self.dtype = (Hkv, dh), k.dtype
        else:  # out of place: an earlier chunk's past() may still be in the autograd graph
            for name, p in zip(("G", "SK", "SV", "s1"), parts, strict=True):
                setattr(self, name, getattr(self, name) + p.double())
        self.n += C

    @property
    def n_exact(self) -> int:
        return 0  # nothing of the past is kept exactly

    def past(self, rank: int) -> PrincipalPast | None:
        """The top-``rank`` principal keys/values of everything appended so far (None when empty)."""
        if self.G is None or self.n == 0:
            return None
        lam, W = torch.linalg.eigh((self.G / self.n).float())  # ascending
        keep = lam > RELATIVE_FLOOR * lam[-1].clamp_min(1e-30)
        r = max(1, min(rank, self.n, int(keep.sum())))
        lam, W = lam[-r:].flip(0).double() * self.n, W[:, -r:].flip(1).double()  # (r,), (d_s, r)
        inv = lam.clamp_min(1e-300).rsqrt()[:, None]  # Sigma_r^-1
        kp, vp, s = inv * (W.mT @ self.SK), inv * (W.mT @ self.SV), inv[:, 0] * (W.mT @ self.s1)
        sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
        Hkv, dh = self.shape
        dtype = self.dtype

        def heads(m: torch.Tensor) -> torch.Tensor:
            return (sign[:, None] * m).reshape(r, Hkv, dh).transpose(0, 1).to(dtype).contiguous()

        return PrincipalPast(u=None, kp=heads(kp), vp=heads(vp), s=(sign * s).to(dtype), n=self.n)
