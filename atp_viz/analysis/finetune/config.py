"""One fine-tuning run's settings (:class:`TuneConfig`), its result, and where it is written."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from atp_viz import forms
from atp_viz.hf.model_info import cache_dir


@dataclass(frozen=True)
class TuneConfig:
    """One fine-tuning run. Defaults are the ones the README's table was measured with."""

    model: str = "minilm"
    rank: float = 0.5  # share of L (encoders: of each text; decoders: of each chunk's past)
    form: str = "exact"  # a name in atp_viz.forms
    steps: int = 200
    lr: float = 1e-3  # AdamW on the adapters only; LoRA tolerates a high rate
    lora_r: int = 8  # adapter rank (not the ATP rank)
    lora_alpha: int = 16
    batch: int = 16  # encoder texts per step (decoders: one window per step)
    max_tokens: int = 128  # encoder: longest training / evaluation text
    seq_len: int = 512  # decoder: window length
    chunk: int = 128  # decoder: chunk size of the strictly causal mode
    eval_texts: int = 128  # encoder: held-out texts evaluated
    eval_windows: int = 8  # decoder: held-out windows evaluated
    seed: int = 0

    def __post_init__(self) -> None:
        forms.get(self.form)  # ValueError naming the registered forms
        if not (isinstance(self.rank, float) and 0.0 < self.rank <= 1.0):
            raise ValueError(f"rank must be a share of L in (0, 1], e.g. 0.5 or 0.25; got {self.rank!r}")
        if self.steps < 0 or self.batch < 1 or self.lora_r < 1:
            raise ValueError("steps must be >= 0, batch and lora_r >= 1")
        if self.eval_texts < 2 or self.eval_windows < 1:
            raise ValueError("eval_texts must be >= 2 (nearest neighbours need two) and eval_windows >= 1")
        if not self.lr > 0 or self.max_tokens < 8 or self.seq_len < 4:
            raise ValueError("lr must be > 0, max_tokens >= 8 and seq_len >= 4")
        if self.chunk >= self.seq_len:
            raise ValueError(f"chunk ({self.chunk}) must be smaller than seq_len ({self.seq_len})")

    def label(self) -> str:
        return f"ATP-tuned r={self.rank:g}L ({self.form})"


@dataclass
class TuneResult:
    config: TuneConfig
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    cancelled: bool = False
    skipped: int = 0  # steps whose loss or gradient was not finite (no update)


class Cancelled(Exception):
    """Raised inside training when the caller's ``stop()`` returns True."""


def default_out_dir(cfg: TuneConfig) -> Path:
    """``<cache>/tuned/<model>-r<rank>-<form>-<time>``: one folder per run, never reused (the app
    caches a loaded run by its folder, so a folder must not change under it)."""
    name = Path(cfg.model).name if "/" in cfg.model else cfg.model
    return cache_dir() / "tuned" / f"{name}-r{cfg.rank:g}-{cfg.form}-{time.strftime('%Y%m%d-%H%M%S')}"
