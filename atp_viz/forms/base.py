"""What every attention form provides, and the compressed past that streaming forms share.

An :class:`AttentionForm` is one way of attending on the top-r principal keys, in the spirit of
transformers' ``AttentionInterface``: one object per form, registered by name in
:mod:`atp_viz.forms`, holding everything about it:

- :meth:`~AttentionForm.attend`: full-sequence attention, non-causal and causal, grouped-query
  (K/V never repeated), padding;
- :meth:`~AttentionForm.stream`: the streaming step (the current chunk against a compressed past plus
  exact keys) that serving, the strictly causal perplexity and fine-tuning use;
- :meth:`~AttentionForm.token_weights`: its weights over the (reconstructed) tokens as an explicit
  L x L matrix, the reference the fast paths are tested against and what the tour plots;
- :meth:`~AttentionForm.cost` and :attr:`~AttentionForm.cost_order`, :meth:`~AttentionForm.cache_floats`;
- its display name, one-line description and LaTeX.

Shapes are those of :mod:`atp_viz.core.attention`: q ``[B, H, L, dh]``, k/v ``[B, Hkv, L, dh]``,
basis U_r ``[B, L, r]``, key_mask ``[B, L]`` (True = real token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from atp_viz.core import attention as att
from atp_viz.core import costs as _costs


@dataclass(frozen=True)
class PrincipalPast:
    """A past of ``n`` tokens compressed to r principal keys/values (basis from those tokens only).

    ``u`` ``[n, r]`` the basis (None when the past was compressed from running sums, which never hold
    U_r: :mod:`atp_viz.analysis.moments`), ``kp``/``vp`` ``[Hkv, r, dh]`` K' = U_r^T K and V' = U_r^T V,
    ``s`` ``[r]`` U_r^T 1. What a form must keep of it is :meth:`AttentionForm.cache_floats`.
    """

    u: torch.Tensor | None
    kp: torch.Tensor
    vp: torch.Tensor
    s: torch.Tensor
    n: int


def compress(u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> PrincipalPast:
    """Principal keys/values of a past: u ``[n, r]``, k/v ``[Hkv, n, dh]``."""
    u = u.to(k.dtype)
    return PrincipalPast(
        u=u,
        kp=torch.einsum("nr,hnd->hrd", u, k),  # (Hkv, r, dh): K' = U_r^T K
        vp=torch.einsum("nr,hnd->hrd", u, v),  # (Hkv, r, dh): V' = U_r^T V
        s=u.sum(dim=0),  # (r,): U_r^T 1
        n=int(u.shape[0]),
    )


class AttentionForm:
    """Base class of an ATP attention form; subclasses fill the class attributes and the ``_`` methods."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    description: ClassVar[str]  # one line
    latex: ClassVar[str]  # non-causal formula
    latex_causal: ClassVar[str]  # decoders
    cost_order: ClassVar[str]  # "L^2", "L r", "L r^2" (attention, basis excluded)
    sign_invariant: ClassVar[bool]  # output unchanged when a basis column changes sign
    positive: ClassVar[bool]  # every token weight > 0 whatever q, k (a positive kernel)
    full_rank: ClassVar[str | None]  # what it equals at r = L ("dense attention", ...), None if nothing
    paper: ClassVar[bool] = False  # the paper's own form (the faithful reference)
    normalised: ClassVar[bool] = True  # each query's token weights sum to 1
    # What attend(return_maps=True) draws: weights on the r principal keys ("principal", L x r, cheap)
    # or on the tokens ("tokens", L x L, only for small L).
    map_kind: ClassVar[str] = "principal"
    # Learnable per-head parameters (name -> initial value), trained by attention transfer; each is a
    # tensor [H] (one value per query head) passed as ``params`` to every method below.
    param_defaults: ClassVar[dict[str, float]] = {}
    # Whether the streaming step rebuilds every past key from U_r (so a past compressed from running
    # sums, which keep no U_r, will not do).
    needs_basis_rows: ClassVar[bool] = False

    def init_params(self, n_heads: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The untrained value of every parameter of the form, one per query head."""
        return {k: torch.full((n_heads,), v, dtype=dtype) for k, v in self.param_defaults.items()}

    def kernel(self, scores: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised token weight of a score ``c q . k_r`` (forms whose weights are a kernel of the
        score; ``params`` already shaped to broadcast over the scores' head axis)."""
        raise ValueError(f"The {self.name} form does not weight tokens by a kernel of their scores.")

    def denominators(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        basis: torch.Tensor,
        *,
        causal: bool = False,
        scaling: float | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Each query's normaliser ``sum_j kernel(c q_i . k_r,j)`` over the keys it may read, ``[B, H, L]``
        (the tour plots it: where it crosses zero the form's outputs blow up)."""
        B, H, L, dh = q.shape
        Hkv = k.shape[1]
        U = basis.to(device=q.device, dtype=q.dtype)
        Kr = U.unsqueeze(1) @ (U.mT.unsqueeze(1) @ k)  # (B, Hkv, L, dh)
        scores = att.scale(scaling, dh) * (att.grouped(q, Hkv, H // Hkv) @ Kr.unsqueeze(2).mT)
        p = {n: v.reshape(1, Hkv, H // Hkv, 1, 1) for n, v in self._params(params, H, q).items()}
        w = self.kernel(scores, p)  # (B, Hkv, G, L, L)
        allowed = row_mask(0, L, L, causal, None, q.device)
        if allowed is not None:
            w = w.masked_fill(~allowed, 0.0)
        return att.ungrouped(w.sum(dim=-1, keepdim=True))[..., 0]

    def _params(self, params, n_heads: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """``params`` completed with the defaults, checked ([H] each) and cast like ``ref``."""
        out = self.init_params(n_heads, ref.dtype)
        for name, value in (params or {}).items():
            if name not in out:
                raise ValueError(
                    f"The {self.name} form has no parameter {name!r}; it has {sorted(out) or 'none'}."
                )
            if tuple(value.shape) != (n_heads,):
                raise ValueError(f"Parameter {name!r} must have shape [{n_heads}] (one per query head).")
            out[name] = value.to(device=ref.device, dtype=ref.dtype)
        return {k: v.to(ref.device) for k, v in out.items()}

    def __repr__(self) -> str:
        return f"<attention form {self.name!r}>"

    # -- full sequence ----------------------------------------------------------------------------

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        basis: torch.Tensor,
        *,
        causal: bool = False,
        scaling: float | None = None,
        key_mask: torch.Tensor | None = None,
        return_maps: bool = False,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attention of q on the principal keys/values of k, v under ``basis``; returns ``[B, H, L, dh]``.

        ``return_maps=True`` also returns a dict with ``"principal"`` (weights on the r principal values,
        ``[B, H, L, r]``, so that ``out = principal @ V'``) and/or ``"tokens"`` (weights on the tokens'
        values ``[B, H, L, L]``, so that ``out = tokens @ V``); maps are for display at small L.

        Causal mode: the basis comes from the whole sequence, so every output reads later tokens
        through U_r whatever the mask does; that is legitimate for a prompt known in full only. Scoring
        a text token by token needs :meth:`stream` (a past compressed from past tokens alone).
        """
        B, H, Hkv, L, dh, G = att.check_qkv(q, k, v)
        if not isinstance(basis, torch.Tensor) or basis.dim() != 3 or not basis.is_floating_point():
            raise ValueError("basis must be a floating-point tensor [B, L, r].")
        if basis.shape[0] != B or basis.shape[1] != L or basis.shape[2] < 1:
            raise ValueError(
                f"basis shape {tuple(basis.shape)} does not match q {tuple(q.shape)}: "
                f"expected [B={B}, L={L}, r>=1]."
            )
        c = att.scale(scaling, dh)
        km = att.check_key_mask(key_mask, B, L, q.device)
        U = basis.to(device=q.device, dtype=q.dtype)
        if km is not None:
            U = U * km.unsqueeze(-1).to(U.dtype)  # (B, L, r): padding never enters
        return self._attend(q, k, v, U, km, c, causal, return_maps, params=self._params(params, H, q))

    def _attend(self, q, k, v, U, km, c, causal, return_maps, *, params):  # pragma: no cover - abstract
        raise NotImplementedError

    def token_weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        basis: torch.Tensor,
        *,
        causal: bool = False,
        scaling: float | None = None,
        key_mask: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The form's weights over the *reconstructed* tokens, ``[B, H, L, L]``:
        ``attend(...) == weights @ V_r`` with ``V_r = U_r U_r^T V``, and row i sums to 1 when the form is
        ``normalised``. An explicit L x L reference for tests and small-L views (where the weights are
        negative the form is not a positive kernel).

        ``rows=(a, b)`` computes query rows a..b-1 only (``[B, H, b - a, L]``), so a long input can be
        drawn a block of rows at a time without holding L x L.
        """
        B, H, Hkv, L, dh, G = att.check_qkv(q, k, v)
        c = att.scale(scaling, dh)
        km = att.check_key_mask(key_mask, B, L, q.device)
        U = basis.to(device=q.device, dtype=q.dtype)
        if km is not None:
            U = U * km.unsqueeze(-1).to(U.dtype)
        Kr = U.unsqueeze(1) @ (U.mT.unsqueeze(1) @ k)  # (B, Hkv, L, dh): K_r = U_r U_r^T K
        a, b = rows if rows is not None else (0, L)
        allowed = row_mask(a, b, L, causal, km, q.device)  # (B or 1, 1, 1, b - a, L) or None
        return self._token_weights(q[:, :, a:b], Kr, U, allowed, c, params=self._params(params, H, q))

    def _token_weights(self, q, Kr, U, allowed, c, *, params):  # pragma: no cover - abstract
        raise NotImplementedError

    def full_rank_reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
        scaling: float | None = None, key_mask: torch.Tensor | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:  # fmt: skip
        """What :meth:`attend` equals when the basis spans every token (r = L), or None if undefined."""
        return None

    # -- streaming ----------------------------------------------------------------------------------

    def stream(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past: PrincipalPast | None,
        *,
        scaling: float,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One chunk of a sequence read left to right: q ``[H, C, dh]`` (the chunk's queries), k/v
        ``[Hkv, T + C, dh]`` the keys/values kept exactly (an exact tail of T tokens, then the chunk
        itself), ``past`` the earlier tokens compressed (or None). Returns ``[H, C, dh]``.

        Query j of the chunk sees the compressed past, the tail and chunk tokens 0..j: its output
        depends on no later token (tests perturb later tokens to check, for every form).
        """
        H, C, dh = q.shape
        Hkv = k.shape[0]
        if k.shape != v.shape or k.shape[1] < C or H % Hkv:
            raise ValueError(f"stream: q {tuple(q.shape)} does not fit k/v {tuple(k.shape)}.")
        if past is not None and past.u is None and self.needs_basis_rows:
            raise ValueError(
                f"The {self.name} form rebuilds every past key from U_r, which a past kept as running sums "
                "does not hold: use the recomputed basis (basis_update='recompute') with this form."
            )
        return self._stream(q, k, v, past, float(scaling), params=self._params(params, H, q))

    def _stream(self, q, k, v, past, c, *, params):  # pragma: no cover - abstract
        raise NotImplementedError

    def cache_floats(self, n: int, r: int, n_kv_heads: int, head_dim: int) -> int:
        """Floats a compressed past of n tokens at rank r keeps per layer (K', V' and U_r^T 1)."""
        r = min(r, n)
        return 2 * n_kv_heads * r * head_dim + r

    # -- cost ---------------------------------------------------------------------------------------

    def cost(self, L: int, r: int, geom: _costs.Geometry, method: str = "randomized") -> _costs.LayerCost:
        """Multiply-adds and scores held of one layer, the basis by ``method`` included."""
        r = min(r, L)
        attn = self.attention_cost(L, r, geom)
        basis = _costs.basis_macs(L, geom.d_model, r, method)
        return _costs.LayerCost(
            macs=attn.macs + basis,
            scores=attn.scores,
            formula=attn.formula + r" + \text{basis}",
            basis_macs=basis,
            detail=attn.detail,
        )

    def attention_cost(self, L: int, r: int, geom: _costs.Geometry) -> _costs.LayerCost:
        """The attention alone (basis excluded), as the implementation computes it."""
        raise NotImplementedError  # pragma: no cover - abstract

    def stream_cost(self, C: int, n: int, r: int, geom: _costs.Geometry) -> float:
        """Multiply-adds of one streaming step as :meth:`stream` computes it (basis excluded): C queries
        against their own chunk (every query against every chunk key, then masked: ``2 H C^2 d_h``),
        the compression of a past of n tokens to r principal keys/values (``2 H_kv n r d_h + n r``) and
        the form's attention to that past (:meth:`past_macs`)."""
        H, Hkv, dh = geom.n_heads, geom.n_kv_heads, geom.head_dim
        chunk = 2.0 * H * C * C * dh
        if n == 0:
            return chunk
        r = min(r, n)
        return chunk + 2.0 * Hkv * n * r * dh + float(n) * r + self.past_macs(C, n, r, geom)

    def past_macs(self, C: int, n: int, r: int, geom: _costs.Geometry) -> float:
        """C queries attending to a past of n tokens compressed to r (K', V', U_r^T 1 given)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def info(self) -> dict[str, Any]:
        """The form's description as plain data (for JSON outputs and help texts)."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "cost_order": self.cost_order,
            "positive": self.positive,
            "sign_invariant": self.sign_invariant,
            "full_rank": self.full_rank,
            "paper": self.paper,
        }


def row_mask(
    a: int, b: int, L: int, causal: bool, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Admissible keys of query rows a..b-1 of a length-L self-attention, broadcastable to
    ``[B, Hkv, G, b - a, L]`` (True = allowed); None when every key is allowed."""
    allowed = None
    if causal:
        cols, qrows = torch.arange(L, device=device), torch.arange(a, b, device=device)
        allowed = (cols[None, :] <= qrows[:, None])[None, None, None]  # (1, 1, 1, b - a, L)
    if key_mask is not None:
        km = key_mask[:, None, None, None, :]  # (B, 1, 1, 1, L)
        allowed = km if allowed is None else allowed & km
    return allowed


def principal(U: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
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
