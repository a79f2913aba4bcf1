"""Activation capture: one forward pass, every layer's attention input, Q, K, V, attention and output.

Shape convention (one sequence, padding never included, L tokens, d model width, H query heads,
Hkv key/value heads, dh head size), stated once here and used everywhere:

- ``x``      ``[L, d]``        attention input X: exactly what feeds the Q/K/V projections
- ``q``      ``[H, L, dh]``    queries, after rotary embedding where the model has it
- ``k``      ``[Hkv, L, dh]``  keys, after rotary embedding, before the grouped-query repeat
- ``v``      ``[Hkv, L, dh]``  values
- ``attn``   ``[H, L, L]``     dense attention probabilities (None if not kept, see ``notes``)
- ``output`` ``[L, d]``        the block's output (= transformers' hidden_states[layer + 1])
- ``resid``  ``[L, d]``        the block's input, the residual stream (= hidden_states[layer]); for
  pre-norm models (Llama) X is this after the layer's input norm, for BERT (post-norm) X is this

Arrays are float32 numpy, read-only; the result objects are frozen dataclasses, so a cached
:class:`Capture` can be shared between sessions safely.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atp_viz.hf import backend
from atp_viz.hf.model_info import LoadedModel, ModelInfo
from atp_viz.text.inputs import Tokenized, tokenize

logger = logging.getLogger(__name__)

# Attention maps cost H * L^2 floats per layer; above this many in total they are not kept
# unless asked for by layer (SmolLM2 at L = 2048 would need 4.5 GB for all 30 layers).
MAX_ATTN_FLOATS = 150_000_000


@dataclass(frozen=True)
class LayerCapture:
    index: int
    x: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    attn: np.ndarray | None
    output: np.ndarray
    resid: np.ndarray


@dataclass(frozen=True)
class Capture:
    info: ModelInfo
    text: str
    tokens: tuple[str, ...]
    input_ids: np.ndarray  # [L]
    n_original: int  # tokens before truncation to the model's limit
    layers: tuple[LayerCapture, ...]
    final_hidden: np.ndarray  # [L, d] last hidden state (after the final norm for decoders)
    embedding: np.ndarray | None  # [d] encoders: mean-pooled, L2-normalised sentence embedding
    next_token_logits: np.ndarray | None  # [V] decoders: logits after the last token
    notes: tuple[str, ...]  # what the user should know: truncation, attention maps not kept, ...

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def truncated(self) -> bool:
        return self.n_original > self.n_tokens


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy()
    a.flags.writeable = False
    return a


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' pooling for all-MiniLM-L6-v2: mean over real tokens, then L2 norm."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _attn_layers(
    info: ModelInfo, n_tokens: int, attentions: str | Sequence[int]
) -> tuple[set[int], str | None]:
    if attentions == "none":
        return set(), None
    if attentions == "all":
        return set(range(info.n_layers)), None
    if attentions == "auto":
        total = info.n_layers * info.n_heads * n_tokens * n_tokens
        if total <= MAX_ATTN_FLOATS:
            return set(range(info.n_layers)), None
        return set(), (
            f"Attention maps were not kept: {info.n_layers} layers x {info.n_heads} heads x {n_tokens}^2 "
            f"would need {total * 4 / 1e9:.1f} GB. Pick one layer in the explorer to see its map."
        )
    return {int(i) for i in attentions}, None


@torch.inference_mode()
def capture(
    loaded: LoadedModel,
    text: str | Tokenized,
    *,
    attentions: str | Sequence[int] = "auto",
    max_tokens: int | None = None,
) -> Capture:
    """Run the model once on ``text`` and capture every layer (see the module docstring).

    ``attentions``: "auto" (keep maps when they fit in ~600 MB), "all", "none", or layer indices.
    ``max_tokens``: cap below the model's own limit (truncation is reported in ``notes``).
    """
    info = loaded.info
    limit = min(info.max_tokens, max_tokens or info.max_tokens)
    tok = text if isinstance(text, Tokenized) else tokenize(loaded.tokenizer, text, limit)
    ids = tok.input_ids.to(loaded.device)
    mask = tok.attention_mask.to(loaded.device)
    keep_attn, attn_note = _attn_layers(info, tok.n_tokens, attentions)
    with backend.activate(loaded.model, capture=True, keep_attn=keep_attn, key_mask=mask) as state:
        out = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=info.is_decoder)
    notes = [n for n in (tok.notice, attn_note) if n]

    layers = []
    for i in range(info.n_layers):
        rec = state.records[i]
        layers.append(
            LayerCapture(
                index=i,
                x=_np(rec["x"][0]),
                q=_np(rec["q"][0]),
                k=_np(rec["k"][0]),
                v=_np(rec["v"][0]),
                attn=_np(rec["attn"][0]) if i in keep_attn and "attn" in rec else None,
                output=_np(rec["output"][0]),
                resid=_np(rec["block_input"][0]),
            )
        )
    if info.is_decoder:
        # transformers' last hidden state of a causal LM is the final norm's output (what the LM head sees).
        final = out.hidden_states[-1][0]
        embedding = None
        next_logits = _np(out.logits[0, -1])
    else:
        final = out.last_hidden_state[0]
        embedding = _np(mean_pool(out.last_hidden_state, mask)[0])
        next_logits = None
    return Capture(
        info=info,
        text=text if isinstance(text, str) else "",
        tokens=tok.tokens,
        input_ids=_np(ids[0]).astype(np.int64),
        n_original=tok.n_original,
        layers=tuple(layers),
        final_hidden=_np(final),
        embedding=embedding,
        next_token_logits=next_logits,
        notes=tuple(notes),
    )
