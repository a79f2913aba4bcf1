"""The second-order form: softmax expanded to second order around a learnable point, on r principal keys.

For query i and reconstructed key j (K_r = U_r U_r^T K, so c q_i . k_r,j = p_i . u_j with
p_i = c q_i K'^T and u_j row j of U_r), with per-head temperature t and expansion point m::

    x_ij = t p_i . u_j - m,     w_ij = 1 + x_ij + x_ij^2 / 2,     out_i = sum_j w_ij v_r,j / sum_j w_ij

**Why the weights are positive**: 1 + x + x^2/2 = ((1 + x)^2 + 1) / 2 >= 1/2 for every real x, so no
denominator can cross zero (the linear form's 1 + s can). m is learned per head so that x stays small
where the head's scores live (exp(s) = e^m exp(x) ~ e^m (1 + x + x^2/2), and e^m cancels).

**What it costs**: with a = 1 - m + m^2/2, b = t (1 - m) and W = U_r V' (row j = v_r,j)::

    numerator_i   = a s^T V' + b p_i^T (U_r^T U_r) V' + (t^2/2) p_i^T A2 p_i,   A2 = sum_j u_j u_j^T W_j
    denominator_i = a n + b p_i . s + (t^2/2) p_i^T (U_r^T U_r) p_i

A2 is r x r x d_h per key/value head (L r^2 d_h to build), and each query contracts it twice (r^2 d_h):
O(L r^2 d_h) in all, sub-quadratic only while r^2 is well below L. Where that is dearer than the
explicit L x L weights (L (r + d_h) per query, short texts: :func:`closed_form`), the weights are
computed explicitly: the same numbers in another order. Causal: the same sums over j <= i, in blocks
(an explicit block x block matrix inside a block, the running sums across blocks), never L x L. At
r = L it is second-order Taylor attention on the full keys.
"""

from __future__ import annotations

import torch

from atp_viz.core import attention as att
from atp_viz.core import costs as _costs
from atp_viz.forms.base import AttentionForm, PrincipalPast

BLOCK = 128  # query rows per block: the causal path's block, and the row block of the quadratic term


def closed_form(L: int, r: int, dh: int) -> bool:
    """Whether the closed form (``r^2 d_h`` per query, plus building A2) is cheaper than the explicit
    weights over L keys (``L (r + d_h)`` per query)."""
    return L * (r + dh) > r * r * dh + r * dh + r * r


def _weights(x: torch.Tensor) -> torch.Tensor:
    return 1.0 + x + 0.5 * x * x  # >= 1/2 everywhere


def _coefficients(params, G: int, Hkv: int, dtype):
    """a, b, t^2/2 shaped [1, Hkv, G, 1, 1] (query head h = kv head h // G, group member h % G)."""
    t, m = params["t"], params["m"]
    shape = (1, Hkv, G, 1, 1)
    a = (1.0 - m + 0.5 * m * m).reshape(shape)
    b = (t * (1.0 - m)).reshape(shape)
    c2 = (0.5 * t * t).reshape(shape)
    return a, b, c2, t.reshape(shape), m.reshape(shape)


