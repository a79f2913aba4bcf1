"""Dense vs ATP on one text: forward runs, output metrics, attention maps, greedy text, rank sweeps.

What is reported for a decoder, and why only that: the basis U_r is computed from the whole
sequence, so under ATP every position's keys mix in later tokens. The next-token distribution
*after the prompt's last token* and a greedy continuation (each step re-runs ATP on the text known
so far, prompt plus tokens already generated) use only text that exists at that point; a
teacher-forced perplexity over the prompt would not, so none is computed here (the serving module
adds a strictly causal one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from atp_viz import forms
from atp_viz.analysis.capture import mean_pool
from atp_viz.analysis.serving import agreement
from atp_viz.core.attention import lift_principal_map
from atp_viz.core.progress import ProgressFn
from atp_viz.core.ranks import resolve_rank
from atp_viz.hf import backend
from atp_viz.hf.engine import ATPConfig, make_plan
from atp_viz.hf.model_info import LoadedModel
from atp_viz.text.inputs import Tokenized

logger = logging.getLogger(__name__)
TOP_K = 10


@dataclass(frozen=True)
class Forward:
    """One forward pass (dense when ``config`` is None). Arrays are for the first sequence."""

    config: ATPConfig | None
    layer_outputs: tuple[np.ndarray, ...]  # n_layers x [L, d]
    final_hidden: np.ndarray  # [L, d]
    embedding: np.ndarray | None  # [d] encoders
    next_logits: np.ndarray | None  # [V] decoders, after the last token
    ranks: tuple[int, ...]  # r used per sequence (empty for dense; the last ATP layer's with per-layer ranks)
    notices: tuple[str, ...]
    maps: dict  # layer -> {"principal": [H, L, r] and/or "tokens": [H, L, L], "basis": [L, r]}
    seconds: float
    layer_ranks: tuple[int, ...] = ()  # the first sequence's r in each ATP layer, in layer order


def _params(loaded: LoadedModel, config: ATPConfig | None):
    return None if config is None else loaded.form_params(config.form)


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy()
    a.flags.writeable = False
    return a


@torch.inference_mode()
def forward(
    loaded: LoadedModel,
    tok: Tokenized,
    config: ATPConfig | None = None,
    *,
    map_layers: Sequence[int] = (),
    progress: ProgressFn | None = None,
) -> Forward:
    """Run the model once on ``tok``, densely or with ATP per ``config`` (``progress``: after each ATP
    layer; an ATP run on a long text takes many times the dense run)."""
    info = loaded.info
    plan = make_plan(config, info.n_layers, map_layers=map_layers, params=_params(loaded, config))
    if plan is not None and progress is not None:
        plan.on_layer = lambda i: progress((i + 1) / info.n_layers, f"layer {i + 1} of {info.n_layers}")
    ids = tok.input_ids.to(loaded.device)
    mask = tok.attention_mask.to(loaded.device)
    t0 = time.perf_counter()
    # Decoders: only the last position's logits are reported; no KV cache is needed for one pass.
    kwargs = {}
    if info.is_decoder:
        kwargs = {"logits_to_keep": 1, "output_hidden_states": True, "use_cache": False}
    with backend.activate(loaded.model, capture=False, atp=plan, key_mask=mask, outputs=True) as state:
        out = loaded.model(input_ids=ids, attention_mask=mask, **kwargs)
    seconds = time.perf_counter() - t0
    if info.is_decoder:
        final = out.hidden_states[-1][0]
        embedding, next_logits = None, _np(out.logits[0, -1])
    else:
        final = out.last_hidden_state[0]
        embedding, next_logits = _np(mean_pool(out.last_hidden_state, mask)[0]), None
    maps = {
        i: {name.removeprefix("atp_"): _np(t[0]) for name, t in rec.items() if name.startswith("atp_")}
        | {"basis": _np(rec["basis"][0])}
        for i, rec in state.records.items()
        if "basis" in rec
    }
    return Forward(
        config=config,
        layer_outputs=tuple(_np(state.records[i]["output"][0]) for i in range(info.n_layers)),
        final_hidden=_np(final),
        embedding=embedding,
        next_logits=next_logits,
        ranks=tuple(plan.ranks) if plan else (),
        notices=tuple(plan.notices) if plan else (),
        maps=maps,
        seconds=seconds,
        layer_ranks=tuple(plan.layer_ranks[i] for i in sorted(plan.layer_ranks)) if plan else (),
    )


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref||_F / ||ref||_F."""
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(a - ref)) / den if den > 0 else float(np.linalg.norm(a))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / den if den > 0 else 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) in nats between the softmax distributions of two logit vectors."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


