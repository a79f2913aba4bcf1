"""The paper's linear form: softmax expanded to first order, exp(s) ~ 1 + s, on r principal keys.

For query row i (c = scaling, n = number of real tokens, s = U_r^T 1)::

    numerator   = s^T V' + c (q_i K'^T) V'
    denominator = n + c (q_i K'^T) s

Non-causal it is exactly first-order Taylor softmax over the reconstructed keys and values
(weights 1 + c q_i k_r,j over V_r), and at r = L plain (1 + s) linear attention on the full keys.
Cost O(L r d_h) (or O(L d_h^2) reassociated), no L x L matrix. **Not a positive kernel**: a weight
1 + s_ij is negative once s_ij < -1, and pretrained models give |s| in the tens, so denominators cross
zero and outputs blow up (the tour's step "why 1 + s breaks" plots them). Kept unchanged as the
faithful reference of the paper. Causal: sums over all tokens become prefix sums over j <= i,
computed in blocks of :data:`CAUSAL_CHUNK` (never L x L, never ``[L, r, r]``); the basis still comes
from the whole sequence, so K' and V' mix in later tokens.
"""

from __future__ import annotations

import torch

from atp_viz.core import attention as att
from atp_viz.core import costs as _costs
from atp_viz.forms.base import AttentionForm, PrincipalPast, principal

# Block length of the causal path: the only quadratic buffer it holds is chunk x chunk per head.
CAUSAL_CHUNK = 128


def reassociate(r: int, dh: int) -> bool:
    """Whether the non-causal path is evaluated as ``q (K'^T V')`` (True) or ``(q K'^T) V'``: the cheaper
    per query, ``dh (dh + 1)`` vs ``r (2 dh + 1)`` multiply-adds."""
    return dh * (dh + 1) < r * (2 * dh + 1)


