"""Serving with ATP: a compressed KV cache for generation, and strictly causal chunked logits.

Both run a decoder over a sequence in pieces, keeping each layer's past (keys after rotary
embedding, values, attention inputs X) and letting the current piece attend to

- the **compressed past**: r principal keys/values K' = U_r^T K_past, V' = U_r^T V_past with U_r the
  top-r left singular vectors of the *past* tokens' X (or keys) — never of the current piece;
- the **exact tail** (tokens kept exactly: those generated after the compressed prompt);
- the **current piece** itself, exactly and causally.

With :class:`ExactKeep` the strictly causal path also reads the first tokens (sinks) and a sliding window
of the most recent ones exactly, and compresses only the rest of the past (the middle).

So the logits at position i depend on tokens <= i only: the basis sees past tokens, and the
current piece is causally masked (``tests/test_serving.py`` perturbs later tokens to check).

How the current piece combines the compressed past with the exact keys is each attention form's
streaming step (``AttentionForm.stream`` in :mod:`atp_viz.forms`), and what the cache must keep is
its ``cache_floats``: the linear form keeps K', V' and U_r^T 1 (a real compression); the exact form
also keeps U_r (n x r) to rebuild the keys, smaller than dense only while r < 2 Hkv dh (n - r) / n.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atp_viz import forms
from atp_viz.analysis.moments import MomentStore
from atp_viz.core import basis as _basis
from atp_viz.core import ranks
from atp_viz.core.costs import BYTES_PER_FLOAT
from atp_viz.core.progress import ProgressFn
from atp_viz.forms import PrincipalPast
from atp_viz.hf import backend
from atp_viz.hf.model_info import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class LayerMemory:
    """One layer's past: ``k``/``v`` ``[Hkv, n, dh]`` kept exactly, ``x`` ``[n, d]`` their attention
    inputs, and ``past`` the earlier tokens compressed to principal keys/values (or None)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    x: torch.Tensor | None = None
    past: PrincipalPast | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        self.x = x if self.x is None else torch.cat([self.x, x], dim=0)

    @property
    def n_exact(self) -> int:
        return 0 if self.k is None else self.k.shape[1]


def compressed(
    mem: LayerMemory, rank: int, *, basis_from: str = "input", method: str = "exact", centre: bool = False
) -> LayerMemory:
    """A new memory holding ``mem``'s exact past as r principal keys/values (basis from that past;
    ``centre``: its mean token first, :func:`atp_viz.core.basis.principal_basis`).

    ``mem`` itself is left as it is, so a caller can keep the exact past and re-compress it later.
    """
    if mem.k is None:
        return LayerMemory()
    n = mem.k.shape[1]
    src = mem.x if basis_from == "input" else mem.k.transpose(0, 1).reshape(n, -1)  # (n, Hkv*dh)
    u = _basis.principal_basis(src, min(rank, n), method, centre=centre)  # (n, r)
    return LayerMemory(past=forms.compress(u, mem.k, mem.v))


DENSE_FORM = "exact"  # softmax over the keys and values it is given: with nothing compressed, dense attention


def streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem: LayerMemory,
    *,
    form: str,
    scaling: float,
    params=None,
) -> torch.Tensor:
    """q ``[H, C, dh]`` (current piece), k/v ``[Hkv, C, dh]``; returns ``[H, C, dh]``: the form's
    streaming step over ``mem``'s compressed past, its exact tail, and the current piece (causal)."""
    keys = k if mem.k is None else torch.cat([mem.k, k], dim=1)  # (Hkv, T + C, dh): tail, then piece
    vals = v if mem.v is None else torch.cat([mem.v, v], dim=1)
    return forms.get(form).stream(q, keys, vals, mem.past, scaling=scaling, params=params)


