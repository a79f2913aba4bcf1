"""ATP inside a transformers model: per-call settings, the basis, and runs that compare with dense.

Settings are an immutable :class:`ATPConfig`; each forward pass turns it into an :class:`ATPPlan`
held by that call's state (``backend.activate``), so two threads running different ranks on the
same shared model never see each other's settings.

Where the basis comes from (``basis_source``):

- ``"input"`` (the paper's choice): the top-r left singular vectors of the layer's attention input
  X, seen by a forward pre-hook on the attention module;
- ``"keys"``: of the layer's keys (all key/value heads side by side, after rotary embedding).

``lowrank_linear`` (the paper's claim 3): the Q/K/V projections get U_r U_r^T X instead of X, and the
MLP gets its own input projected on its own top-r basis. (Computed here as a projection, which
gives the same numbers as the cheap form U_r (X' W); the cost page counts the cheap form.)

Padding: each sequence of a batch gets its own basis over its real tokens, with its own r when
the rank is a fraction, so a padded batch gives per sequence what the sequence gives alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from atp_viz import forms
from atp_viz.core import basis as _basis
from atp_viz.core import ranks as _ranks
from atp_viz.hf import backend

logger = logging.getLogger(__name__)

BasisSource = Literal["input", "keys"]
BASIS_SOURCES = {"input": "attention input X (paper)", "keys": "keys K"}


@dataclass(frozen=True)
class ATPConfig:
    """What ATP does in one call. ``rank``: an int (principal keys) or a float in (0, 1] (share of L)."""

    rank: int | float = 0.5
    form: str = "exact"  # a name in atp_viz.forms
    layers: Literal["all"] | tuple[int, ...] = "all"
    basis_source: BasisSource = "input"
    basis_method: Literal["exact", "randomized", "sketch"] = "exact"
    lowrank_linear: bool = False
    # The mean token as the basis's first column and the centred input's principal directions after it
    # (:func:`atp_viz.core.basis.principal_basis`, ``centre``); same rank, same cost.
    centre_basis: bool = False
    # One rank per layer (e.g. :func:`atp_viz.analysis.spectra.allocate`'s shares under one budget),
    # used instead of ``rank``; ``rank`` then only labels the budget.
    layer_ranks: tuple[int | float, ...] | None = None

    def __post_init__(self) -> None:
        forms.get(self.form)  # ValueError naming the registered forms
        if self.basis_method not in _basis.METHODS:
            raise ValueError(
                f"basis_method must be one of {', '.join(_basis.METHODS)}, got {self.basis_method!r}"
            )
        if self.basis_source not in BASIS_SOURCES:
            raise ValueError(
                f"basis_source must be one of {', '.join(BASIS_SOURCES)}, got {self.basis_source!r}"
            )
        if self.layers != "all":
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        _ranks.check_rank(self.rank)  # type / range check now, not in the middle of a forward
        if self.layer_ranks is not None:
            object.__setattr__(self, "layer_ranks", tuple(_ranks.check_rank(r) for r in self.layer_ranks))

    def rank_of(self, layer: int) -> int | float:
        """The rank of ``layer``: its own with per-layer ranks, else the one rank."""
        if self.layer_ranks is None:
            return self.rank
        if not 0 <= layer < len(self.layer_ranks):
            raise ValueError(f"layer_ranks has {len(self.layer_ranks)} entries; layer {layer} has none.")
        return self.layer_ranks[layer]

    def label(self) -> str:
        r = f"r={self.rank:g}L" if isinstance(self.rank, float) else f"r={self.rank}"
        extra = "" if self.basis_source == "input" else ", basis from keys"
        extra += ", low-rank linear layers" if self.lowrank_linear else ""
        extra += "" if self.basis_method == "exact" else f", {self.basis_method} basis"
        extra += ", centred basis" if self.centre_basis else ""
        if self.layer_ranks is not None:
            r = f"per-layer ranks (budget {r})"
        return f"ATP {self.form} {r}{extra}"


@dataclass
class ATPPlan:
    """An :class:`ATPConfig` bound to one forward pass (private to that call)."""

    config: ATPConfig
    n_layers: int
    map_layers: frozenset[int] = frozenset()  # layers whose ATP attention map and basis are recorded
    notices: list[str] = field(default_factory=list)
    bases: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    params: dict[int, dict[str, torch.Tensor]] | None = None  # the form's per-head parameters, per layer
    ranks: list[int] = field(default_factory=list)  # r per sequence of the batch
    layer_ranks: dict[int, int] = field(default_factory=dict)  # layer -> r of the batch's first sequence
    on_layer: Callable[[int], None] | None = None  # called after each ATP layer (a caller's progress)

    def applies_to(self, layer: int) -> bool:
        return self.config.layers == "all" or layer in self.config.layers

    @property
    def lowrank_linear(self) -> bool:
        return self.config.lowrank_linear

    def _basis(self, x: torch.Tensor, key_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
        """Per-sequence bases of ``x`` ``[B, L, f]`` over real tokens, zero-padded to a common r."""
        B, L, _ = x.shape
        valid = key_mask if key_mask is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
        bases, ranks = [], []
        for b in range(B):
            n = int(valid[b].sum())
            r, notice = _ranks.resolve_rank(self.config.rank_of(layer), n)
            if notice and notice not in self.notices:
                self.notices.append(notice)
            u = _basis.principal_basis(
                x[b], r, self.config.basis_method, valid=valid[b], centre=self.config.centre_basis
            )  # (L, r)
            bases.append(u)
            ranks.append(r)
        r_max = max(ranks)
        # Zero columns change neither form (they add nothing to U_r^T K, U_r^T V or U_r^T 1).
        out = torch.stack([torch.nn.functional.pad(u, (0, r_max - u.shape[1])) for u in bases])  # (B, L, r)
        self.ranks = ranks
        self.layer_ranks[layer] = ranks[0]
        return out.to(x.dtype)

    def basis(self, state: backend.CallState, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        key = (layer, site)
        if key not in self.bases:
            self.bases[key] = self._basis(x, state.key_mask, layer)
        return self.bases[key]

    def project_input(self, state: backend.CallState, layer: int, x: torch.Tensor, site: str = "attn"):
        """U_r U_r^T x: the input a linear layer sees under the paper's claim 3."""
        u = self.basis(state, layer, site, x)  # (B, L, r)
        return u @ (u.transpose(1, 2) @ x)

    def attention(self, state, layer, module, query, key, value, attention_mask, scaling):
        if self.config.basis_source == "keys":
            B, Hkv, L, dh = key.shape
            flat = key.transpose(1, 2).reshape(B, L, Hkv * dh)  # (B, L, Hkv*dh): all kv heads side by side
            u = self.basis(state, layer, "keys", flat)
        else:
            u = self.basis(state, layer, "attn", state.x[layer])
        causal = bool(getattr(module, "is_causal", False))
        record = layer in self.map_layers
        res = forms.get(self.config.form).attend(
            query, key, value, u, causal=causal, scaling=scaling, key_mask=state.key_mask, return_maps=record,
            params=(self.params or {}).get(layer),
        )  # fmt: skip
        if record:
            out, maps = res
            for name, m in maps.items():  # "principal" [B, H, L, r] and/or "tokens" [B, H, L, L]
                state.record(layer, f"atp_{name}", m)
            state.record(layer, "basis", u)
        else:
            out = res
        if self.on_layer is not None:
            self.on_layer(layer)
        return out.transpose(1, 2).contiguous(), None  # (B, L, H, dh)


def make_plan(config: ATPConfig | None, n_layers: int, *, map_layers=(), params=None) -> ATPPlan | None:
    """The plan of one forward pass; ``params`` (layer -> name -> [H]) are the form's trained per-head
    parameters (``LoadedModel.form_params``), the form's defaults where missing."""
    if config is None:
        return None
    if config.layers != "all":
        bad = [i for i in config.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"Layers {bad} do not exist: this model has layers 0-{n_layers - 1}.")
    return ATPPlan(config=config, n_layers=n_layers, map_layers=frozenset(map_layers), params=params)
