"""Softmax over the r principal keys: a teaching contrast, not a way to reach dense accuracy.

    w_i = softmax(t c q_i K'^T / n^e)   (r weights, positive, summing to 1),    out_i = w_i V' / sqrt(n)

V' is scaled by 1/sqrt(n): the top singular vector of X is close to the all-ones vector over sqrt(n), so
its principal value is sqrt(n) times the mean value and would inflate the output. The weights on the
principal keys are positive and peaked like a softmax, and the cost is O(L r d_h) with no L x L matrix.
But lifted to the tokens they are w_i . u_j / sqrt(n), **mixed in sign**: a softmax over pseudo-tokens
whose token loadings have both signs cannot express the signed weights the projection needs, and the
output changes when a basis vector changes sign (u -> -u flips a principal key but not its softmax
weight). It is not dense attention at r = L (softmax is not invariant under the rotation U), so it only
stands in for dense after training. Causal: the token weights are masked to j <= i (a causal linear
attention over the reconstructed values, in blocks).

Per-head parameters (defaults: the form above):

- ``t``, a temperature;
- ``e``, an exponent: the principal keys' logits are divided by n^e. K' = U_r^T K grows like sqrt(n) (its
  top key is about sqrt(n) times the mean key), so at e = 0 a long past's logits are sqrt(n) times too
  large and its softmax saturates; e = 1/2 makes the top principal key the mean key, whatever n is;
- ``b``, a log-weight that the streaming step adds to the compressed past's logits next to exact keys
  (the chunk itself, sinks and a sliding window): how much a head trusts the middle's principal keys
  against the tokens it reads exactly, learned as LoLCATs learns its per-head window factor. Over
  principal keys alone it adds the same to every logit and cancels.
"""

from __future__ import annotations

import math

import torch

from atp_viz.core import attention as att
from atp_viz.core import costs as _costs
from atp_viz.forms.base import AttentionForm, PrincipalPast
from atp_viz.forms.linear import CAUSAL_CHUNK, _causal_linear


def _scale(params, n: torch.Tensor, Hkv: int, G: int) -> torch.Tensor:
    """t / n^e per sequence and head, ``[B, Hkv, G, 1, 1]`` (n ``[B]``: the tokens behind the keys)."""
    t, e = params["t"].reshape(1, Hkv, G, 1, 1), params["e"].reshape(1, Hkv, G, 1, 1)
    return t * n.clamp(min=1).reshape(-1, 1, 1, 1, 1).to(t.dtype) ** -e