@dataclass
class StreamPlan:
    """Plugged into ``backend.activate(atp=...)``: attention over memories instead of dense.

    Each layer attends to ``memories[layer]``; the piece's own keys, values and X are then appended
    to ``stores[layer]`` (the same list for generation, a separate exact store for perplexity).
    """

    memories: list[LayerMemory]
    form: str
    stores: list[LayerMemory] | None = None
    lowrank_linear: bool = False
    params: dict[int, dict[str, torch.Tensor]] | None = None  # the form's per-head parameters, per layer

    def applies_to(self, layer: int) -> bool:
        return True

    def attention(self, state, layer, module, query, key, value, attention_mask, scaling):
        if query.shape[0] != 1:
            raise ValueError("streaming attention runs one sequence at a time")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        mem = self.memories[layer]
        params = (self.params or {}).get(layer)
        out = streaming_attention(
            query[0], key[0], value[0], mem, form=self.form, scaling=scaling, params=params
        )
        if self.stores is not None:
            self.stores[layer].append(key[0], value[0], state.x[layer][0])
        return out.transpose(0, 1)[None].contiguous(), None  # (1, C, H, dh)


def _run_piece(loaded: LoadedModel, plan: StreamPlan, ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Forward one piece at positions offset.. with the plan's memories; returns logits [C, V]."""
    C = ids.shape[1]
    pos = torch.arange(offset, offset + C, device=ids.device)[None]
    with backend.activate(loaded.model, atp=plan):
        out = loaded.model(input_ids=ids, position_ids=pos, use_cache=False)
    return out.logits[0]


def _new_memories(loaded: LoadedModel) -> list[LayerMemory]:
    return [LayerMemory() for _ in range(loaded.info.n_layers)]


# ------------------------------------------------------------------------------------------------
# Strictly causal perplexity
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactKeep:
    """Past tokens every chunk reads exactly, the rest of its past compressed to principal keys: the first
    ``sinks`` tokens (attention sinks) and the last ``window`` (a sliding window, as in StreamingLLM, Xiao
    et al. 2023; LoLCATs pairs a softmax window with linear attention for the rest). The window moves in
    whole chunks: chunk c reads the ``window`` tokens just before it and itself. "Exactly" means their own
    keys and values, weighted as the form's streaming step weights exact keys: a softmax for ``exact``
    and ``pksoftmax`` (in one normaliser with the middle), 1 + s for ``linear``, the second-order kernel
    for ``taylor2``. ``drop_rest=True`` leaves the middle out altogether (one softmax over the sinks, the
    window and the chunk): the baseline that says what the middle's principal keys add."""

    sinks: int = 0
    window: int = 0
    drop_rest: bool = False

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"sinks and window are token counts >= 0, got {self.sinks} and {self.window}.")

    def covers(self, seq_len: int, chunk: int) -> bool:
        """True when every chunk of a ``seq_len``-token window read in chunks of ``chunk`` reads its whole
        past exactly: nothing is left to compress (the last chunk, from ``(seq_len - 1) // chunk * chunk``,
        has the longest past)."""
        return self.sinks + self.window >= (seq_len - 1) // chunk * chunk

    def split(self, n: int) -> tuple[int, int]:
        """(a, b) for a past of n tokens: [a, b) is the middle; [0, a) and [b, n) are kept exactly."""
        a = min(self.sinks, n)
        return a, max(a, n - self.window)


def _kept(mem: LayerMemory, a: int, b: int) -> LayerMemory:
    """``mem`` without its tokens a..b-1 (a shallow copy when there are none)."""
    if b <= a:
        return LayerMemory(k=mem.k, v=mem.v, x=mem.x)
    return LayerMemory(
        k=torch.cat([mem.k[:, :a], mem.k[:, b:]], dim=1),
        v=torch.cat([mem.v[:, :a], mem.v[:, b:]], dim=1),
        x=torch.cat([mem.x[:a], mem.x[b:]], dim=0),
    )


