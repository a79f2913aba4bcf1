"""The attention backend that plugs ATP and activation capture into transformers.

transformers lets a package register an attention function by name (``AttentionInterface``) and
the matching mask builder (``AttentionMaskInterface``; without it a custom backend can silently get
no causal mask). Models are loaded once with ``attn_implementation="atp_viz"`` and shared (the app
caches them across sessions), so nothing here may be process-global: what a forward pass does is
decided by a *per-call* state held in a :class:`contextvars.ContextVar`. A ContextVar is private to
the thread (each Streamlit session runs its script in its own thread) and to the ``with`` block
that set it. With no state set, the backend computes transformers' eager attention, bit for bit.

Hooks (forward pre-hooks on each attention module to see its input X, forward hooks on each block
to see its output) are added by :func:`activate` and removed in ``finally``; like all module hooks
they are visible to every thread, so each hook first checks that the current call's state is the
one it was made for and does nothing otherwise.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from atp_viz.core import attention
from atp_viz.hf import families

logger = logging.getLogger(__name__)

NAME = "atp_viz"
_registered = False
_register_lock = threading.Lock()


@dataclass(frozen=True)
class LayerModules:
    """The modules of one transformer block that the hooks attach to."""

    index: int
    block: nn.Module  # the whole block: its output is the layer output
    attn: nn.Module  # the module whose input X feeds the Q/K/V projections
    mlp: nn.Module | None  # the MLP (its input is the other big linear layer input)


@dataclass
class CallState:
    """What one forward pass should do and what it recorded. Private to that call."""

    layer_of: dict[int, int]  # id(attention module) -> layer index
    capture: bool = False
    keep_attn: frozenset[int] | None = None  # layers whose attention maps a capture keeps (None: all)
    atp: Any = None  # an atp_viz.engine.ATPPlan, or None for dense attention
    key_mask: torch.Tensor | None = None  # [B, L] bool, True = real token (padding excluded)
    x: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> attention input [B, L, d]
    records: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def record(self, layer: int, name: str, value: torch.Tensor) -> None:
        self.records.setdefault(layer, {})[name] = value.detach()


_STATE: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("atp_viz_state", default=None)


def current_state() -> CallState | None:
    return _STATE.get()


def _repeat_kv(query, key, value) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention for the fused kernel: kv head h serves query heads h*G .. h*G + G - 1."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep == 1:
        return key, value
    return key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)  # (B, H, Lk, dh)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (BERT's, Llama's, GPT-2's), through the project's one dense
    reference (:func:`atp_viz.core.attention.dense_attention`: the additive mask as given, softmax in
    float32 for half precision, grouped-query heads by broadcasting). Keeps the probabilities."""
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out, weights = attention.dense_attention(
        query, key, value, scaling=scaling, mask=mask, return_weights=True
    )  # (B, H, Lq, dh), (B, H, Lq, Lk)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
        out = weights @ _repeat_kv(query, key, value)[1]
    return out.transpose(1, 2).contiguous(), weights  # (B, Lq, H, dh)


def only_causal(mask: torch.Tensor) -> bool:
    """Whether an additive mask ``[B, 1, L, L]`` allows exactly the causal triangle in every row (no
    padding, no window): 0 on and below the diagonal, a blocking value above it."""
    Lq, Lk = mask.shape[-2:]
    if Lq != Lk or Lq < 2:
        return False
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device).tril()
    return bool(((mask == 0) == allowed).all())


# The last mask checked by _is_causal and the answer. transformers builds one mask per forward and hands
# the same tensor to every layer, so the O(L^2) check runs once per forward, not once per layer (30
# layers of SmolLM2 at 8192 tokens: 0.26 s each, measured). A weak reference, so no mask is kept alive
# and a new tensor can never be mistaken for the one checked; one tuple, replaced whole (thread-safe).
_last_check: tuple[Any, int, bool] | None = None


