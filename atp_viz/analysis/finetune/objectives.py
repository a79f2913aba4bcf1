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


def encoder_embeddings(
    loaded: LoadedModel, texts: Sequence[str], config: ATPConfig | None, max_tokens: int, *, params=None,
    hidden: bool = False,
):  # fmt: skip
    """Mean-pooled, normalised sentence embeddings [N, d] (with autograd if enabled); with ``hidden``,
    also every layer's hidden states and the attention mask (for distillation). ``params``: the form's
    per-head parameters per layer (default: the model's trained ones)."""
    enc = loaded.tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
    )
    ids = enc["input_ids"].to(loaded.device)
    mask = enc["attention_mask"].to(loaded.device)
    if params is None and config is not None:
        params = loaded.form_params(config.form)
    plan = make_plan(config, loaded.info.n_layers, params=params)
    with backend.activate(loaded.model, atp=plan, key_mask=mask):
        out = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
    emb = mean_pool(out.last_hidden_state, mask)
    return (emb, out.hidden_states, mask) if hidden else emb


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor):
    """Mean over layers of ||h_student - h_teacher||^2 / ||h_teacher||^2 on real tokens (each layer weighs
    the same whatever its scale)."""
    m = mask.unsqueeze(-1).to(student[0].dtype)
    losses = [
        ((s - t).square() * m).sum() / ((t.square() * m).sum() + 1e-12)
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(losses).mean()


def encoder_distillation(
    tuned: LoadedModel,
    texts: Sequence[str],
    atp: ATPConfig,
    max_tokens: int,
    *,
    params,
    hidden_weight,
    teacher,
):
    """Stage 2 for encoders: 1 - cosine to the original dense model's embedding, plus ``hidden_weight``
    times the hidden-state loss on every layer (the embedding alone plateaus). ``teacher`` is a context
    manager under which the model is the original (adapters off)."""
    with torch.no_grad(), teacher():
        t_emb, t_hidden, mask = encoder_embeddings(tuned, texts, None, max_tokens, hidden=True)
    emb, hidden, _ = encoder_embeddings(tuned, texts, atp, max_tokens, params=params, hidden=True)
    loss = (1 - (emb * t_emb).sum(-1)).mean()
    if hidden_weight:
        loss = loss + hidden_weight * hidden_state_loss(hidden[1:], t_hidden[1:], mask)
    return loss


def dense_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own causal attention over ``ids`` through torch SDPA (inside an empty backend block;
    a bare call would run the slower eager attention), logits ``[1, L, V]``."""
    with backend.activate(model):
        return model(input_ids=ids, use_cache=False).logits


def decoder_losses(
    loaded: LoadedModel, ids: torch.Tensor, rank, form: str, chunk: int, rank_mode: str = "past", params=None,
    with_logits: bool = False, basis_from: str = "input", basis_update: str = "recompute", keep=None,
    layer_ranks=None, centre_basis: bool = False,
):  # fmt: skip
    """The decoder objective: per-position next-token losses ``[L - chunk - 1]`` of the predictions
    made at positions chunk .. L-2 (entry j: the logits at position chunk + j, which attend to the
    compressed past, predict token chunk + j + 1), and the top-1 hits among them (and those logits,
    ``[L - chunk - 1, V]``, with ``with_logits``).

    Strictly causal (``serving.chunked_logits``, whose ``basis_update``, ``keep`` and ``layer_ranks``
    these are);
    ``tests/test_finetune.py`` perturbs later tokens.
    """
    logits = serving.chunked_logits(
        loaded,
        ids,
        rank=rank,
        form=form,
        chunk=chunk,
        rank_mode=rank_mode,
        params=params,
        basis_from=basis_from,
        basis_update=basis_update,
        keep=keep,
        layer_ranks=layer_ranks,
        centre_basis=centre_basis,
    )  # (L, V)
    target = ids[0, chunk + 1 :].to(logits.device)
    pred = logits[chunk:-1]  # logits at i predict token i + 1; i >= chunk has a compressed past
    losses = torch.nn.functional.cross_entropy(pred.float(), target, reduction="none")
    hits = int((pred.argmax(-1) == target).sum())
    return (losses, hits, pred) if with_logits else (losses, hits)


def decoder_nll(
    loaded: LoadedModel, ids: torch.Tensor, rank, form: str, chunk: int, rank_mode: str = "past", params=None
):
    """(mean NLL, top-1 hits, count) over positions >= chunk (those whose past is compressed)."""
    losses, hits = decoder_losses(loaded, ids, rank, form, chunk, rank_mode, params)
    return losses.mean(), hits, losses.numel()


def decoder_distillation(
    tuned: LoadedModel, ids: torch.Tensor, cfg, *, params, kl_weight: float, teacher
) -> torch.Tensor:
    """Stage 2 for decoders: the strictly causal next-token loss plus ``kl_weight`` times
    KL(original dense || ATP) of the next-token distributions, on the same scored positions (leak-free:
    the teacher is the original model's dense causal attention, which sees nothing after i either).
    A dense control (``cfg.attention == "dense"``) computes the same loss with dense attention."""
    if cfg.attention == "dense":  # the control: the model's own causal attention, same positions and loss
        pred = dense_logits(tuned.model, ids)[0, cfg.chunk : -1]
        target = ids[0, cfg.chunk + 1 :].to(pred.device)
        losses = torch.nn.functional.cross_entropy(pred.float(), target, reduction="none")
    else:
        o = cfg.stream_options()
        losses, _, pred = decoder_losses(
            tuned, ids, cfg.rank, o.pop("form"), o.pop("chunk"), o.pop("rank_mode"), params, True, **o
        )
    loss = losses.mean()
    if kl_weight:
        with torch.no_grad(), teacher():
            t_logits = dense_logits(tuned.model, ids)[0, cfg.chunk : -1]
        kl = torch.nn.functional.kl_div(
            pred.float().log_softmax(-1),
            t_logits.float().log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + kl_weight * kl
    return loss
