"""One fine-tuning run's settings (:class:`TuneConfig`), its result, and where it is written."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from atp_viz import forms
from atp_viz.core.ranks import RANK_MODES, describe_window
from atp_viz.hf.engine import BASIS_SOURCES, ATPConfig
from atp_viz.hf.model_info import cache_dir
from atp_viz.text.corpus import TRAIN_TEXTS

# What the attention layers run while the adapters train. "dense" is a control, not an ATP run: the same
# recipe (data, steps, adapters, token loss + KL) with the model's own attention, so what a run gains from
# adapting to the training text can be told apart from what ATP costs (the paper compares ATP-tuned
# against dense-tuned). Decoders only: an encoder distilled toward its own dense embedding has zero loss.
TRAIN_ATTENTION = {
    "atp": "ATP in place (the form and rank below)",
    "dense": "dense attention (control: same recipe, no ATP)",
}

# How a run's per-layer ranks were chosen (TuneConfig.layer_ranks_from; analysis.allocation chooses them),
# and what the Fine-tuning page offers: one rank, or per-layer ranks chosen when training starts.
LAYER_RANK_SOURCES = {
    "measured": "measured on training texts (what each layer's rank costs the output)",
    "spectrum": "from the spectra of training texts (the energy each layer keeps)",
    "given": "given by the user",
}
LAYER_RANK_CHOICES = {"": "one rank for every layer"} | {
    k: f"per layer, {LAYER_RANK_SOURCES[k].split(' (')[0]}" for k in ("measured", "spectrum")
}


@dataclass(frozen=True)
class TuneConfig:
    """One fine-tuning run. Defaults are the ones the README's table was measured with."""

    model: str = "minilm"
    rank: float | int = 0.5  # share of L (encoders: of each text; decoders: see rank_mode); decoders also
    # take an int: a fixed number of principal keys for the past (the paper's speed setting, r = 128 at 8K)
    form: str = "exact"  # a name in atp_viz.forms
    rank_mode: str = "past"  # decoders: "past" (share of the compressed past) or "effective" (core.ranks)
    basis_from: str = "input"  # what U_r decomposes: "input" (X, the paper) or "keys" (engine.BASIS_SOURCES)
    centre_basis: bool = False  # the mean token as U_r's first column (engine.ATPConfig.centre_basis)
    attention: str = "atp"  # while training: "atp" or "dense" (a control run; TRAIN_ATTENTION)
    steps: int = 200  # stage 2: end-to-end LoRA with ATP in place
    lr: float = 1e-3  # AdamW on the adapters only; LoRA tolerates a high rate
    transfer_steps: int = 0  # stage 1: layer-wise attention transfer (0: none)
    transfer_lr: float = 1e-2  # stage 1: the form's per-head parameters and the Q/K adapters
    hidden_weight: float = 1.0  # encoders, stage 2: weight of the every-layer hidden-state loss
    kl_weight: float = 1.0  # decoders, stage 2: weight of KL(original dense || ATP) next to the token loss
    lora_r: int = 8  # adapter rank (not the ATP rank)
    lora_alpha: int = 16
    batch: int = 16  # encoder texts per step (decoders: one window per step)
    max_tokens: int = 128  # encoder: longest training / evaluation text
    seq_len: int = 512  # decoder: window length
    chunk: int = 128  # decoder: chunk size of the strictly causal mode
    eval_texts: int = 0  # encoder: held-out texts evaluated (0: all, from every held-out module)
    eval_windows: int = 0  # decoder: held-out windows evaluated (0: all; fewer are spread evenly)
    seed: int = 0
    # Decoders: the past tokens every chunk reads exactly (serving.ExactKeep; LoLCATs' sliding window next
    # to a cheap form), only the rest (the middle) compressed; and how the middle's basis is updated
    # ("moments": running sums, the cost that does not grow with the past; linear-cost forms only).
    window: int = 0
    sinks: int = 0
    basis_update: str = "recompute"
    # Where the form's per-head parameters start, e.g. "e=0.5,b=-2" (empty: the form's defaults, its
    # untrained self); every head of every layer starts at the same value.
    form_init: str = ""
    # What the adapters train on: a name in corpus.TRAIN_TEXTS ("docstrings": the training split's
    # modules; "wider": those and 51 more standard-library modules). The held-out split is the same.
    train_text: str = "docstrings"
    # One share of L per layer, mean ``rank`` (the same budget), used in both stages and in the
    # evaluation's ATP rows; empty: ``rank`` for every layer. ``layer_ranks_from`` says how they were
    # chosen (a key of LAYER_RANK_SOURCES above); "measured" or "spectrum" without ranks: training
    # chooses them when it starts, on training-split texts, and records them here ("measured": encoders).
    layer_ranks: tuple[float, ...] = ()
    layer_ranks_from: str = ""

    def __post_init__(self) -> None:
        form = forms.get(self.form)  # ValueError naming the registered forms
        fixed = isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1
        if not (fixed or (isinstance(self.rank, float) and 0.0 < self.rank <= 1.0)):
            raise ValueError(
                "rank must be a share of L in (0, 1], e.g. 0.5 or 0.25 (decoders also take an int >= 1, "
                f"principal keys of the past); got {self.rank!r}"
            )
        self._check_layer_ranks()
        if self.window < 0 or self.sinks < 0 or (self.sinks and not self.window):
            raise ValueError(
                "window and sinks are token counts >= 0 and sinks need a window; "
                f"got {self.window} and {self.sinks}"
            )
        if self.window and self.rank_mode != "past":
            raise ValueError(
                "With a window read exactly, rank_mode must be 'past' (the rank counts the middle's keys)."
            )
        if self.basis_update not in ("recompute", "moments"):
            raise ValueError(f"basis_update must be 'recompute' or 'moments', got {self.basis_update!r}")
        if self.basis_update == "moments" and self.centre_basis:
            raise ValueError("A centred basis is built for basis_update='recompute' only.")
        if self.basis_update == "moments" and form.needs_basis_rows:
            raise ValueError(
                f"The {self.form} form rebuilds every past key from U_r: use basis_update='recompute'."
            )
        self.initial_params()  # ValueError for a name the form does not have or a value that is no number
        if self.steps < 0 or self.transfer_steps < 0 or self.batch < 1 or self.lora_r < 1:
            raise ValueError("steps and transfer_steps must be >= 0, batch and lora_r >= 1")
        if self.hidden_weight < 0 or self.kl_weight < 0 or not self.transfer_lr > 0:
            raise ValueError("hidden_weight and kl_weight must be >= 0 and transfer_lr > 0")
        if self.eval_texts == 1 or self.eval_texts < 0 or self.eval_windows < 0:
            raise ValueError(
                "eval_texts must be 0 (all) or >= 2 (nearest neighbours need two), eval_windows >= 0"
            )
        if self.basis_from not in BASIS_SOURCES:
            raise ValueError(f"basis_from must be one of {', '.join(BASIS_SOURCES)}, got {self.basis_from!r}")
        if self.rank_mode not in RANK_MODES:
            raise ValueError(f"rank_mode must be one of {', '.join(RANK_MODES)}, got {self.rank_mode!r}")
        if not self.lr > 0 or self.max_tokens < 8 or self.seq_len < 4:
            raise ValueError("lr must be > 0, max_tokens >= 8 and seq_len >= 4")
        if self.attention not in TRAIN_ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(TRAIN_ATTENTION)}, got {self.attention!r}")
        if self.attention == "dense" and self.form_init:
            raise ValueError("A dense control trains no form parameter; drop form_init.")
        if self.attention == "dense" and self.transfer_steps:
            raise ValueError(
                "A dense control has no stage 1 (layer-wise transfer fits ATP to dense); "
                "set transfer_steps to 0."
            )
        if self.train_text not in TRAIN_TEXTS:
            raise ValueError(f"train_text must be one of {', '.join(TRAIN_TEXTS)}, got {self.train_text!r}")
        if self.chunk >= self.seq_len:
            raise ValueError(f"chunk ({self.chunk}) must be smaller than seq_len ({self.seq_len})")

    def _check_layer_ranks(self) -> None:
        # A run's JSON gives a list back: keep a tuple, so the config stays hashable and compares equal.
        object.__setattr__(self, "layer_ranks", tuple(float(x) for x in self.layer_ranks))
        names = ", ".join(LAYER_RANK_SOURCES)
        if (self.layer_ranks or self.layer_ranks_from) and self.layer_ranks_from not in LAYER_RANK_SOURCES:
            raise ValueError(f"layer_ranks_from must be one of {names}, got {self.layer_ranks_from!r}")
        if self.layer_ranks_from and not isinstance(self.rank, float):
            raise ValueError(
                "Per-layer ranks share a budget given as a share of L (e.g. 0.25), not key counts."
            )
        if not self.layer_ranks:
            if self.layer_ranks_from == "given":
                raise ValueError("layer_ranks_from='given' needs the ranks: give layer_ranks.")
            return
        if not all(0.0 < x <= 1.0 for x in self.layer_ranks):
            raise ValueError("Per-layer ranks are shares of L in (0, 1].")
        mean = sum(self.layer_ranks) / len(self.layer_ranks)
        # Half a step of the coarsest allocation grid (1/8): a budget the grid rounds stays the same budget.
        if abs(mean - self.rank) > 1 / 16:
            raise ValueError(
                f"The per-layer ranks' mean ({mean:.3f}) must be the rank ({self.rank:g}): one budget."
            )

    @property
    def train_modules(self) -> tuple[str, ...]:
        """The standard-library modules whose docstrings the adapters train on."""
        return TRAIN_TEXTS[self.train_text]

    def initial_params(self) -> dict[str, float]:
        """``form_init`` read: {parameter: starting value}, checked against the form's parameters."""
        out: dict[str, float] = {}
        names = forms.get(self.form).param_defaults
        for part in filter(None, (p.strip() for p in self.form_init.split(","))):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in names:
                raise ValueError(
                    f"form_init: the {self.form} form has no parameter {name!r}; "
                    f"it has {sorted(names) or 'none'}."
                )
            try:
                out[name] = float(value)
            except ValueError:
                raise ValueError(f"form_init: {part!r} is not name=number (e.g. e=0.5,b=-2).") from None
        return out

    @property
    def keep(self):
        """The exact sinks and window (:class:`~atp_viz.analysis.serving.ExactKeep`), or None."""
        from atp_viz.analysis.serving import ExactKeep

        return ExactKeep(self.sinks, self.window) if self.window else None

    def stream_options(self) -> dict:
        """The strictly causal chunked mode of a decoder run, as ``serving.chunked_logits`` takes it (one
        place: training, stage 1 and the evaluation all read it)."""
        return {
            "form": self.form, "chunk": self.chunk, "rank_mode": self.rank_mode,
            "basis_from": self.basis_from, "basis_update": self.basis_update, "keep": self.keep,
            "layer_ranks": self.layer_ranks or None, "centre_basis": self.centre_basis,
        }  # fmt: skip

    @property
    def layer_ranks_pending(self) -> bool:
        """Per-layer ranks to be chosen when training starts (``layer_ranks_from`` without the ranks)."""
        return bool(self.layer_ranks_from) and not self.layer_ranks

    def atp_config(self) -> ATPConfig:
        """The whole-sequence ATP setting of this run (encoders; decoders use the chunked mode)."""
        if self.layer_ranks_pending:  # never silently one rank for every layer instead
            raise ValueError(f"The per-layer ranks ({self.layer_ranks_from}) are not chosen yet.")
        return ATPConfig(
            rank=self.rank, form=self.form, basis_source=self.basis_from, centre_basis=self.centre_basis,
            layer_ranks=self.layer_ranks or None,
        )  # fmt: skip

    def label(self) -> str:
        mode = "" if self.rank_mode == "past" else f", {self.rank_mode} rank"
        basis = "" if self.basis_from == "input" else f", basis from {self.basis_from}"
        basis += ", centred" if self.centre_basis else ""
        basis += "" if self.basis_update == "recompute" else f", {self.basis_update}"
        basis += f", {describe_window(self.window, self.sinks)}" if self.window else ""
        rank = f"{self.rank:g}L" if isinstance(self.rank, float) else str(self.rank)
        if self.layer_ranks_from:
            rank += f" on average, per layer ({self.layer_ranks_from})"
        if self.attention == "dense":
            return f"dense-tuned control (evaluated with ATP r={rank}, {self.form}{mode}{basis})"
        return f"ATP-tuned r={rank} ({self.form}{mode}{basis})"


@dataclass
class TuneResult:
    config: TuneConfig
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    cancelled: bool = False
    skipped: int = 0  # stage 2 steps whose loss or gradient was not finite (no update)
    transfer_losses: list[float] = field(default_factory=list)
    transfer_skipped: int = 0


class Cancelled(Exception):
    """Raised inside training when the caller's ``stop()`` returns True."""


def default_out_dir(cfg: TuneConfig) -> Path:
    """``<cache>/tuned/<model>-r<rank>-<form>-<time>``: one folder per run, never reused (the app
    caches a loaded run by its folder, so a folder must not change under it)."""
    name = Path(cfg.model).name if "/" in cfg.model else cfg.model
    return cache_dir() / "tuned" / f"{name}-r{cfg.rank:g}-{cfg.form}-{time.strftime('%Y%m%d-%H%M%S')}"
