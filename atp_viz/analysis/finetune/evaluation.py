"""Held-out evaluation of a fine-tuning run, and the tables of finished runs.

Every setting is measured against the *original* dense model: dense (original), dense with the tuned
weights, untuned ATP, tuned ATP. Encoders: cosine of the sentence embedding and nearest-neighbour
agreement on held-out texts; decoders: next-token top-1 and perplexity in the strictly causal mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from atp_viz.analysis.finetune.config import TuneConfig
from atp_viz.analysis.finetune.data import encoder_texts, token_windows
from atp_viz.analysis.finetune.objectives import decoder_nll, encoder_embeddings
from atp_viz.core.basis import NonFiniteError
from atp_viz.hf.engine import ATPConfig
from atp_viz.hf.model_info import LoadedModel
from atp_viz.hf.tuned import tuned_label
from atp_viz.text.corpus import HELDOUT_MODULES


@torch.inference_mode()
def eval_encoder(
    dense_model: LoadedModel,
    models: dict[str, tuple[LoadedModel, ATPConfig | None]],
    texts: Sequence[str],
    max_tokens: int,
    batch: int = 32,
) -> dict[str, dict]:
    """Per setting: mean / min cosine of its embedding to the dense model's, and nearest-neighbour
    agreement (for each text, is its nearest other text the same as under the dense model).

    A text on which a setting breaks down (the linear form can send a layer's input to inf/NaN) gets a
    zero embedding: cosine 0 and no neighbour agreement, and ``n_broken`` counts such texts (the key
    is present only when some broke down).
    """

    def embed_batch(loaded, config, part):
        try:
            return encoder_embeddings(loaded, part, config, max_tokens)
        except NonFiniteError:
            if len(part) > 1:  # find which texts break down
                return torch.cat([embed_batch(loaded, config, [t]) for t in part])
            return torch.zeros(1, loaded.info.d_model, device=loaded.device)

    def embed(loaded, config):
        parts = [embed_batch(loaded, config, texts[i : i + batch]) for i in range(0, len(texts), batch)]
        e = torch.cat(parts).double().cpu()
        return torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0)

    ref = embed(dense_model, None)
    ref_nn = _nearest(ref)
    out = {}
    for name, (loaded, config) in models.items():
        e = ref if (loaded is dense_model and config is None) else embed(loaded, config)
        cos = (e * ref).sum(-1)  # both normalised (or zero where the setting broke down)
        row = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "nn_agreement": float((_nearest(e) == ref_nn).double().mean()),
            "n_texts": len(texts),
        }
        broken = int((e.abs().sum(-1) == 0).sum())
        if broken:
            row["n_broken"] = broken
        out[name] = row
    return out


def _nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


@torch.inference_mode()
def eval_decoder(
    models: dict[str, tuple[LoadedModel, float | None, str]],
    windows: Sequence[torch.Tensor],
    chunk: int,
) -> dict[str, dict]:
    """Per setting (model, rank or None for dense, form): next-token top-1 accuracy and perplexity
    over the windows' predictions from positions >= chunk, strictly causal.

    A window on which a setting breaks down (inf/NaN in a layer's input, possible with the linear
    form) is left out of that setting's figures and counted in ``n_broken`` (present only then).
    """
    out = {}
    for name, (loaded, rank, form) in models.items():
        nll_sum, hits, n, broken = 0.0, 0, 0, 0
        for w in windows:
            try:
                nll, h, c = decoder_nll(loaded, w.to(loaded.device), rank, form, chunk)
            except NonFiniteError:
                broken += 1
                continue
            nll_sum += float(nll) * c
            hits += h
            n += c
        row = {
            "top1": hits / n if n else float("nan"),
            "perplexity": math.exp(nll_sum / n) if n else float("nan"),
            "n_tokens": n,
        }
        if broken:
            row["n_broken"] = broken
        out[name] = row
    return out


def evaluate(reference: LoadedModel, tuned: LoadedModel, cfg: TuneConfig) -> dict:
    """Held-out metrics: dense (original), dense with the tuned weights, untuned ATP, tuned ATP."""
    atp_cfg = ATPConfig(rank=cfg.rank, form=cfg.form)
    data = heldout(reference, cfg)
    if reference.info.is_decoder:
        windows = data
        rows = eval_decoder(
            {
                "dense": (reference, None, "exact"),
                "dense_tuned_weights": (tuned, None, "exact"),
                "atp_untuned": (reference, cfg.rank, cfg.form),
                "atp_tuned": (tuned, cfg.rank, cfg.form),
            },
            windows,
            cfg.chunk,
        )
        note = f"next-token prediction at positions >= {cfg.chunk} of {len(windows)} windows of {cfg.seq_len}"
    else:
        texts = data
        rows = eval_encoder(
            reference,
            {
                "dense": (reference, None),
                "dense_tuned_weights": (tuned, None),
                "atp_untuned": (reference, atp_cfg),
                "atp_tuned": (tuned, atp_cfg),
            },
            texts,
            cfg.max_tokens,
        )
        note = f"sentence embeddings of {len(texts)} held-out texts, compared with the original dense model"
    return {"rank": cfg.rank, "form": cfg.form, "what": note, "rows": rows}


def heldout(loaded: LoadedModel, cfg: TuneConfig) -> list:
    """The held-out evaluation data: windows (decoders) or texts (encoders), first ones in order."""
    if loaded.info.is_decoder:
        return token_windows(HELDOUT_MODULES, loaded.tokenizer, cfg.seq_len)[: cfg.eval_windows]
    return encoder_texts(HELDOUT_MODULES, loaded.tokenizer, max_tokens=cfg.max_tokens)[: cfg.eval_texts]


def metrics_table(meta: dict) -> list[dict]:
    """The run's metrics as rows (one per setting) for display and export."""
    m = meta["metrics"]
    rows = []
    for name, vals in m["rows"].items():
        rows.append({"setting": name, "rank": m["rank"], "form": m["form"], **vals})
    return rows


def summary_rows(runs: Sequence[tuple[Path, dict]]) -> list[dict]:
    """One row per finished run: its setting and the held-out headline metric before and after tuning
    (encoders: mean cosine to dense; decoders: next-token top-1, with dense's for reference)."""
    rows = []
    for path, meta in runs:
        s, m = meta["settings"], meta["metrics"]["rows"]
        key = "cosine_mean" if "cosine_mean" in m["dense"] else "top1"
        rows.append(
            {
                "run": tuned_label(meta),
                "steps": s["steps"],
                "skipped steps": meta.get("skipped_steps", 0),
                "metric": "cosine to dense" if key == "cosine_mean" else "next-token top-1",
                "dense": m["dense"][key],
                "untuned ATP": m["atp_untuned"][key],
                "tuned ATP": m["atp_tuned"][key],
                "tuned weights, dense attention": m["dense_tuned_weights"][key],
                "training minutes": meta["train_seconds"] / 60,
                "folder": str(path),
            }
        )
    return rows
