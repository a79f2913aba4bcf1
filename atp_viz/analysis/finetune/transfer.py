"""Stage 1: layer-wise attention transfer (the recipe of LoLCATs, Zhang et al. 2024, arXiv 2410.10254).

Each layer's ATP attention is trained to reproduce that layer's dense attention output, given the
dense model's own input to that layer (teacher forcing): the original model (adapters off, dense
attention) runs once and each attention module's input X and output O are kept; then the model with
its adapters and ATP in place runs with every attention module's input replaced by the teacher's X,
and the loss is the mean over layers of ||O_ATP - O_dense||^2 / ||O_dense||^2. A bad layer cannot
poison later ones, and inf never propagates from one layer to the next. What is trained: the form's
per-head parameters and the LoRA adapters of the Q/K projections (the family's ``qkv`` modules).

Decoders run in the strictly causal chunked mode of :mod:`atp_viz.analysis.serving`, so the transfer
never teaches a layer to read later tokens; the loss covers the positions whose past is compressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from atp_viz.analysis import serving
from atp_viz.analysis.finetune.objectives import dense_logits, encoder_embeddings
from atp_viz.hf import backend, families
from atp_viz.hf.model_info import LoadedModel


def qk_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of the query/key projections the model's family declares."""
    qkv = families.family_of(model).qkv
    names = qkv[:2] if len(qkv) > 1 else qkv  # separate Q and K, or one fused projection
    return [p for n, p in model.named_parameters() if p.requires_grad and any(f".{m}." in n for m in names)]


def _outputs(module_output) -> torch.Tensor:
    return module_output[0] if isinstance(module_output, tuple) else module_output


@contextmanager
def _hooks(
    model: torch.nn.Module, teacher_x: dict[int, torch.Tensor] | None, out: dict[int, list]
) -> Iterator[None]:
    """Collect every attention module's output (in call order) and, with ``teacher_x``, feed each one
    the teacher's input for the positions it is called on (chunks come in order, so an offset per layer
    says where the current chunk starts)."""
    offsets: dict[int, int] = {}

    def pre(i: int):
        def hook(module, args, kwargs):
            x = backend.hidden_arg(args, kwargs)
            start = offsets.get(i, 0)
            offsets[i] = start + x.shape[1]
            return backend.replace_hidden_arg(args, kwargs, teacher_x[i][:, start : start + x.shape[1]])

        return hook

    def post(i: int):
        def hook(module, args, kwargs, output):
            out.setdefault(i, []).append(_outputs(output))

        return hook

    handles = []
    try:
        for m in backend.layer_modules(model):
            if teacher_x is not None:
                handles.append(m.attn.register_forward_pre_hook(pre(m.index), with_kwargs=True))
            handles.append(m.attn.register_forward_hook(post(m.index), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _teacher(model, run: Callable[[], object], teacher: Callable[[], AbstractContextManager]):
    """The original dense model's attention inputs and outputs per layer, ``[B, L, d]`` each."""
    xs: dict[int, torch.Tensor] = {}
    outs: dict[int, list] = {}

    def grab(i: int):
        def hook(module, args, kwargs):
            xs[i] = backend.hidden_arg(args, kwargs).detach()

        return hook

    handles = [
        m.attn.register_forward_pre_hook(grab(m.index), with_kwargs=True)
        for m in backend.layer_modules(model)
    ]
    try:
        with torch.no_grad(), teacher(), _hooks(model, None, outs):
            run()
    finally:
        for h in handles:
            h.remove()
    return xs, {i: torch.cat(o, dim=1).detach() for i, o in outs.items()}


def _layer_loss(
    student: dict[int, list], target: dict[int, torch.Tensor], keep: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of ||O_s - O_t||^2 / ||O_t||^2 on the kept positions (``keep`` [B, L, 1])."""
    losses = []
    for i, t in target.items():
        s = torch.cat(student[i], dim=1)
        losses.append(((s - t).square() * keep).sum() / ((t.square() * keep).sum() + 1e-12))
    return torch.stack(losses).mean()


def transfer_loss(tuned: LoadedModel, item, cfg, params, teacher) -> torch.Tensor:
    """Stage 1's loss on one training item: a batch of texts (encoders) or one window (decoders)."""
    model = tuned.model
    student: dict[int, list] = {}
    if tuned.info.is_decoder:
        ids = item.to(tuned.device)
        xs, target = _teacher(model, lambda: dense_logits(model, ids), teacher)
        with _hooks(model, xs, student):
            serving.chunked_logits(tuned, ids, rank=cfg.rank, params=params, **cfg.stream_options())
        keep = torch.zeros(1, ids.shape[1], 1, device=ids.device)
        keep[:, cfg.chunk :] = 1.0  # positions whose past is compressed
        return _layer_loss(student, target, keep)
    atp = cfg.atp_config()
    enc = tuned.tokenizer(
        list(item), return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_tokens
    )
    mask = enc["attention_mask"].to(tuned.device)
    xs, target = _teacher(model, lambda: encoder_embeddings(tuned, item, None, cfg.max_tokens), teacher)
    with _hooks(model, xs, student):
        encoder_embeddings(tuned, item, atp, cfg.max_tokens, params=params)
    return _layer_loss(student, target, mask.unsqueeze(-1).to(target[0].dtype))