def _is_causal(attention_mask: torch.Tensor, n_keys: int) -> bool:
    global _last_check
    last = _last_check
    if last is not None and last[0]() is attention_mask and last[1] == n_keys:
        return last[2]
    answer = only_causal(attention_mask[:, :, :, :n_keys])
    _last_check = (weakref.ref(attention_mask), n_keys, answer)
    return answer


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """The same attention through torch's fused kernel, for dense passes that keep no maps: it never
    holds the L x L probabilities (30 layers of SmolLM2 at 8k tokens would need 70 GB)."""
    key, value = _repeat_kv(query, key, value)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]].to(query.dtype)
    # A mask that is exactly the causal triangle goes to the kernel as is_causal: with the mask as a
    # tensor, torch's CPU kernel computes the whole L x L square (measured: as slow as no mask at all),
    # twice the work of causal attention, and dense would look slower than it is next to ATP.
    causal = mask is not None and _is_causal(attention_mask, key.shape[-2])
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None if causal else mask, is_causal=causal,
        dropout_p=dropout if module.training else 0.0, scale=scaling,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # (B, Lq, H, dh)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered backend: ``fn(module, q, k, v, mask, scaling, dropout, **kw) -> (out, weights)``.

    q ``[B, H, Lq, dh]`` (after rotary embedding), k/v ``[B, Hkv, Lk, dh]`` (before the GQA repeat);
    returns out ``[B, Lq, H, dh]`` and the attention weights (or None).
    """
    state = _STATE.get()
    layer = state.layer_of.get(id(module)) if state is not None else None
    if layer is None:
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    if state.capture:
        state.record(layer, "q", query)
        state.record(layer, "k", key)
        state.record(layer, "v", value)
    plan = state.atp
    keep = state.capture and (state.keep_attn is None or layer in state.keep_attn)
    if plan is not None and plan.applies_to(layer) and query.shape[-2] == key.shape[-2]:
        out, weights = plan.attention(state, layer, module, query, key, value, attention_mask, scaling)
    elif keep:
        out, weights = eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    else:
        out, weights = sdpa_attention(module, query, key, value, attention_mask, scaling, dropout)
    if keep and weights is not None:
        state.record(layer, "attn", weights)
    return out, weights


def register() -> None:
    """Register the backend and its mask builder with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(NAME, attention_forward)
        # Our backend consumes eager-style additive float masks (0 / -inf, [B, 1, Lq, Lk]).
        AttentionMaskInterface.register(NAME, eager_mask)
        _registered = True


def layer_modules(model: nn.Module) -> list[LayerModules]:
    """Each block's attention module (the one owning the Q/K/V projections) and its MLP, where the
    model's family declares them (:mod:`atp_viz.hf.families`)."""
    fam = families.family_of(model)
    blocks = families.find_blocks(model, fam)
    return [
        LayerModules(
            index=i,
            block=block,
            attn=block.get_submodule(fam.attention),
            mlp=block.get_submodule(fam.mlp) if fam.mlp else None,
        )
        for i, block in enumerate(blocks)
    ]


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def replace_hidden_arg(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


@contextmanager
def activate(
    model: nn.Module,
    *,
    capture: bool = False,
    keep_attn: frozenset[int] | None = None,
    outputs: bool = False,
    atp: Any = None,
    key_mask: torch.Tensor | None = None,
) -> Iterator[CallState]:
    """Within this block, forward passes of ``model`` in this thread capture and/or run ATP.

    ``capture`` records everything (X, Q, K, V, attention, block input and output); ``outputs`` only
    each block's output (what a comparison of ATP with dense needs).

    ``key_mask`` ``[B, L]`` (True = real token) tells ATP which rows are padding, so padding never
    enters a basis or a spectrum.
    """
    register()
    mods = layer_modules(model)
    state = CallState(
        layer_of={id(m.attn): m.index for m in mods},
        capture=capture,
        keep_attn=None if keep_attn is None else frozenset(keep_attn),
        atp=atp,
        key_mask=None if key_mask is None else key_mask.bool(),
    )

    def attn_pre_hook(layer: int):
        def hook(module, args, kwargs):
            if _STATE.get() is not state:
                return None
            x = hidden_arg(args, kwargs)
            state.x[layer] = x
            if state.capture:
                state.record(layer, "x", x)
            if atp is not None and atp.applies_to(layer) and atp.lowrank_linear:
                # Paper claim 3: the Q/K/V projections see U_r U_r^T X instead of X.
                return replace_hidden_arg(args, kwargs, atp.project_input(state, layer, x))
            return None

        return hook

    def mlp_pre_hook(layer: int):
        def hook(module, args, kwargs):
            if _STATE.get() is not state:
                return None
            x = hidden_arg(args, kwargs)
            return replace_hidden_arg(args, kwargs, atp.project_input(state, layer, x, site="mlp"))

        return hook

    def block_pre_hook(layer: int):
        def hook(module, args, kwargs):
            if _STATE.get() is state:
                state.record(layer, "block_input", hidden_arg(args, kwargs))

        return hook

    def block_hook(layer: int):
        def hook(module, args, output):
            if _STATE.get() is not state:
                return
            out = output[0] if isinstance(output, tuple) else output
            state.record(layer, "output", out)

        return hook

    handles = []
    token = _STATE.set(state)
    try:
        for m in mods:
            handles.append(m.attn.register_forward_pre_hook(attn_pre_hook(m.index), with_kwargs=True))
            if capture:
                handles.append(m.block.register_forward_pre_hook(block_pre_hook(m.index), with_kwargs=True))
            if capture or outputs:
                handles.append(m.block.register_forward_hook(block_hook(m.index)))
            if atp is not None and atp.lowrank_linear and atp.applies_to(m.index) and m.mlp is not None:
                handles.append(m.mlp.register_forward_pre_hook(mlp_pre_hook(m.index), with_kwargs=True))
        yield state
    finally:
        _STATE.reset(token)
        for h in handles:
            h.remove()
