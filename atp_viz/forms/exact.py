"""The exact form: softmax over the rank-r reconstruction of the keys and values (the reference).

    out = softmax(c Q K_r^T + mask) V_r,   K_r = U_r U_r^T K,   V_r = U_r U_r^T V

Its weights are a softmax, so they are positive. It equals dense attention once U_r spans the keys
and values (r = L), and it isolates the error of dropping bases from the error of changing the
kernel. Cost: quadratic like dense attention, O(L^2 d_h) per head plus 4 L r d_h per key/value head
to build K', V', K_r, V_r; as a compressed cache it must also keep U_r (n x r) to rebuild the keys.
"""

from __future__ import annotations

import torch

from atp_viz.core import attention as att
from atp_viz.core import costs as _costs
from atp_viz.forms.base import AttentionForm, PrincipalPast


class ExactForm(AttentionForm):
    name = "exact"
    display_name = "exact softmax on rank-r keys (reference)"
    description = (
        "softmax(c Q K_r^T) V_r on the keys and values rebuilt from r principal keys: the error of "
        "dropping bases alone; quadratic like dense"
    )
    latex = (
        r"\operatorname{softmax}\!\big(c\,Q K_r^\top\big) V_r,\quad K_r = U_r K',\ V_r = U_r V',"
        r"\ K' = U_r^\top K,\ V' = U_r^\top V"
    )
    latex_causal = (
        r"\operatorname{softmax}\!\big(c\,Q K_r^\top + M\big) V_r,\ K_r = U_r K',\ V_r = U_r V',"
        r"\ M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i \end{cases}\ \text{(causal mask)}"
    )
    cost_order = "L^2"
    sign_invariant = True
    positive = True
    needs_basis_rows = True
    full_rank = "dense attention"
    map_kind = "tokens"

    # Which inputs are rebuilt from the principal keys: both for the registered form; the diagnostic
    # variants below keep one of them exact (full-sequence attention only: a compressed past has no
    # exact keys or values left to keep).
    project_keys = True
    project_values = True

    def _attend(self, q, k, v, U, km, c, causal, return_maps, *, params):
        Ut = U.mT.unsqueeze(1)  # (B, 1, r, L)
        Kr = U.unsqueeze(1) @ (Ut @ k) if self.project_keys else k  # (B, Hkv, L, dh)  K_r = U U^T K
        Vr = U.unsqueeze(1) @ (Ut @ v) if self.project_values else v  # (B, Hkv, L, dh)  V_r = U U^T V
        res = att.dense_attention(
            q, Kr, Vr, causal=causal, scaling=c, key_mask=km, return_weights=return_maps
        )
        if return_maps:
            out, probs = res
            return out, {"tokens": probs}  # softmax over the reconstructed keys; principal = probs @ U_r
        return res

    def _token_weights(self, q, Kr, U, allowed, c, *, params):
        zeros = torch.zeros_like(Kr)  # only the weights are wanted
        return att.dense_attention(q, Kr, zeros, scaling=c, mask=allowed, return_weights=True)[1]

    def full_rank_reference(self, q, k, v, *, causal=False, scaling=None, key_mask=None, params=None):
        return att.dense_attention(q, k, v, causal=causal, scaling=scaling, key_mask=key_mask)

    def _stream(self, q, k, v, past: PrincipalPast | None, c, *, params):
        keys, vals = k, v
        if past is not None:
            kr = torch.einsum("nr,hrd->hnd", past.u, past.kp)  # (Hkv, n, dh): K_r = U_r K'
            vr = torch.einsum("nr,hrd->hnd", past.u, past.vp)
            keys, vals = torch.cat([kr, k], dim=1), torch.cat([vr, v], dim=1)
        # Bottom-right causal alignment: chunk query j sees the past, the tail and chunk tokens <= j (never
        # an empty row). torch's fused kernel, not the eager reference (att.dense_attention): the same
        # numbers to rounding (tested), 3-4x faster on CPU at a prefill's sizes (the prefill bench times it).
        C, n = q.shape[1], keys.shape[1]
        allowed = torch.ones(C, n, dtype=torch.bool, device=q.device).tril(n - C)
        return att.fused_attention(q[None], keys[None], vals[None], mask=allowed, scaling=c)[0]  # (H, C, dh)

    def cache_floats(self, n: int, r: int, n_kv_heads: int, head_dim: int) -> int:
        # U_r as well, to rebuild K_r = U_r K' for the softmax.
        return super().cache_floats(n, r, n_kv_heads, head_dim) + n * min(r, n)

    def past_macs(self, C: int, n: int, r: int, geom: _costs.Geometry) -> float:
        # K_r = U_r K' and V_r = U_r V' (n r dh per kv head each), then softmax over all n past keys
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        return 2.0 * Hkv * n * r * dh + 2.0 * H * C * n * dh

    def attention_cost(self, L: int, r: int, geom: _costs.Geometry) -> _costs.LayerCost:
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        return _costs.LayerCost(
            macs=2.0 * H * L * L * dh + 4.0 * Hkv * L * r * dh,
            scores=float(H) * L * L,
            formula=r"2\,H\,L^2 d_h + 4\,H_{kv} L r d_h",
        )


class _KeysOnly(ExactForm):
    name = "exact-keys-only"
    display_name = "exact softmax, rank-r keys, exact values (diagnostic)"
    description = "softmax(c Q K_r^T) V: only the keys rebuilt from r principal keys"
    project_values = False


class _ValuesOnly(ExactForm):
    name = "exact-values-only"
    display_name = "exact softmax, exact keys, rank-r values (diagnostic)"
    description = "softmax(c Q K^T) V_r: only the values rebuilt from r principal keys"
    project_keys = False


FORM = ExactForm()
# Not registered (the app does not offer them): which of the two projections costs the exact form its
# accuracy. ``atp_viz.outputs.result_tuning.measure_projection_split`` registers them in its own process.
DIAGNOSTIC_VARIANTS = (_KeysOnly(), _ValuesOnly())
