"""The fine-tuning objectives, chosen so nothing leaks, and where the adapters go.

- encoders: distil toward the *dense* model's own sentence embedding of the same text (loss
  1 - cosine); ATP over each whole text is legitimate for an encoder, which sees the whole text anyway;
- decoders: next-token cross-entropy in the strictly causal chunked mode of
  :func:`atp_viz.analysis.serving.chunked_logits` only (chunk c attends to the compressed past of
  chunks < c, basis from those past tokens alone, and to itself causally). A basis over the whole
  sequence would let position i read tokens after i through U_r and the model would learn to cheat.
  Loss and metrics cover the predictions made at positions whose past is compressed (chunk 1 onwards).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atp_viz.analysis import serving
from atp_viz.analysis.capture import mean_pool
from atp_viz.hf import backend, families
from atp_viz.hf.engine import ATPConfig, make_plan
from atp_viz.hf.model_info import LoadedModel


def lora_target_regex(model) -> str:
    """peft ``target_modules`` for the model's family (:mod:`atp_viz.hf.families`): its attention and
    MLP projections, never e.g. BERT's unused pooler."""
    return families.family_of(model).lora_regex()


def lora_targets(model) -> list[str]:
    """The family's adapted layer names that this model has (for the run's JSON)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [t for t in families.family_of(model).lora_targets if t in names]


def encoder_embeddings(loaded: LoadedModel, texts: Sequence[str], config: ATPConfig | None, max_tokens: int):
    """Mean-pooled, normalised sentence embeddings [N, d] (with autograd if enabled)."""
    enc = loaded.tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
    )
    ids = enc["input_ids"].to(loaded.device)
    mask = enc["attention_mask"].to(loaded.device)
    plan = make_plan(config, loaded.info.n_layers)
    with backend.activate(loaded.model, atp=plan, key_mask=mask):
        out = loaded.model(input_ids=ids, attention_mask=mask)
    return mean_pool(out.last_hidden_state, mask)


def decoder_losses(loaded: LoadedModel, ids: torch.Tensor, rank, form: str, chunk: int):
    """The decoder objective: per-position next-token losses ``[L - chunk - 1]`` of the predictions
    made at positions chunk .. L-2 (entry j: the logits at position chunk + j, which attend to the
    compressed past, predict token chunk + j + 1), and the top-1 hits among them.

    Strictly causal (``serving.chunked_logits``); ``tests/test_finetune.py`` perturbs later tokens.
    """
    logits = serving.chunked_logits(loaded, ids, rank=rank, form=form, chunk=chunk)  # (L, V)
    target = ids[0, chunk + 1 :].to(logits.device)
    pred = logits[chunk:-1]  # logits at i predict token i + 1; i >= chunk has a compressed past
    losses = torch.nn.functional.cross_entropy(pred.float(), target, reduction="none")
    hits = int((pred.argmax(-1) == target).sum())
    return losses, hits


def decoder_nll(loaded: LoadedModel, ids: torch.Tensor, rank, form: str, chunk: int):
    """(mean NLL, top-1 hits, count) over positions >= chunk (those whose past is compressed)."""
    losses, hits = decoder_losses(loaded, ids, rank, form, chunk)
    return losses.mean(), hits, losses.numel()