def windowed(
    mem: LayerMemory, keep: ExactKeep, rank, chunk_len: int, *, rank_mode: str = "past",
    basis_from: str = "input", method: str = "exact", centre: bool = False,
) -> LayerMemory:  # fmt: skip
    """A chunk's view of an exact past ``mem``: the sinks and the window exactly (the tail), the middle
    compressed to principal keys from the middle's tokens alone (``rank`` of the middle's length), or
    left out when ``keep.drop_rest`` (or ``rank`` is None)."""
    if mem.k is None:
        return LayerMemory()
    a, b = keep.split(mem.n_exact)
    view = _kept(mem, a, b)
    if b > a and rank is not None and not keep.drop_rest:
        middle = LayerMemory(k=mem.k[:, a:b], v=mem.v[:, a:b], x=mem.x[a:b])
        r = ranks.chunk_rank(rank, b - a, chunk_len, rank_mode)
        view.past = compressed(middle, r, basis_from=basis_from, method=method, centre=centre).past
    return view


class WindowStore:
    """A layer's past behind an exact window when no exact middle is needed: the sinks and the last
    ``window`` tokens kept exactly, every token that leaves the window added to running sums
    (:class:`~atp_viz.analysis.moments.MomentStore`, ``basis_update="moments"``) or, with
    ``keep.drop_rest``, dropped. Each chunk costs one copy of the window, never a copy of the whole past."""

    def __init__(self, basis_from: str, keep: ExactKeep) -> None:
        self.keep, self.sums = keep, MomentStore(basis_from)
        self.keep_x = basis_from == "input" and not keep.drop_rest  # X only feeds the sums' basis
        self.k: torch.Tensor | None = None  # (Hkv, held, dh): the sinks first, then the window
        self.v: torch.Tensor | None = None
        self.x: torch.Tensor | None = None
        self.n = 0  # tokens appended in all

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Add a chunk and evict, in one copy, what is now neither a sink nor in the window (the oldest
        non-sink tokens). Order inside the store does not matter: keys carry their positions (rotary)."""
        C, held = k.shape[1], 0 if self.k is None else self.k.shape[1]
        a_old = min(self.keep.sinks, held)  # sinks already held, then sinks inside this chunk
        a_new = min(self.keep.sinks, held + C) - a_old
        evict = max(0, (held - a_old) + (C - a_new) - self.keep.window)
        e_old = min(evict, held - a_old)
        e_new = evict - e_old
        old = None if self.k is None else (self.k, self.v, self.x)
        new = (k, v, x if self.keep_x else None)
        if not self.keep.drop_rest:  # the evicted tokens join the running sums
            for t, i, j in ((old, a_old, a_old + e_old), (new, a_new, a_new + e_new)):
                if j > i:
                    self.sums.append(t[0][:, i:j], t[1][:, i:j], None if t[2] is None else t[2][i:j])
        # kept: the sinks (held, then this chunk's), then what is left of the window (held, then this chunk)
        spans = [(old, 0, a_old), (new, 0, a_new), (old, a_old + e_old, held), (new, a_new + e_new, C)]
        spans = [(t, i, j) for t, i, j in spans if t is not None and j > i] or [(new, C, C)]
        self.k = torch.cat([t[0][:, i:j] for t, i, j in spans], dim=1)
        self.v = torch.cat([t[1][:, i:j] for t, i, j in spans], dim=1)
        self.x = torch.cat([t[2][i:j] for t, i, j in spans]) if self.keep_x else None
        self.n += C

    def view(self, rank, chunk_len: int, rank_mode: str) -> LayerMemory:
        """The next chunk's view (shallow: the appends during the chunk make new tensors)."""
        if self.k is None:
            return LayerMemory()
        view = LayerMemory(k=self.k, v=self.v, x=self.x)
        if self.sums.n and not self.keep.drop_rest:
            view.past = self.sums.past(ranks.chunk_rank(rank, self.sums.n, chunk_len, rank_mode))
        return view