def _principal_weights(q, Kp, U, c, params, G):
    """softmax over principal keys ``[B, Hkv, G, L, r]``; all-zero basis columns (a shorter sequence of a
    padded batch) are not keys."""
    Hkv = Kp.shape[1]
    n = (U.abs().sum(-1) > 0).sum(-1)  # (B,) real tokens
    logits = _scale(params, n, Hkv, G) * c * (att.grouped(q, Hkv, G) @ Kp.unsqueeze(2).mT)
    present = U.abs().sum(dim=1) > 0  # (B, r)
    logits = logits.masked_fill(~present[:, None, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


class PrincipalSoftmaxForm(AttentionForm):
    name = "pksoftmax"
    display_name = "softmax over principal keys (teaching contrast)"
    description = (
        "softmax(t c q K'^T / n^e) V' / sqrt(n) over the r principal keys: positive on principal keys, "
        "mixed-sign on tokens, not sign invariant; cost L r d_h"
    )
    latex = r"o_i = \operatorname{softmax}\!\big(t\,c\,q_i K'^\top / n^{e}\big)\,V' / \sqrt{n}"
    latex_causal = (
        r"o_i = \sum_{j \le i} \frac{w_i \cdot u_j}{\sqrt{n}}\, v_{r,j},"
        r"\ w_i = \operatorname{softmax}\!\big(t\,c\,q_i K'^\top / n^{e}\big)"
    )
    cost_order = "L r"
    sign_invariant = False
    positive = False  # positive on principal keys, but the token weights have both signs
    normalised = False  # the token weights do not sum to 1
    full_rank = None
    param_defaults = {"t": 1.0, "e": 0.0, "b": 0.0}

    def _attend(self, q, k, v, U, km, c, causal, return_maps, *, params):
        B, H, L, dh = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        Ut = U.mT.unsqueeze(1)
        Kp, Vp = Ut @ k, Ut @ v  # (B, Hkv, r, dh)
        w = _principal_weights(q, Kp, U, c, params, G)  # (B, Hkv, G, L, r)
        n = (torch.full((B,), L, device=q.device) if km is None else km.sum(-1)).to(q.dtype)
        scale = torch.where(n > 0, n.clamp(min=1).rsqrt(), torch.zeros((), dtype=q.dtype))[
            :, None, None, None, None
        ]
        if causal:
            Vr = U.unsqueeze(1) @ Vp  # (B, Hkv, L, dh)
            out = _causal_linear(w, U[:, None, None], Vr.unsqueeze(2), CAUSAL_CHUNK) * scale
        else:
            out = (w @ Vp.unsqueeze(2)) * scale  # (B, Hkv, G, L, dh)
        out = att.ungrouped(out)
        if not return_maps:
            return out
        return out, {"principal": att.ungrouped(w)}  # weights on the principal keys (out = w V' / sqrt(n))

    def _token_weights(self, q, Kr, U, allowed, c, *, params):
        H, Hkv = q.shape[1], Kr.shape[1]
        G = H // Hkv
        Kp = U.mT.unsqueeze(1) @ Kr  # U^T K_r = U^T K
        w = _principal_weights(q, Kp, U, c, params, G)  # (B, Hkv, G, T, r)
        n = (U.abs().sum(-1) > 0).sum(-1).to(q.dtype).clamp(min=1)  # real tokens
        tok = (w @ U[:, None, None].mT) * n.rsqrt()[:, None, None, None, None]  # (B, Hkv, G, T, L)
        if allowed is not None:
            tok = tok.masked_fill(~allowed, 0.0)
        return att.ungrouped(tok)

    def _stream(self, q, k, v, past: PrincipalPast | None, c, *, params):
        """The chunk's queries attend by one softmax over the past's principal keys (values V'/sqrt(n), each
        key standing for n / r past tokens: log(n / r) + b added to its logit, t / n^e its temperature) and
        the exact keys (causal, temperature t)."""
        H, C, dh = q.shape
        Hkv, n_exact = k.shape[0], k.shape[1]
        G = H // Hkv
        t = params["t"].reshape(Hkv, G, 1, 1)
        qg = q.view(Hkv, G, C, dh)
        allowed = torch.ones(C, n_exact, dtype=torch.bool, device=q.device).tril(n_exact - C)
        logits = [(t * c * torch.einsum("hgcd,hkd->hgck", qg, k)).masked_fill(~allowed, float("-inf"))]
        values = [v]
        if past is not None:
            r = past.kp.shape[1]
            b = params["b"].reshape(Hkv, G, 1, 1)
            tp = _scale(params, torch.tensor([past.n], device=q.device), Hkv, G)[0]  # t / n^e
            pl = tp * c * torch.einsum("hgcd,hrd->hgcr", qg, past.kp) + math.log(max(past.n, 1) / r) + b
            logits.insert(0, pl)
            values.insert(0, past.vp / math.sqrt(max(past.n, 1)))
        w = torch.cat(logits, dim=-1).softmax(dim=-1)
        return torch.einsum("hgck,hkd->hgcd", w, torch.cat(values, dim=1)).reshape(H, C, dh)

    def past_macs(self, C: int, n: int, r: int, geom: _costs.Geometry) -> float:
        # c q K'^T and the softmax weights on V': r principal keys as if r extra tokens
        H, dh = geom.n_heads, geom.head_dim
        return 2.0 * H * C * r * dh

    def attention_cost(self, L: int, r: int, geom: _costs.Geometry) -> _costs.LayerCost:
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        return _costs.LayerCost(
            macs=2.0 * L * r * dh * Hkv + 2.0 * L * r * dh * H,
            scores=float(H) * L * r,
            formula=r"2\,H_{kv} L r d_h + 2\,H L r d_h",
        )


FORM = PrincipalSoftmaxForm()