@dataclass(frozen=True)
class Comparison:
    """Dense vs ATP on one text at one setting. Which metrics exist depends on encoder / decoder."""

    config: ATPConfig
    n_tokens: int
    rank: int  # with per-layer ranks: the budget's r (their mean share of this text), see layer_ranks
    notices: tuple[str, ...]
    layer_rel_error: np.ndarray  # [n_layers] ||H_atp - H_dense|| / ||H_dense|| of each block's output
    final_rel_error: float
    errors_at: str  # "all tokens" (encoders) or "last token" (decoders: see compare())
    embedding_cosine: float | None  # encoders
    top_dense: tuple[tuple[int, float], ...]  # decoders: (token id, probability), TOP_K of them
    top_atp: tuple[tuple[int, float], ...]
    kl: float | None  # KL(dense || ATP) of the next-token distribution, nats
    top1_agree: bool | None
    atp_seconds: float
    dense_seconds: float
    layer_ranks: tuple[int, ...] = ()  # per-layer ranks only: each ATP layer's r on this text

    def as_dict(self, tokenizer=None) -> dict:
        def tok(i: int) -> str:
            return tokenizer.decode([i]) if tokenizer is not None else str(i)

        d = {
            "config": {**self.config.__dict__, "layers": self.config.layers},
            "n_tokens": self.n_tokens,
            "rank": self.rank,
            **({"layer_ranks": list(self.layer_ranks)} if self.layer_ranks else {}),
            "notices": list(self.notices),
            "layer_relative_error": [float(e) for e in self.layer_rel_error],
            "final_hidden_relative_error": self.final_rel_error,
            "relative_errors_over": self.errors_at,
            "atp_forward_seconds": self.atp_seconds,
            "dense_forward_seconds": self.dense_seconds,
        }
        if self.embedding_cosine is not None:
            d["embedding_cosine_to_dense"] = self.embedding_cosine
        if self.kl is not None:
            d["next_token_kl_dense_to_atp"] = self.kl
            d["next_token_top1_agree"] = self.top1_agree
            d["top10_dense"] = [{"token": tok(i), "id": i, "p": p} for i, p in self.top_dense]
            d["top10_atp"] = [{"token": tok(i), "id": i, "p": p} for i, p in self.top_atp]
        return d


def _top(logits: np.ndarray, k: int = TOP_K) -> tuple[tuple[int, float], ...]:
    p = np.exp(log_softmax(logits))
    idx = np.argsort(-p)[:k]
    return tuple((int(i), float(p[i])) for i in idx)


def compare(dense: Forward, atp_run: Forward) -> Comparison:
    """Metrics of an ATP run against the dense run of the same text."""
    if atp_run.config is None:
        raise ValueError("the second run must be an ATP run")
    # Decoders: only the last token's states are compared. Under ATP every earlier position's state
    # depends on later tokens through the basis, so its error would describe an output that reads the
    # future; the last position's (the one predicting the next token) sees nothing after it.
    rows = slice(-1, None) if dense.next_logits is not None else slice(None)
    errs = np.array(
        [
            relative_error(a[rows], d[rows])
            for a, d in zip(atp_run.layer_outputs, dense.layer_outputs, strict=True)
        ]
    )
    cos = cosine(atp_run.embedding, dense.embedding) if dense.embedding is not None else None
    if dense.next_logits is not None:
        kl = kl_divergence(dense.next_logits, atp_run.next_logits)
        top_d, top_a = _top(dense.next_logits), _top(atp_run.next_logits)
        agree = top_d[0][0] == top_a[0][0]
    else:
        kl, top_d, top_a, agree = None, (), (), None
    return Comparison(
        config=atp_run.config,
        n_tokens=dense.final_hidden.shape[0],
        rank=_shown_rank(atp_run, dense.final_hidden.shape[0]),
        notices=atp_run.notices,
        layer_rel_error=errs,
        final_rel_error=relative_error(atp_run.final_hidden[rows], dense.final_hidden[rows]),
        errors_at="last token" if dense.next_logits is not None else "all tokens",
        embedding_cosine=cos,
        top_dense=top_d,
        top_atp=top_a,
        kl=kl,
        top1_agree=agree,
        atp_seconds=atp_run.seconds,
        dense_seconds=dense.seconds,
        layer_ranks=atp_run.layer_ranks if atp_run.config.layer_ranks is not None else (),
    )


