"""Attention references and the shared checks every form uses: dense softmax attention (the one
reference of the project), first-order attention on the full keys, and lifting a principal map.

Shape conventions (stated once):

- ``q``: ``[B, H, Lq, dh]``; ``k``, ``v``: ``[B, Hkv, Lk, dh]`` with ``H % Hkv == 0``. Query head ``h``
  uses key/value head ``h // G`` with ``G = H // Hkv`` (the ``repeat_kv`` / ``repeat_interleave``
  convention of Hugging Face models); K/V are never repeated, queries are grouped instead.
- ``key_mask``: ``[B, L]`` bool, True for a real token, False for padding.
- Causal masks align the queries with the *last* Lq keys ("bottom-right"): query i sits at position
  ``Lk - Lq + i``. For self-attention (Lq = Lk) that is the usual lower triangle; for a chunk that
  attends to its past and to itself it is the chunk's causal mask.

Query rows that have no admissible key (a fully padded sequence, or a causal row before the first
real token under left padding) return zeros in every attention function here, never NaN.
"""

from __future__ import annotations

import torch

__all__ = [
    "allowed_mask",
    "check_key_mask",
    "check_qkv",
    "dense_attention",
    "grouped",
    "lift_principal_map",
    "linearised_dense_attention",
    "scale",
    "ungrouped",
]


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, self_attention: bool = True
) -> tuple[int, int, int, int, int, int]:
    """Validate q/k/v; return ``(B, H, Hkv, L, dh, G)`` (L: the query length)."""
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
    if Bk != B or dhk != dh or (Lk != L if self_attention else Lk < L):
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: batch, length and head "
            "size must agree (self-attention over one sequence)."
        )
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"The number of query heads ({H}) must be a multiple of key/value heads ({Hkv}).")
    return B, H, Hkv, L, dh, H // Hkv


def scale(scaling: float | None, dh: int) -> float:
    return dh**-0.5 if scaling is None else float(scaling)


def check_key_mask(
    key_mask: torch.Tensor | None, B: int, L: int, device: torch.device
) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise ValueError("key_mask must be a bool tensor [B, L] (True = real token).")
    if tuple(key_mask.shape) != (B, L):
        raise ValueError(f"key_mask must have shape {(B, L)}, got {tuple(key_mask.shape)}.")
    return key_mask.to(device)


def allowed_mask(
    Lq: int, Lk: int, causal: bool, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask of admissible (query, key) pairs, broadcastable to ``(B, Hkv, G, Lq, Lk)``; None = all."""
    allowed = None
    if causal:
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)  # (Lq, Lk) bottom-right
    if key_mask is not None:
        km = key_mask[:, None, None, None, :]  # (B, 1, 1, 1, Lk)
        allowed = km if allowed is None else allowed & km
    return allowed


def grouped(q: torch.Tensor, Hkv: int, G: int) -> torch.Tensor:
    B, _, L, dh = q.shape
    return q.reshape(B, Hkv, G, L, dh)  # (B, Hkv, G, L, dh)


def ungrouped(t: torch.Tensor) -> torch.Tensor:
    B, Hkv, G, L, e = t.shape
    return t.reshape(B, Hkv * G, L, e)  # (B, H, L, e)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scaling: float | None = None,
    key_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``softmax(c Q K^T + mask) V``: q ``[B, H, Lq, dh]``, k/v ``[B, Hkv, Lk, dh]``.

    The project's one dense reference: the backend's eager path (what transformers computes), the
    exact ATP form's full-sequence path and the tour call it (the streaming step, a speed path, calls
    :func:`fused_attention`, tested against it). Grouped-query attention by
    broadcasting (query head h reads key/value head h // G). ``causal`` uses the bottom-right
    alignment of the module docstring; ``key_mask`` ``[B, Lk]`` masks padding keys; ``mask`` is an
    extra mask broadcastable to ``[B, H, Lq, Lk]``: bool (True = allowed) or an additive float mask
    (transformers' 0 / large-negative convention, applied as is). The softmax runs in float32 for
    half-precision inputs, as transformers' eager attention does. Returns ``[B, H, Lq, dh]``, plus the
    probabilities ``[B, H, Lq, Lk]`` if ``return_weights``. Cost: O(Lq Lk dh) per head.
    """
    B, H, Hkv, Lq, dh, G = check_qkv(q, k, v, self_attention=False)
    Lk = k.shape[-2]
    c = scale(scaling, dh)
    km = check_key_mask(key_mask, B, Lk, q.device)
    scores = c * (grouped(q, Hkv, G) @ k.unsqueeze(2).mT)  # (B, Hkv, G, Lq, Lk)
    allowed = allowed_mask(Lq, Lk, causal, km, q.device)
    if mask is not None:
        m = mask
        if m.dim() == 4:  # [b, 1 or H, Lq, Lk] -> [b, 1 or Hkv, 1 or G, Lq, Lk]
            m = m.unsqueeze(2) if m.shape[1] == 1 else m.unflatten(1, (Hkv, G))
        if m.dtype == torch.bool:
            allowed = m if allowed is None else allowed & m
        else:
            scores = scores + m.to(scores.dtype)
    probs = _masked_softmax(scores, allowed).to(q.dtype)
    out = ungrouped(probs @ v.unsqueeze(2))  # (B, H, Lq, dh)
    if return_weights:
        return out, probs.reshape(B, H, Lq, Lk)  # (B, H, Lq, Lk)
    return out


_GQA: list[bool] = []


def sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5); probed once on a tiny input."""
    if not _GQA:
        q, kv = torch.zeros(1, 2, 2, 4), torch.zeros(1, 1, 2, 4)
        try:
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            _GQA.append(True)
        except (TypeError, RuntimeError):
            _GQA.append(False)
    return _GQA[0]


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """``softmax(c Q K^T + mask) V`` by torch's fused kernel (``scaled_dot_product_attention``): the same
    numbers as :func:`dense_attention` to rounding, several times faster on CPU and never holding the
    probabilities. Grouped-query without repeating K/V where torch allows it (``enable_gqa``). ``mask``:
    bool (True = allowed, no row empty) broadcastable to ``[B, H, Lq, Lk]``. For speed paths only."""
    F = torch.nn.functional
    c = scale(scaling, q.shape[-1])
    if sdpa_has_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c, enable_gqa=True)
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask, scale=c
    )


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    work = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    if allowed is None:
        return scores.softmax(dim=-1, dtype=work)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1, dtype=work)
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
    B, H, Hkv, L, dh, G = check_qkv(q, k, v)
    c = scale(scaling, dh)
    km = check_key_mask(key_mask, B, L, q.device)
    qg = grouped(q, Hkv, G)  # (B, Hkv, G, L, dh)
    A = 1.0 + c * (qg @ k.unsqueeze(2).mT)  # (B, Hkv, G, L, L)
    allowed = allowed_mask(L, L, causal, km, q.device)
    if allowed is not None:
        A = A.masked_fill(~allowed, 0.0)
    num = A @ v.unsqueeze(2)  # (B, Hkv, G, L, dh)
    den = A.sum(dim=-1, keepdim=True)  # (B, Hkv, G, L, 1)
    out = num / den
    if allowed is not None:
        out = torch.where(allowed.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))
    return ungrouped(out)  # (B, H, L, dh)


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