def _chunk_views(stores, c: int, start: int, C: int, layer_rank: list, opts: dict) -> list[LayerMemory]:
    """Every layer's view of the past for chunk c (starting at token ``start``, C tokens long), each
    layer at its own rank (``layer_rank``: one per layer, all None for dense)."""
    keep, mode = opts["keep"], opts["rank_mode"]
    layers = list(zip(stores, layer_rank, strict=True))
    if isinstance(stores[0], WindowStore):
        return [m.view(rank, C, mode) for m, rank in layers]
    if opts["moments"]:
        return [
            LayerMemory(past=m.past(ranks.chunk_rank(rank, start, C, mode)) if c else None)
            for m, rank in layers
        ]
    if keep is not None and c:
        return [windowed(m, keep, rank, C, rank_mode=mode, **opts["basis"]) for m, rank in layers]
    if layer_rank[0] is None or c == 0:
        # Dense: the exact past is the tail; a shallow copy, since the store grows during the chunk.
        return [LayerMemory(k=m.k, v=m.v, x=m.x) for m in stores]
    return [compressed(m, ranks.chunk_rank(rank, start, C, mode), **opts["basis"]) for m, rank in layers]


def _ranks_by_layer(rank, layer_ranks, n_layers: int) -> list:
    """One rank per layer: ``layer_ranks`` (checked) when given, else ``rank`` everywhere; dense (``rank``
    None) is dense in every layer, whatever ``layer_ranks`` says."""
    if rank is None or layer_ranks is None:
        return [rank] * n_layers
    if len(layer_ranks) != n_layers:
        raise ValueError(f"{len(layer_ranks)} per-layer ranks given; the model has {n_layers} layers.")
    return [ranks.check_rank(r) for r in layer_ranks]