class LinearForm(AttentionForm):
    name = "linear"
    display_name = "linear, 1 + s (the paper's)"
    description = (
        "the paper's first-order form exp(s) ~ 1 + s over r principal keys: linear cost, but 1 + s is "
        "not a positive kernel"
    )
    latex = (
        r"o_i = \frac{(\mathbf{1}^\top U_r)\,V' + c\,(q_i K'^\top)\,V'}"
        r"{L + c\,(q_i K'^\top)(U_r^\top \mathbf{1})}"
    )
    # Positions counted from 1: prefix sums over j <= i and the count i of tokens up to i instead of L;
    # u_j is row j of U_r (token j's weights, an r-vector), not a basis column.
    latex_causal = (
        r"o_i = \frac{s_i^\top V' + c\,(q_i K'^\top)\,P_i V'}{i + c\,(q_i K'^\top)\,s_i},"
        r"\quad s_i = \sum_{j \le i} u_j,\ P_i = \sum_{j \le i} u_j u_j^\top,"
        r"\quad u_j^\top = \text{row } j \text{ of } U_r,\ i = 1, \dots, L"
    )
    cost_order = "L r"
    sign_invariant = True  # every term is quadratic in u
    positive = False
    full_rank = "first-order (1 + s) attention on the full keys"
    paper = True

    def _attend(self, q, k, v, U, km, c, causal, return_maps, *, params):
        G = q.shape[1] // k.shape[1]
        out = _causal(q, k, v, U, km, c, G, maps=False)[0] if causal else _noncausal(q, k, v, U, km, c, G)
        if not return_maps:
            return out
        # The map takes a pass of its own, so recording it never changes how the output is rounded: the
        # app (which records maps) and the command line (which does not) show the same numbers.
        pmap = _causal(q, k, v, U, km, c, G, maps=True)[1] if causal else _noncausal_map(q, k, U, km, c, G)
        return out, {"principal": pmap}  # (B, H, L, r); tokens = principal @ U_r^T

    def kernel(self, scores, params):
        return 1.0 + scores  # negative once s < -1: not a positive kernel

    def _token_weights(self, q, Kr, U, allowed, c, *, params):
        H, Hkv = q.shape[1], Kr.shape[1]
        A = self.kernel(c * (att.grouped(q, Hkv, H // Hkv) @ Kr.unsqueeze(2).mT), params)  # (B, Hkv, G, T, L)
        if allowed is not None:
            A = A.masked_fill(~allowed, 0.0)
        den = A.sum(dim=-1, keepdim=True)
        return att.ungrouped(torch.where(den != 0, A / den, torch.zeros((), dtype=A.dtype)))

    def full_rank_reference(self, q, k, v, *, causal=False, scaling=None, key_mask=None, params=None):
        return att.linearised_dense_attention(q, k, v, causal=causal, scaling=scaling, key_mask=key_mask)

    def _stream(self, q, k, v, past: PrincipalPast | None, c, *, params):
        H, C, dh = q.shape
        Hkv, n_exact = k.shape[0], k.shape[1]
        qg = q.view(Hkv, H // Hkv, C, dh)  # (Hkv, G, C, dh): query heads grouped by their kv head
        causal = torch.ones(C, n_exact, dtype=torch.bool, device=q.device).tril(n_exact - C)
        a = (1.0 + c * torch.einsum("hgcd,hkd->hgck", qg, k)) * causal  # (Hkv, G, C, T+C)
        num = torch.einsum("hgck,hkd->hgcd", a, v)
        den = a.sum(dim=-1, keepdim=True)  # (Hkv, G, C, 1)
        if past is not None:
            phi = c * torch.einsum("hgcd,hrd->hgcr", qg, past.kp)  # c q K'^T: (Hkv, G, C, r)
            num = num + torch.einsum("r,hrd->hd", past.s, past.vp)[:, None, None, :]
            num = num + torch.einsum("hgcr,hrd->hgcd", phi, past.vp)
            den = den + past.n + (phi @ past.s)[..., None]
        return (num / den).reshape(H, C, dh)

    def past_macs(self, C: int, n: int, r: int, geom: _costs.Geometry) -> float:
        # c q K'^T, then phi V' and phi . s: r (2 dh + 1) per query head, plus s^T V' once
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        return float(H) * C * r * (2 * dh + 1) + float(Hkv) * r * dh

    def attention_cost(self, L: int, r: int, geom: _costs.Geometry) -> _costs.LayerCost:
        """What the non-causal path computes: ``U^T K``, ``U^T V`` (``L r dh`` per key/value head each),
        then per query head ``q (K'^T [V'|s])`` (``L dh (dh+1)``) or ``(q K'^T) [V'|s]``
        (``L r (2 dh + 1)``), whichever is cheaper (:func:`reassociate`). ``detail["paper_order"]`` is
        ATP_NOTES' count, ``2 L r dh`` per query head."""
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        kv = 2.0 * L * r * dh * Hkv
        if reassociate(r, dh):
            per_query = float(L) * dh * (dh + 1) * H + float(r) * dh * (dh + 1) * Hkv
        else:
            per_query = float(L) * r * (2 * dh + 1) * H
        return _costs.LayerCost(
            macs=kv + per_query,
            scores=float(H) * L * r,
            formula=r"2\,H_{kv} L r d_h + 2\,H L r d_h",
            detail={"paper_order": kv + 2.0 * L * r * dh * H},
        )


def _noncausal(q, k, v, U, km, c, G):
    """The non-causal path without maps (the serving path); same formula as :meth:`LinearForm.attend`.

    With ``phi_i = c q_i K'^T`` and ``s = U_r^T 1``, numerator and denominator are one product with the
    value matrix augmented by the column ``s``::

        [num_i | den_i] = [s^T V' | n] + phi_i [V' | s]

    Evaluated in the cheaper association (:func:`reassociate`; same sums in another order); then no
    ``L x r`` scores are held either. No L x L tensor, no float64, no K/V repeat. The result is a view of
    the numerator buffer (divided in place), so it may be non-contiguous.
    """
    B, H, L, dh = q.shape
    Hkv = H // G
    r = U.shape[-1]
    Kp = principal(U, k)  # (B, Hkv, r, dh)  principal keys K'
    Vp = principal(U, v)  # (B, Hkv, r, dh)  principal values V'
    s = U.sum(dim=1)  # (B, r)  U_r^T 1
    n = torch.full((B,), L, dtype=q.dtype, device=q.device) if km is None else km.sum(-1).to(q.dtype)
    s_col = s[:, None, :, None].expand(B, Hkv, r, 1)
    Vaug = torch.cat([Vp, s_col], dim=-1)  # (B, Hkv, r, dh + 1)  [V' | s]
    bias = torch.cat(
        [s[:, None, None, :] @ Vp, n[:, None, None, None].expand(B, Hkv, 1, 1)], dim=-1
    )  # (B, Hkv, 1, dh + 1)  [s^T V' | n]
    qg = att.grouped(q, Hkv, G)  # (B, Hkv, G, L, dh)
    if reassociate(r, dh):
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
    return att.ungrouped(out)  # (B, H, L, dh)


def _noncausal_map(q, k, U, km, c, G):
    """A' = (U_r^T 1 + c K' q_i^T) / denominator, ``[B, H, L, r]`` (non-causal)."""
    B, H, L, dh = q.shape
    Kp = U.mT.unsqueeze(1) @ k  # (B, Hkv, r, dh)  principal keys K'
    phi = c * (att.grouped(q, H // G, G) @ Kp.unsqueeze(2).mT)  # (B, Hkv, G, L, r)  c q_i K'^T
    s5 = U.sum(dim=1)[:, None, None, None, :]  # (B, 1, 1, 1, r)  U_r^T 1
    n = torch.full((B,), L, dtype=q.dtype, device=q.device) if km is None else km.sum(-1).to(q.dtype)
    n5 = n[:, None, None, None, None]  # (B, 1, 1, 1, 1)
    pmap = (s5 + phi) / (n5 + phi @ s5.mT)  # (B, Hkv, G, L, r)
    return att.ungrouped(torch.where(n5 > 0, pmap, torch.zeros((), dtype=q.dtype)))


def _causal(q, k, v, U, km, c, G, *, maps: bool):
    """The causal path: (output ``[B, H, L, dh]``, the map A' ``[B, H, L, r]`` or None).

    Prefix sums over j <= i, ``s_i = sum u_j``, ``P_i = sum u_j u_j^T``: numerator
    ``s_i^T V' + c q_i K'^T P_i V'``, denominator ``n_i + c q_i K'^T s_i``; ``(q_i K'^T) P_i V'`` is a causal
    linear attention (:func:`_causal_linear`) over the values ``[U_r V' | 1 (| U_r)]``.
    """
    B, H, L, dh = q.shape
    Hkv = H // G
    Ut = U.mT.unsqueeze(1)  # (B, 1, r, L)
    Kp = Ut @ k  # (B, Hkv, r, dh)  principal keys K'
    Vp = Ut @ v  # (B, Hkv, r, dh)  principal values V'
    phi = c * (att.grouped(q, Hkv, G) @ Kp.unsqueeze(2).mT)  # (B, Hkv, G, L, r)  c q_i K'^T
    W = U.unsqueeze(1) @ Vp  # (B, Hkv, L, dh)  row j = u_j^T V'
    r = U.shape[-1]
    vals = [W.unsqueeze(2), torch.ones(B, Hkv, 1, L, 1, dtype=q.dtype, device=q.device)]
    if maps:
        vals.append(U[:, None, None].expand(B, Hkv, 1, L, r))  # (B, Hkv, 1, L, r)
    res = _causal_linear(phi, U[:, None, None], torch.cat(vals, dim=-1), CAUSAL_CHUNK)
    n = (
        torch.arange(1, L + 1, dtype=q.dtype, device=q.device).expand(B, L)
        if km is None
        else km.to(q.dtype).cumsum(-1)
    )
    n5 = n[:, None, None, :, None]  # (B, 1, 1, L, 1)
    num = W.cumsum(dim=-2).unsqueeze(2) + res[..., :dh]  # (B, Hkv, G, L, dh)
    den = n5 + res[..., dh : dh + 1]  # (B, Hkv, G, L, 1)
    zero = torch.zeros((), dtype=q.dtype)
    out = att.ungrouped(torch.where(n5 > 0, num / den, zero))  # (B, H, L, dh)
    if not maps:
        return out, None
    pmap = (U.cumsum(dim=1)[:, None, None] + res[..., dh + 1 :]) / den
    return out, att.ungrouped(torch.where(n5 > 0, pmap, zero))


def _causal_linear(phi: torch.Tensor, u: torch.Tensor, values: torch.Tensor, chunk: int) -> torch.Tensor:
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


FORM = LinearForm()