def _shown_rank(run: Forward, n_tokens: int) -> int:
    """The one r a comparison shows: the run's, or with per-layer ranks the budget's (its share of this
    text), since the last layer's own r would pass for all of them."""
    if run.config.layer_ranks is None:
        return run.ranks[0]
    return resolve_rank(run.config.rank, n_tokens)[0]


def side_by_side(reference: Forward, runs: dict[str, Forward]) -> list[dict]:
    """One row per run, each measured against ``reference`` (the original model, dense): what the
    explorer shows for a fine-tuned model (dense, untuned ATP, tuned ATP on the same text).

    Runs may come from different weights (a tuned copy) and may be dense (``config`` None). Decoders
    are compared at the last token only, as in :func:`compare`.
    """
    rows = slice(-1, None) if reference.next_logits is not None else slice(None)
    out = []
    for name, run in runs.items():
        row = {"setting": name, "rank": _shown_rank(run, run.final_hidden.shape[0]) if run.ranks else None}
        if reference.embedding is not None:
            row["embedding cosine to dense"] = cosine(run.embedding, reference.embedding)
        else:
            row["next-token KL(dense || run), nats"] = kl_divergence(reference.next_logits, run.next_logits)
            row["top-1 agrees with dense"] = bool(run.next_logits.argmax() == reference.next_logits.argmax())
        row["final hidden relative error"] = relative_error(
            run.final_hidden[rows], reference.final_hidden[rows]
        )
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# Attention maps
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMaps:
    """One layer and query head. ``principal``: weights on the r principal keys/values, so that the
    head's output is ``principal @ V'``; ``lifted``: the token-level L x L map ATP implies."""

    layer: int
    head: int
    form: str
    dense: np.ndarray  # [L, L]
    principal: np.ndarray  # [L, r]
    lifted: np.ndarray  # [L, L]
    basis: np.ndarray  # [L, r] U_r of this layer: column a is principal key a's token loadings

    @property
    def difference(self) -> np.ndarray:
        return self.lifted - self.dense


def attention_maps(dense_attn: np.ndarray, atp_run: Forward, layer: int, head: int) -> AttentionMaps:
    """Maps of ``layer``/``head`` from a dense capture's attention ``[H, L, L]`` and an ATP run that
    recorded that layer (``forward(..., map_layers=[layer])``).

    A form records its weights on the principal values (``principal``, L x r, lifted to tokens as
    A' U_r^T) and/or on tokens (``tokens``, L x L; its principal weights are then A U_r, since
    A V_r = A U_r (U_r^T V) = (A U_r) V').
    """
    rec = atp_run.maps.get(layer)
    if rec is None:
        raise ValueError(f"layer {layer} was not recorded by this ATP run (ATP not applied there?)")
    u = torch.from_numpy(np.array(rec["basis"]))  # (L, r)
    if "principal" in rec:
        principal = torch.from_numpy(np.array(rec["principal"][head]))  # (L, r)
    else:
        principal = torch.from_numpy(np.array(rec["tokens"][head])) @ u
    if "tokens" in rec:
        lifted = torch.from_numpy(np.array(rec["tokens"][head]))  # (L, L)
    else:
        lifted = lift_principal_map(principal[None, None], u[None])[0, 0]
    return AttentionMaps(
        layer=layer,
        head=head,
        form=atp_run.config.form,
        dense=np.asarray(dense_attn[head]),
        principal=principal.numpy(),
        lifted=lifted.numpy(),
        basis=u.numpy(),
    )


