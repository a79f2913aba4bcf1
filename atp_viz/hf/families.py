"""Model families as data: where a transformers model keeps what ATP needs, one entry per family.

The backend (hooks on each block's attention and MLP), model loading (encoder or causal LM, pooling)
and fine-tuning (which linear layers get LoRA adapters) read these declarations; none of them guesses
module names. Adding a family is one :class:`Family` entry in :data:`FAMILIES` (and, for tests, a
tiny random config in :data:`TINY_CONFIGS`); the model must route its attention through
transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``), which is how ATP is plugged in.

A model is matched by ``config.model_type``; a model type that no entry names is matched by layout
(the first family whose block list and attention module it has), so a fine-tune of a declared
architecture under another name still works. Paths are dotted module paths: ``blocks`` is the end of
the block list's path in the model (so the same entry works under a task head or a peft wrapper),
``attention`` and ``mlp`` are relative to one block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values of this family
    encoder: bool  # True: sentence embeddings (AutoModel); False: a causal LM (AutoModelForCausalLM)
    blocks: str  # the transformer blocks' ModuleList, the end of its path ("encoder.layer")
    attention: str  # in a block: the module whose input X feeds the Q/K/V projections
    qkv: tuple[str, ...]  # in ``attention``: the Q/K/V projections (one name when fused)
    mlp: str  # in a block: the MLP, whose input is the other large linear-layer input
    pooling: str  # "mean" (masked mean + L2 norm, sentence-transformers) or "last" (next token)
    lora_targets: tuple[str, ...]  # leaf names of the linear layers that get LoRA adapters
    lora_exclude: str = ""  # regex of module paths never adapted (e.g. BERT's unused pooler)
    lora_fan_in_fan_out: bool = False  # the targets store weights (in, out) (GPT-2's Conv1D), not (out, in)

    def lora_regex(self) -> str:
        """peft ``target_modules`` regex: the target leaves, minus ``lora_exclude``."""
        alt = "|".join(self.lora_targets)
        exclude = f"(?!.*({self.lora_exclude}))" if self.lora_exclude else ""
        return rf"^{exclude}.*\.({alt})$"


_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        encoder=True,
        blocks="encoder.layer",
        attention="attention.self",
        qkv=("query", "key", "value"),
        mlp="intermediate",
        pooling="mean",
        # attention.output.dense, intermediate.dense and output.dense are all "dense".
        lora_targets=("query", "key", "value", "dense"),
        lora_exclude="pooler",
    ),
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"),
        encoder=False,
        blocks="layers",
        attention="self_attn",
        qkv=("q_proj", "k_proj", "v_proj"),
        mlp="mlp",
        pooling="last",
        lora_targets=_LLAMA_LORA,
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        encoder=False,
        blocks="h",
        attention="attn",
        qkv=("c_attn",),  # one fused Conv1D: [q | k | v]
        mlp="mlp",
        pooling="last",
        lora_targets=("c_attn", "c_proj", "c_fc"),  # Conv1D layers
        lora_fan_in_fan_out=True,  # peft would set it itself, with a warning on every run
    ),
)


def _tiny_bert(vocab: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=512,
    )  # fmt: skip


def _llama_like(cls_name: str):
    def make(vocab: int):
        import transformers

        return getattr(transformers, cls_name)(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024, pad_token_id=0,
            bos_token_id=101, eos_token_id=102,
        )  # fmt: skip

    return make


def _tiny_gpt2(vocab: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=1024,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )  # fmt: skip


# Tiny random models (``tiny-<name>``) the tests use: a family's own tiny config, or another config
# class with the same layout (Qwen2: Llama's layout with q/k/v biases).
TINY_CONFIGS: dict[str, tuple[str, Callable[[int], Any]]] = {
    "tiny-bert": ("bert", _tiny_bert),
    "tiny-llama": ("llama", _llama_like("LlamaConfig")),
    "tiny-qwen2": ("llama", _llama_like("Qwen2Config")),
    "tiny-gpt2": ("gpt2", _tiny_gpt2),
}


class FamilyError(ValueError):
    """No family declaration fits a model; the message says what to add."""


def by_model_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def is_encoder_config(config) -> bool:
    """Whether a checkpoint's config is an encoder (loaded with AutoModel, pooled into an embedding).

    A declared family says; otherwise the config's ``architectures`` decide (a "...ForCausalLM" or
    "...LMHeadModel" is a decoder), and a config that says nothing is taken to be a decoder."""
    fam = by_model_type(getattr(config, "model_type", ""))
    if fam is not None:
        return fam.encoder
    archs = " ".join(getattr(config, "architectures", None) or [])
    if not archs:
        return False
    return not any(tag in archs for tag in ("CausalLM", "LMHeadModel"))


def find_blocks(model: nn.Module, family: Family) -> nn.ModuleList | None:
    """The block list whose path ends with ``family.blocks`` (the shortest such path), or None."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not (
            name == family.blocks or name.endswith("." + family.blocks)
        ):
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        if best is None or len(name) < len(best[0]):
            best = (name, mod)
    return None if best is None else best[1]


def _fits(model: nn.Module, family: Family) -> bool:
    blocks = find_blocks(model, family)
    if blocks is None or len(blocks) == 0:
        return False
    try:
        attn = blocks[0].get_submodule(family.attention)
        return all(isinstance(getattr(attn, n, None), nn.Module) for n in family.qkv)
    except AttributeError:
        return False


def family_of(model: nn.Module) -> Family:
    """The family of a loaded model: by ``config.model_type``, else by layout; FamilyError otherwise."""
    model_type = getattr(model.config, "model_type", "?")
    fam = by_model_type(model_type)
    if fam is not None and _fits(model, fam):
        return fam
    for fam in FAMILIES:
        if _fits(model, fam):
            return fam
    raise FamilyError(
        f"ATP Explorer does not know where the attention layers of a '{model_type}' model "
        f"({type(model).__name__}) are. Known layouts: {', '.join(f.name for f in FAMILIES)}. "
        "Declare the family in atp_viz/hf/families.py (block list, attention module, Q/K/V names)."
    )