def chunked_logits(
    loaded: LoadedModel,
    ids: torch.Tensor,
    *,
    rank: int | float | None,
    form: str = "exact",
    chunk: int = 256,
    basis_from: str = "input",
    method: str = "exact",
    rank_mode: str = "past",
    params: dict[int, dict[str, torch.Tensor]] | None = None,
    basis_update: str = "recompute",
    keep: ExactKeep | None = None,
    progress: ProgressFn | None = None,
    layer_ranks: Sequence[int | float] | None = None,
    centre_basis: bool = False,
) -> torch.Tensor:
    """Logits ``[L, V]`` where chunk c attends to chunks < c compressed to ``rank`` principal
    keys/values (basis from those past tokens only) and to itself exactly and causally. With
    ``layer_ranks`` (one per layer, e.g. :mod:`atp_viz.analysis.allocation`'s shares under one budget)
    each layer compresses to its own rank, read like ``rank``; ``rank`` then only says ATP is on.

    ``basis_update``: "recompute" keeps the past exactly and computes its basis anew for every chunk
    (``method``: exact, randomized or sketch SVD; every form); "moments" keeps only running sums of the
    past (:mod:`atp_viz.analysis.moments`): the same basis from an eigendecomposition whose cost does not
    grow with the past, for the forms that need no U_r (``linear``, ``pksoftmax``).

    ``rank=None`` keeps the past exact and is dense attention computed in chunks, whatever ``form``
    says (the form's kernel applies only to ATP settings). A float rank in (0, 1]
    with ``rank_mode="past"`` is a share of the past: chunk c's past of n tokens keeps
    ``round(rank * n)`` principal keys; with ``rank_mode="effective"`` it is the share of the key set
    the chunk's queries attend to on average (:func:`atp_viz.core.ranks.chunk_rank`). ``params``: the
    form's per-head parameters per layer (default: the model's trained ones, ``LoadedModel.form_params``).
    ``keep``: sinks and a window read exactly (:class:`ExactKeep`): their own keys and values, weighted as
    the form's streaming step weights exact keys (a softmax for ``exact`` and ``pksoftmax``, 1 + s for
    ``linear``); ``rank`` then counts the middle's principal keys (a share: of the middle). With
    ``keep.drop_rest`` it is the window alone, one softmax, whatever ``rank`` and ``form`` say.
    Runs under autograd when the caller enables it (fine-tuning trains through it; the basis is a
    constant there, see ``atp_viz.core.basis.principal_basis``). ``centre_basis``: each basis has the
    past's mean token as its first column (recompute only).
    """
    if not loaded.info.is_decoder:
        raise ValueError("perplexity needs a decoder (causal LM)")
    ids = ids.to(loaded.device)
    L = ids.shape[1]
    if chunk < 1:
        raise ValueError("the chunk size must be at least 1 token")
    if chunk >= L:
        raise ValueError(
            f"The chunk size ({chunk}) must be smaller than the text ({L} tokens): with one chunk there is "
            "no past to compress. Use a smaller chunk or a longer text."
        )
    if keep is not None and keep.drop_rest:
        rank = None  # the window alone: no principal key, and (below) the softmax over what is read
    elif keep is not None and rank is None:
        keep = None  # nothing compressed: dense
    if rank is not None:
        ranks.check_rank(rank)  # int >= 1 or a float in (0, 1]; clear errors otherwise
    else:  # dense means the softmax: another form's kernel over an exact past is not dense attention
        form, params = DENSE_FORM, None
    if keep is not None and rank is not None and rank_mode != "past":
        raise ValueError(
            "With sinks and a window read exactly, rank_mode must be 'past': the rank counts the middle's "
            "principal keys (an int, or a share of the middle); the effective share is defined for a wholly "
            "compressed past."
        )
    if basis_update not in ("recompute", "moments"):
        raise ValueError(f"basis_update must be 'recompute' or 'moments', got {basis_update!r}")
    moments = basis_update == "moments" and rank is not None
    if moments and forms.get(form).needs_basis_rows:
        raise ValueError(
            f"The {form} form rebuilds every past key from U_r, which running sums do not keep: use "
            "basis_update='recompute' with it, or a linear-cost form (linear, pksoftmax)."
        )
    if moments and centre_basis:
        raise ValueError(
            "A centred basis is built for basis_update='recompute' only: running sums would need the mean "
            "folded into their eigendecomposition, which is not built."
        )
    # The exact past of every layer, appended to as each chunk is processed (its keys and values as
    # computed when that chunk was current); each chunk attends to a fresh compression of it. With
    # moments, only the running sums of that past (and the exact sinks and window, if any).
    n_layers = loaded.info.n_layers
    layer_rank = _ranks_by_layer(rank, layer_ranks, n_layers)
    if keep is not None and (moments or keep.drop_rest):
        stores = [WindowStore(basis_from, keep) for _ in range(n_layers)]
    elif moments:
        stores = [MomentStore(basis_from) for _ in range(n_layers)]
    else:
        stores = _new_memories(loaded)
    opts = {
        "keep": keep,
        "rank_mode": rank_mode,
        "moments": moments,
        "basis": {"basis_from": basis_from, "method": method, "centre": centre_basis},
    }
    all_logits = []
    n_chunks = math.ceil(L / chunk)
    for c in range(n_chunks):
        piece = ids[:, c * chunk : (c + 1) * chunk]
        views = _chunk_views(stores, c, c * chunk, piece.shape[1], layer_rank, opts)
        plan = StreamPlan(memories=views, form=form, stores=stores, params=params or loaded.form_params(form))
        all_logits.append(_run_piece(loaded, plan, piece, c * chunk))
        if progress:
            progress((c + 1) / n_chunks, f"chunk {c + 1} of {n_chunks}")
    return torch.cat(all_logits, dim=0)


# ------------------------------------------------------------------------------------------------
# Generation with a compressed KV cache
# ------------------------------------------------------------------------------------------------


