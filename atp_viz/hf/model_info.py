"""What the rest of the project knows about a loaded model: :class:`ModelInfo`, :class:`LoadedModel`,
the bundled and tiny models on offer, where converted weights and tuned runs are cached."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atp_viz.core.costs import Geometry

# A fine-tuning run as a model key: "tuned:<folder>" (see atp_viz.hf.tuned).
TUNED_PREFIX = "tuned:"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is meant for the user, as is."""


@dataclass(frozen=True)
class ModelInfo:
    """What the UI and the compute code need to know about a loaded model."""

    key: str  # what the user picked: "minilm", "smollm2", "tiny-llama", a path or a hub id
    label: str
    model_type: str  # config.model_type, e.g. "bert", "llama"
    is_decoder: bool  # causal LM (next-token outputs) vs encoder (sentence embeddings)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads for grouped-query attention
    d_model: int
    head_dim: int
    max_tokens: int  # the longest input the model accepts (position embeddings / context)
    has_rope: bool  # keys are rotated per position, so K is not X W_k on a basis
    n_params: int
    source: str  # where the weights came from, in words
    family: str = ""  # the atp_viz.hf.families entry the model matched

    @property
    def gqa_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def geometry(self) -> Geometry:
        """One attention layer's shape, for the cost counts."""
        return Geometry(self.n_heads, self.n_kv_heads, self.head_dim, self.d_model)


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode, attn_implementation="atp_viz"
    tokenizer: Any
    info: ModelInfo
    # Trained per-head parameters of attention forms (a fine-tuned run's): form -> layer -> name -> [H].
    # ATP runs of that form use them; empty for a model that was not tuned.
    atp_params: dict = field(default_factory=dict)

    def form_params(self, form: str) -> dict[int, dict[str, torch.Tensor]] | None:
        return self.atp_params.get(form) or None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device. With a ``device_map`` the layers are spread
        over devices; the first parameter is the embedding, whose device receives the token ids."""
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class ModelChoice:
    key: str
    label: str
    description: str


BUNDLED: tuple[ModelChoice, ...] = (
    ModelChoice(
        "minilm",
        "MiniLM-L6 (all-MiniLM-L6-v2, BERT encoder)",
        "6 layers, 12 heads, d=384, absolute positions; sentence embeddings (mean pooling).",
    ),
    ModelChoice(
        "smollm2",
        "SmolLM2-135M-Instruct (Llama decoder)",
        "30 layers, 9 query / 3 key-value heads (GQA), RoPE, d=576; GGUF Q4_1 dequantised to float32.",
    ),
)
TINY: tuple[ModelChoice, ...] = (
    ModelChoice("tiny-bert", "Tiny random BERT", "2 layers, 4 heads, d=32; random weights, for tests."),
    ModelChoice("tiny-llama", "Tiny random Llama (GQA)", "2 layers, 4 query / 2 kv heads, RoPE; random."),
    ModelChoice("tiny-qwen2", "Tiny random Qwen2 (GQA, q/k/v bias)", "2 layers, 4 query / 2 kv heads."),
    ModelChoice("tiny-gpt2", "Tiny random GPT-2", "2 layers, 4 heads, d=32, fused c_attn; random."),
)
DEFAULT_MODEL = "minilm"


def short_name(key: str) -> str:
    """How a label names a model: a shipped one by its name ("SmolLM2-135M-Instruct"), another by its key."""
    choice = next((c for c in (*BUNDLED, *TINY) if c.key == key), None)
    return key if choice is None else choice.label.split(" (")[0]


def cache_dir() -> Path:
    """Where converted weights live: ``$ATP_VIZ_CACHE``, else ``$XDG_CACHE_HOME/atp_viz`` (``~/.cache``)."""
    env = os.environ.get("ATP_VIZ_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "atp_viz"