def downsample(m: np.ndarray, max_size: int = 256) -> tuple[np.ndarray, int]:
    """Average-pool a map in blocks so neither side exceeds ``max_size``; returns (map, block size).

    Block averages keep row sums meaningful (a block row's mass is the mean of its rows' mass),
    unlike striding, which would drop most tokens.
    """
    f = max(1, int(np.ceil(max(m.shape) / max_size)))
    if f == 1:
        return m, 1
    rows = int(np.ceil(m.shape[0] / f)) * f
    cols = int(np.ceil(m.shape[1] / f)) * f if m.shape[1] > max_size else m.shape[1]
    fc = f if m.shape[1] > max_size else 1
    padded = np.full((rows, cols), np.nan)
    padded[: m.shape[0], : m.shape[1]] = m
    pooled = np.nanmean(padded.reshape(rows // f, f, cols // fc, fc), axis=(1, 3))
    return pooled, f


# ------------------------------------------------------------------------------------------------
# Greedy continuation and rank sweeps
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Continuation:
    dense_ids: tuple[int, ...]
    atp_ids: tuple[int, ...]

    @property
    def first_divergence(self) -> int | None:
        return agreement(self.dense_ids, self.atp_ids)[1]

    @property
    def agreement(self) -> float:
        """Share of positions where the two greedy texts agree."""
        return agreement(self.dense_ids, self.atp_ids)[0]


def _greedy(
    loaded: LoadedModel, tok: Tokenized, config: ATPConfig | None, n_new: int, tick
) -> tuple[int, ...]:
    ids = tok.input_ids
    eos = loaded.tokenizer.eos_token_id
    new: list[int] = []
    for _ in range(n_new):
        # Re-run on the whole known text each step: under ATP the basis changes with every token.
        step = Tokenized(ids, torch.ones_like(ids), tok.tokens, ids.shape[1], tok.max_tokens)
        nxt = int(np.argmax(forward(loaded, step, config).next_logits))
        new.append(nxt)
        tick()
        if nxt == eos or ids.shape[1] + 1 >= loaded.info.max_tokens:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tuple(new)


def continuation(
    loaded: LoadedModel,
    tok: Tokenized,
    config: ATPConfig,
    *,
    n_new: int = 32,
    progress: ProgressFn | None = None,
) -> Continuation:
    """Greedy continuations (at most ``n_new`` tokens, stopping at EOS), dense and ATP."""
    if not loaded.info.is_decoder:
        raise ValueError("greedy continuation needs a decoder (causal LM)")
    done = [0]

    def tick():
        done[0] += 1
        if progress:
            progress(min(done[0] / (2 * n_new), 1.0), f"generating token {done[0]} of up to {2 * n_new}")

    dense_ids = _greedy(loaded, tok, None, n_new, tick)
    atp_ids = _greedy(loaded, tok, config, n_new, tick)
    return Continuation(dense_ids=dense_ids, atp_ids=atp_ids)


@dataclass(frozen=True)
class Sweep:
    """Error vs rank for every form (lower is better). ``errors[form]`` is aligned with ``ranks``.

    The errors of two forms are not additive: the exact form's error is the cost of dropping bases,
    another form's error is its own total, not "dropped bases plus something"."""

    ranks: np.ndarray
    errors: dict[str, np.ndarray]
    metric: str
    n_tokens: int


def sweep_ranks(n_tokens: int, n_points: int = 12) -> list[int]:
    """Ranks from 1 to L, denser at the low end, always including L/4, L/2 and L."""
    pts = set(np.unique(np.round(np.geomspace(1, n_tokens, n_points)).astype(int)).tolist())
    pts.update({max(1, n_tokens // 4), max(1, n_tokens // 2), n_tokens})
    return sorted(pts)


def error_sweep(
    loaded: LoadedModel,
    tok: Tokenized,
    dense: Forward,
    base: ATPConfig,
    ranks: Sequence[int],
    *,
    form_names: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> Sweep:
    """Run every form (default: all registered) at every rank; error = 1 - cosine to the dense
    embedding (encoders) or next-token KL(dense || ATP) (decoders)."""
    is_dec = loaded.info.is_decoder
    names = tuple(form_names or forms.names())
    out: dict[str, list[float]] = {f: [] for f in names}
    total = len(names) * len(ranks)
    done = 0
    for r in ranks:
        for form in names:
            run = forward(loaded, tok, replace(base, rank=int(r), form=form))
            if is_dec:
                err = kl_divergence(dense.next_logits, run.next_logits)
            else:
                err = 1.0 - cosine(run.embedding, dense.embedding)
            out[form].append(err)
            done += 1
            if progress:
                progress(done / total, f"r = {r} ({form}), {done}/{total}")
    return Sweep(
        ranks=np.asarray(ranks),
        errors={f: np.asarray(v) for f, v in out.items()},
        metric="next-token KL(dense || ATP), nats" if is_dec else "1 - cosine to the dense embedding",
        n_tokens=tok.n_tokens,
    )