def kv_bytes(info, n_exact: int, n_compressed: int, rank: int | None, form: str) -> int:
    """Bytes of the KV cache across layers: exact tokens plus the compressed part (the form's
    ``cache_floats``)."""
    total = n_exact * 2 * info.n_kv_heads * info.head_dim
    if rank is not None and n_compressed:
        total += forms.get(form).cache_floats(n_compressed, rank, info.n_kv_heads, info.head_dim)
    elif n_compressed:
        total += n_compressed * 2 * info.n_kv_heads * info.head_dim
    return total * info.n_layers * BYTES_PER_FLOAT


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    rank: int | None
    form: str
    new_ids: tuple[int, ...]
    kv_cache_bytes: int  # at the end of generation
    dense_kv_cache_bytes: int  # a dense cache of the same tokens
    seconds: float
    stop_reason: str = "max_new_tokens"  # or "eos", "context" (the model's limit), "stopped" (asked to)
    asked: int = 0  # max_new_tokens as asked

    @property
    def context_notice(self) -> str | None:
        """What a user must be told when the model's context, not the request, ended generation."""
        if self.stop_reason != "context":
            return None
        n = len(self.new_ids)
        return (
            f"Generation stopped after {n} new token{'s' if n != 1 else ''} of the {self.asked} asked: the "
            f"prompt ({self.prompt_tokens} tokens) and the new tokens fill the model's context."
        )


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompt_ids: torch.Tensor,
    *,
    rank: int | None,
    form: str = "exact",
    max_new_tokens: int = 32,
    basis_from: str = "input",
    stop: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
    centre_basis: bool = False,
) -> Generation:
    """Greedy decoding. ``rank=None``: dense cache. Otherwise the prompt (prefilled densely; the
    prompt is fully known, so its basis is legitimate) is compressed to ``rank`` principal
    keys/values per layer, and new tokens are kept exactly in a tail.

    Stops at EOS, at ``max_new_tokens``, at the model's context limit, or when ``stop()`` is true.
    """
    info = loaded.info
    if not info.is_decoder:
        raise ValueError("generation needs a decoder (causal LM)")
    prompt_ids = prompt_ids.to(loaded.device)
    L = prompt_ids.shape[1]
    if L < 2 and rank is not None:
        raise ValueError("The prompt has one token: there is nothing to compress. Give a longer prompt.")
    if rank is not None and rank > L:
        raise ValueError(f"Rank {rank} is larger than the prompt ({L} tokens); choose r <= {L}.")
    if info.max_tokens <= L:
        raise ValueError(f"The prompt ({L} tokens) already fills the model's context ({info.max_tokens}).")
    t0 = time.perf_counter()
    prompt = _new_memories(loaded)
    empty = _new_memories(loaded)
    logits = _run_piece(loaded, StreamPlan(memories=empty, form="exact", stores=prompt), prompt_ids, 0)
    # Dense prefill (no past, exact causal). Then the cache: the prompt exact, or compressed once.
    cache = (
        prompt
        if rank is None
        else [compressed(m, rank, basis_from=basis_from, centre=centre_basis) for m in prompt]
    )
    plan = StreamPlan(
        memories=cache,
        form=form if rank is not None else "exact",
        stores=cache,
        params=loaded.form_params(form),
    )
    eos = loaded.tokenizer.eos_token_id
    new: list[int] = []
    nxt = int(logits[-1].argmax())
    reason = None
    for t in range(max_new_tokens):
        new.append(nxt)
        if progress:
            progress((t + 1) / max_new_tokens, f"token {t + 1} of at most {max_new_tokens}")
        if t + 1 == max_new_tokens:
            break
        reason = _stop_reason(nxt == eos, L + len(new) >= info.max_tokens, stop is not None and stop())
        if reason:
            break
        logits = _run_piece(loaded, plan, torch.tensor([[nxt]], device=prompt_ids.device), L + t)
        nxt = int(logits[-1].argmax())
    n_tail = len(new) - 1  # the last token's keys were never computed
    return Generation(
        prompt_tokens=L,
        rank=rank,
        form=form,
        new_ids=tuple(new),
        kv_cache_bytes=kv_bytes(info, n_tail, L if rank is not None else 0, rank, form)
        if rank is not None
        else kv_bytes(info, L + n_tail, 0, None, form),
        dense_kv_cache_bytes=kv_bytes(info, L + n_tail, 0, None, form),
        seconds=time.perf_counter() - t0,
        stop_reason=reason or "max_new_tokens",
        asked=max_new_tokens,
    )


def _stop_reason(eos: bool, full: bool, asked_to: bool) -> str | None:
    """Why generation ends before the requested count (None: it goes on)."""
    return "eos" if eos else "context" if full else "stopped" if asked_to else None


def agreement(a: Sequence[int], b: Sequence[int]) -> tuple[float, int | None]:
    """(share of positions where the two greedy texts agree, first diverging position or None)."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    if first is None and len(a) != len(b):
        first = n
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return (same / n if n else 1.0), first