def _quadratic(p: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """p^T A2 p per query: p [B, Hkv, G, T, r], A2 [B, Hkv, r, r, e] -> [B, Hkv, G, T, e] (row blocks)."""
    B, Hkv, G, T, r = p.shape
    e = A2.shape[-1]
    flat = A2.reshape(B, Hkv, 1, r, r * e)
    outs = []
    for a in range(0, T, BLOCK):
        pb = p[..., a : a + BLOCK, :]  # (B, Hkv, G, t, r)
        tmp = (pb @ flat).reshape(*pb.shape[:-1], r, e)  # (B, Hkv, G, t, r, e)
        outs.append((pb.unsqueeze(-2) @ tmp).squeeze(-2))  # (B, Hkv, G, t, e)
    return torch.cat(outs, dim=-2)


def _second_moment(u: torch.Tensor, W: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """sum_j u_j u_j^T W_j: u [B, L, r], W [B, Hkv, L, e] -> [B, Hkv, r, r, e], as GEMMs of the
    flattened outer products (u_j (x) u_j, r^2 wide) with W, over blocks of ``rows`` keys."""
    B, L, r = u.shape
    Hkv, e = W.shape[1], W.shape[-1]
    out = u.new_zeros(B, Hkv, r * r, e)
    for a in range(0, L, rows):
        ub = u[:, a : a + rows]
        outer = (ub.unsqueeze(-1) * ub.unsqueeze(-2)).reshape(B, 1, -1, r * r)  # (B, 1, T, r^2)
        out = out + outer.mT @ W[:, :, a : a + rows]  # (B, Hkv, r^2, e)
    return out.reshape(B, Hkv, r, r, e)


class _Sums:
    """Running sums over keys j of the closed form: n, s = sum u_j, Gram = sum u_j u_j^T, and per kv head
    A0 = sum W_j, A1 = sum u_j W_j^T, A2 = sum u_j u_j^T W_j (W_j = u_j^T V', or [W_j | 1] augmented)."""

    def __init__(self, u: torch.Tensor, W: torch.Tensor, n: torch.Tensor):
        # u [B, L, r] (zero rows at padding), W [B, Hkv, L, e], n [B] real tokens
        self.n = n
        self.s = u.sum(dim=1)  # (B, r)
        self.gram = u.mT @ u  # (B, r, r)
        self.A0 = W.sum(dim=2)  # (B, Hkv, e)
        self.A1 = u.mT.unsqueeze(1) @ W  # (B, Hkv, r, e)
        self.A2 = _second_moment(u, W)  # (B, Hkv, r, r, e)

    def add(self, other: _Sums) -> None:
        for name in ("n", "s", "gram", "A0", "A1", "A2"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def apply(self, p, a, b, c2):
        """(numerator [B, Hkv, G, T, e], denominator [B, Hkv, G, T, 1]) of queries p [B, Hkv, G, T, r]."""
        num = a * self.A0[:, :, None, None, :] + b * (p @ self.A1.unsqueeze(2)) + c2 * _quadratic(p, self.A2)
        gp = p @ self.gram[:, None, None]  # (B, Hkv, G, T, r)
        den = (
            a * self.n[:, None, None, None, None]
            + b * (p @ self.s[:, None, None, :, None])
            + c2 * (gp * p).sum(-1, keepdim=True)
        )
        return num, den


class Taylor2Form(AttentionForm):
    name = "taylor2"
    display_name = "second-order Taylor, learnable expansion point (positive)"
    description = (
        "1 + x + x^2/2 with x = t s - m per head, over r principal keys: positive weights (>= 1/2), "
        "cost L r^2 d_h"
    )
    latex = (
        r"o_i = \frac{\sum_j w_{ij}\, v_{r,j}}{\sum_j w_{ij}},\ w_{ij} = 1 + x_{ij} + \tfrac{1}{2}x_{ij}^2"
        r" = \tfrac{1}{2}\big((1 + x_{ij})^2 + 1\big),\ x_{ij} = t\,c\,q_i k_{r,j}^\top - m"
    )
    latex_causal = latex.replace(r"\sum_j", r"\sum_{j \le i}")
    cost_order = "L r^2"
    sign_invariant = True
    positive = True
    needs_basis_rows = True
    full_rank = "second-order Taylor attention on the full keys"
    param_defaults = {"t": 1.0, "m": 0.0}

    def _attend(self, q, k, v, U, km, c, causal, return_maps, *, params):
        B, H, L, dh = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        a, b, c2, t, m = _coefficients(params, G, Hkv, q.dtype)
        Ut = U.mT.unsqueeze(1)  # (B, 1, r, L)
        Kp, Vp = Ut @ k, Ut @ v  # (B, Hkv, r, dh)  K', V'
        p = c * (att.grouped(q, Hkv, G) @ Kp.unsqueeze(2).mT)  # (B, Hkv, G, L, r)  c q_i K'^T
        W = U.unsqueeze(1) @ Vp  # (B, Hkv, L, dh)  row j = v_r,j
        valid = torch.ones(B, L, dtype=q.dtype, device=q.device) if km is None else km.to(q.dtype)
        if not closed_form(L, U.shape[-1], dh):
            num, den = _explicit(p, U, W, valid, t, m, causal)
        elif not causal:
            num, den = _Sums(U, W, valid.sum(-1)).apply(p, a, b, c2)
        else:
            num, den = _causal(p, U, W, valid, a, b, c2, t, m)
        out = att.ungrouped(torch.where(den > 0, num / den, torch.zeros((), dtype=q.dtype)))
        if not return_maps:
            return out
        allowed = att.allowed_mask(L, L, causal, km, q.device)
        tokens = self._token_weights(q, U.unsqueeze(1) @ Kp, U, allowed, c, params=params)  # (B, H, L, L)
        return out, {"principal": tokens @ U.unsqueeze(1)}  # (B, H, L, r): weights on V' (V_r = U V')

    def kernel(self, scores, params):
        return _weights(params["t"] * scores - params["m"])  # >= 1/2

    def _token_weights(self, q, Kr, U, allowed, c, *, params):
        H, Hkv = q.shape[1], Kr.shape[1]
        G = H // Hkv
        _, _, _, t, m = _coefficients(params, G, Hkv, q.dtype)
        w = self.kernel(
            c * (att.grouped(q, Hkv, G) @ Kr.unsqueeze(2).mT), {"t": t, "m": m}
        )  # (B, Hkv, G, T, L)
        if allowed is not None:
            w = w.masked_fill(~allowed, 0.0)
        den = w.sum(dim=-1, keepdim=True)
        return att.ungrouped(torch.where(den > 0, w / den, torch.zeros((), dtype=w.dtype)))

    def full_rank_reference(self, q, k, v, *, causal=False, scaling=None, key_mask=None, params=None):
        B, H, Hkv, L, dh, G = att.check_qkv(q, k, v)
        params = self._params(params, H, q)
        allowed = att.allowed_mask(L, L, causal, att.check_key_mask(key_mask, B, L, q.device), q.device)
        w = self._token_weights(q, k, None, allowed, att.scale(scaling, dh), params=params)
        return att.ungrouped(att.grouped(w, Hkv, G) @ v.unsqueeze(2))

    def _stream(self, q, k, v, past: PrincipalPast | None, c, *, params):
        H, C, dh = q.shape
        Hkv, n_exact = k.shape[0], k.shape[1]
        G = H // Hkv
        a, b, c2, t, m = (x[0] for x in _coefficients(params, G, Hkv, q.dtype))  # (Hkv, G, 1, 1)
        qg = q.view(Hkv, G, C, dh)
        allowed = torch.ones(C, n_exact, dtype=torch.bool, device=q.device).tril(n_exact - C)
        w = _weights(t * c * torch.einsum("hgcd,hkd->hgck", qg, k) - m) * allowed  # (Hkv, G, C, T+C)
        num = torch.einsum("hgck,hkd->hgcd", w, v)
        den = w.sum(dim=-1, keepdim=True)
        if past is not None:
            p = c * torch.einsum("hgcd,hrd->hgcr", qg, past.kp)[None]  # (1, Hkv, G, C, r)
            W = (past.u @ past.vp).unsqueeze(0)  # (1, Hkv, n, dh)
            n = torch.tensor([float(past.n)], dtype=q.dtype, device=q.device)
            pn, pd = _Sums(past.u.unsqueeze(0), W, n).apply(p, a[None], b[None], c2[None])
            num, den = num + pn[0], den + pd[0]
        return (num / den).reshape(H, C, dh)

    def cache_floats(self, n: int, r: int, n_kv_heads: int, head_dim: int) -> int:
        # U_r as well: the second-order term needs sum_j u_j u_j^T W_j of the past (or U_r to build it).
        return super().cache_floats(n, r, n_kv_heads, head_dim) + n * min(r, n)

    def past_macs(self, C: int, n: int, r: int, geom: _costs.Geometry) -> float:
        # W = U V' and the sums of the closed form (A2 dominates: n r^2 dh per kv head), then per query
        # p, p^T A2 p, p^T A1 and p^T Gram p
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        sums = float(Hkv) * n * (r * dh + r * r * dh + r * dh) + float(n) * r * r
        return sums + float(H) * C * (r * dh + r * r * dh + r * dh + r * r)

    def attention_cost(self, L: int, r: int, geom: _costs.Geometry) -> _costs.LayerCost:
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        if not closed_form(L, r, dh):  # explicit weights: x = p U^T, then w W
            kv = 3.0 * L * r * dh * Hkv  # K', V', W = U V'
            return _costs.LayerCost(
                macs=kv + float(L) * H * (r * dh + L * (r + dh)),
                scores=float(H) * L * L,
                formula=r"H\,L^2 (r + d_h)",
            )
        kv = 3.0 * L * r * dh * Hkv + float(L) * r * r * dh * Hkv  # K', V', W = U V', then A2
        per_query = float(L) * H * (r * dh + r * r * dh + r * dh + r * r)  # p, p^T A2 p, p^T A1, p^T G p
        return _costs.LayerCost(
            macs=kv + per_query,
            scores=float(H) * L * r,
            formula=r"(H_{kv} + H)\,L\,r^2 d_h",
        )


def _explicit(p, U, W, valid, t, m, causal: bool):
    """The weights over every key at once (short texts).

    p [B, Hkv, G, L, r], U [B, L, r], W [B, Hkv, L, e]."""
    L = p.shape[-2]
    w = _weights(t * (p @ U[:, None, None].mT) - m)  # (B, Hkv, G, L, L)
    mask = valid[:, None, None, None, :] > 0
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=p.device).tril()
    w = w * mask
    return w @ W.unsqueeze(2), w.sum(dim=-1, keepdim=True)


def _causal(p, U, W, valid, a, b, c2, t, m):
    """Causal sums over j <= i, block by block: explicit weights inside a block, the running sums of the
    earlier blocks (:class:`_Sums`) across blocks. p [B, Hkv, G, L, r], U [B, L, r], W [B, Hkv, L, e]."""
    L = p.shape[-2]
    state: _Sums | None = None
    nums, dens = [], []
    for s0 in range(0, L, BLOCK):
        s1 = min(s0 + BLOCK, L)
        pb, ub, Wb, vb = p[..., s0:s1, :], U[:, s0:s1], W[:, :, s0:s1], valid[:, s0:s1]
        T = s1 - s0
        x = t * (pb @ ub[:, None, None].mT) - m  # (B, Hkv, G, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=p.device).tril() & (vb[:, None, None, None, :] > 0)
        w = _weights(x) * mask
        num = w @ Wb.unsqueeze(2)  # (B, Hkv, G, T, e)
        den = w.sum(dim=-1, keepdim=True)
        if state is not None:
            n2, d2 = state.apply(pb, a, b, c2)
            num, den = num + n2, den + d2
        nums.append(num)
        dens.append(den)
        block = _Sums(ub, Wb, vb.sum(-1))
        if state is None:
            state = block
        else:
            state.add(block)
    return torch.cat(nums, dim=-2), torch.cat(dens, dim=-2)


FORM = Taylor2Form()
