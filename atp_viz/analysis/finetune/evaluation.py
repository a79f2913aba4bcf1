"""Held-out evaluation of a fine-tuning run (the evaluation protocol of :mod:`atp_viz.analysis.protocol`),
and the tables of finished runs.

Every setting is measured against the *original* dense model on the same held-out data: dense
(original), dense with the tuned weights, untuned ATP, tuned ATP. Encoders: cosine of the sentence
embedding to the original dense model's (mean with a 95% interval over texts) and nearest-neighbour
agreement; decoders: next-token top-1 and perplexity in the strictly causal mode on the protocol's
scored positions, each with its 95% interval and its paired difference to the original dense model.

Settings computed on the unmodified base model (dense, untuned ATP) of a bundled or tiny model are
cached on disk (``<cache>/eval``), keyed by everything they depend on, so a series of runs does not
recompute them.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from atp_viz import __version__
from atp_viz.analysis import protocol
from atp_viz.analysis.finetune.config import TuneConfig
from atp_viz.analysis.finetune.objectives import encoder_embeddings
from atp_viz.core.basis import NonFiniteError
from atp_viz.core.progress import ProgressFn, within
from atp_viz.core.ranks import describe_layer_shares
from atp_viz.hf.engine import ATPConfig
from atp_viz.hf.model_info import BUNDLED, TINY, LoadedModel, cache_dir
from atp_viz.hf.tuned import tuned_label

SETTINGS = ("dense", "dense_tuned_weights", "atp_untuned", "atp_tuned")


def _cache_path(cfg: TuneConfig, setting: str, n_items: int) -> Path | None:
    """Where a base-model setting's scores are kept, or None when they must not be cached."""
    if cfg.model not in {c.key for c in BUNDLED + TINY} or setting not in ("dense", "atp_untuned"):
        return None
    key = {
        "model": cfg.model, "setting": setting, "rank": cfg.rank, "form": cfg.form,
        "rank_mode": cfg.rank_mode, "basis_from": cfg.basis_from, "seq_len": cfg.seq_len, "chunk": cfg.chunk,
        "max_tokens": cfg.max_tokens,
        "items": n_items, "python": platform.python_version(), "torch": torch.__version__,
        "atp_viz": __version__,
        "schema": 2,  # 2: dense decoder rows are the softmax whatever the form (1 ran its kernel)
    }  # fmt: skip
    if cfg.window or cfg.basis_update != "recompute":  # only then: earlier runs' cached scores stay valid
        key.update(window=cfg.window, sinks=cfg.sinks, basis_update=cfg.basis_update)
    if cfg.layer_ranks:  # likewise: the untuned row runs the run's own per-layer ranks
        key.update(layer_ranks=list(cfg.layer_ranks))
    if cfg.centre_basis:  # likewise
        key.update(centre_basis=True)
    if setting == "dense":
        key.update(rank=None, form=None, rank_mode=None, basis_from=None)
        for k in ("window", "sinks", "basis_update", "layer_ranks", "centre_basis"):
            key.pop(k, None)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "eval" / f"{cfg.model}-{setting}-{digest}.npz"


@torch.inference_mode()
def embeddings(
    loaded: LoadedModel, config: ATPConfig | None, texts: Sequence[str], max_tokens: int, batch=32
):
    """Normalised embeddings [N, d]; a text on which the setting breaks down (inf/NaN) gets zeros."""

    def part(chunk):
        try:
            return encoder_embeddings(loaded, chunk, config, max_tokens)
        except NonFiniteError:
            if len(chunk) > 1:  # find which texts break down
                return torch.cat([part([t]) for t in chunk])
            return torch.zeros(1, loaded.info.d_model, device=loaded.device)

    e = torch.cat([part(texts[i : i + batch]) for i in range(0, len(texts), batch)]).double().cpu()
    return torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0).numpy()


def _nearest(e: np.ndarray) -> np.ndarray:
    sim = e @ e.T
    np.fill_diagonal(sim, -math.inf)
    return sim.argmax(-1)


def _encoder_rows(
    reference: LoadedModel, tuned: LoadedModel, cfg: TuneConfig, progress: ProgressFn | None, *, cache: bool
) -> tuple[dict, str]:
    texts, modules = protocol.heldout_texts(
        reference.tokenizer, max_tokens=cfg.max_tokens, max_texts=cfg.eval_texts or None
    )
    atp = cfg.atp_config()
    settings = {"dense": (reference, None), "dense_tuned_weights": (tuned, None),
                "atp_untuned": (reference, atp), "atp_tuned": (tuned, atp)}  # fmt: skip
    emb = {}
    for i, (name, (loaded, config)) in enumerate(settings.items()):
        if progress:
            progress(i / len(settings), f"{name}: {len(texts)} held-out texts")
        path = _cache_path(cfg, name, len(texts)) if cache else None
        if path is not None and path.is_file():
            emb[name] = np.load(path)["embeddings"]
            continue
        emb[name] = embeddings(loaded, config, texts, cfg.max_tokens)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, embeddings=emb[name])
    cos = {name: (e * emb["dense"]).sum(-1) for name, e in emb.items()}
    ref_nn = _nearest(emb["dense"])
    rows = {}
    for name, e in emb.items():
        row = protocol.encoder_summary(
            cos[name], modules, reference=cos["atp_untuned"] if name == "atp_tuned" else None
        )
        row["nn_agreement"] = float((_nearest(e) == ref_nn).mean())
        broken = int((np.abs(e).sum(-1) == 0).sum())
        if broken:
            row["n_broken"] = broken
        rows[name] = row
    note = (
        f"sentence embeddings of {len(texts)} held-out texts from {len(set(modules))} modules, cosine to "
        "the original dense model's; 95% intervals by bootstrap over texts"
    )
    if cfg.layer_ranks:
        note += f"; ATP rows with the run's per-layer ranks ({describe_layer_shares(cfg.layer_ranks)} of L)"
    return rows, note


def _decoder_scores(
    loaded, windows, cfg: TuneConfig, name: str, rank, progress: ProgressFn | None, *, cache: bool
) -> protocol.DecoderScores:
    path = _cache_path(cfg, name, len(windows.ids)) if cache else None
    if path is not None and path.is_file():
        z = np.load(path)
        split = np.cumsum(z["sizes"])[:-1]
        return protocol.DecoderScores(
            hits=list(np.split(z["hits"], split)), nll=list(np.split(z["nll"], split)),
            modules=list(np.split(z["modules"], split)), shares=[float(z["share"])], broken=int(z["broken"]),
        )  # fmt: skip
    s = protocol.score_decoder(loaded, windows, rank=rank, progress=progress, **cfg.stream_options())
    if path is not None and s.hits:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path, hits=np.concatenate(s.hits), nll=np.concatenate(s.nll), modules=np.concatenate(s.modules),
            sizes=np.array([h.size for h in s.hits]), share=s.shares[0], broken=s.broken,
        )  # fmt: skip
    return s


def _decoder_rows(
    reference: LoadedModel, tuned: LoadedModel, cfg: TuneConfig, progress: ProgressFn | None, *, cache: bool
) -> tuple[dict, str]:
    windows = protocol.heldout_windows(reference.tokenizer, cfg.seq_len, max_windows=cfg.eval_windows or None)
    settings = {"dense": (reference, None), "dense_tuned_weights": (tuned, None),
                "atp_untuned": (reference, cfg.rank), "atp_tuned": (tuned, cfg.rank)}  # fmt: skip
    scores = {
        name: _decoder_scores(
            m, windows, cfg, name, r, within(progress, i / 4, (i + 1) / 4, f"{name}: "), cache=cache
        )
        for i, (name, (m, r)) in enumerate(settings.items())
    }
    rows = {}
    for name, s in scores.items():
        rows[name] = protocol.decoder_summary(s, windows, None if name == "dense" else scores["dense"])
        if name == "atp_tuned":  # against the tuned weights with dense attention too (domain adaptation)
            extra = protocol.decoder_summary(s, windows, scores["dense_tuned_weights"])
            rows[name]["top1_minus_dense_tuned_weights"] = extra.get("top1_minus_reference")
            rows[name]["top1_minus_dense_tuned_weights_ci"] = extra.get("top1_minus_reference_ci")
    n = rows["dense"].get("n_scored", 0)
    note = (
        f"next-token prediction at positions {cfg.chunk}..{cfg.seq_len - 2} of {len(windows.ids)} held-out "
        f"windows of {cfg.seq_len} tokens ({n} predictions), rank mode '{cfg.rank_mode}'; 95% intervals by "
        "bootstrap over windows, differences paired"
    )
    if cfg.window:
        note += (
            f"; each chunk reads {cfg.sinks} sink tokens and the {cfg.window} tokens before it exactly, "
            f"the rest of its past compressed to r = {cfg.rank} principal keys ({cfg.basis_update})"
        )
    if cfg.layer_ranks:
        note += f"; ATP rows with the run's per-layer ranks ({describe_layer_shares(cfg.layer_ranks)})"
    return rows, note


def evaluate(
    reference: LoadedModel,
    tuned: LoadedModel,
    cfg: TuneConfig,
    progress: ProgressFn | None = None,
    *,
    cache: bool = True,
) -> dict:
    """Held-out metrics: dense (original), dense with the tuned weights, untuned ATP, tuned ATP.

    ``cache``: reuse the base model's dense and untuned scores from earlier runs with the same settings
    (``finetune --reevaluate`` turns it off: a re-measurement must measure everything)."""
    if reference.info.is_decoder:
        rows, note = _decoder_rows(reference, tuned, cfg, progress, cache=cache)
    else:
        rows, note = _encoder_rows(reference, tuned, cfg, progress, cache=cache)
    return {
        "rank": cfg.rank, "form": cfg.form, "rank_mode": cfg.rank_mode, "basis_from": cfg.basis_from,
        **({"centre_basis": True} if cfg.centre_basis else {}),
        **({"layer_ranks": list(cfg.layer_ranks)} if cfg.layer_ranks else {}),
        "trained_with": cfg.attention, "what": note + _control_note(cfg), "rows": rows,
        "protocol": "atp_viz.analysis.protocol (held-out modules: atp_viz.text.corpus.HELDOUT_MODULES)",
    }  # fmt: skip


def _control_note(cfg: TuneConfig) -> str:
    if cfg.attention != "dense":
        return ""
    return (
        "; a dense control: its adapters were trained with dense attention, so 'dense_tuned_weights' is the "
        "dense-tuned model and 'atp_tuned' is ATP run on those weights"
    )


def heldout_available(loaded: LoadedModel, cfg: TuneConfig) -> int:
    """How many held-out windows (decoders) or texts (encoders) the settings give (0: nothing to evaluate)."""
    if loaded.info.is_decoder:
        return len(protocol.heldout_windows(loaded.tokenizer, cfg.seq_len, max_windows=1).ids)
    return len(protocol.heldout_texts(loaded.tokenizer, max_tokens=cfg.max_tokens, max_texts=2)[0])


def metrics_table(meta: dict) -> list[dict]:
    """The run's metrics as rows (one per setting) for display and export; intervals as text."""
    m = meta["metrics"]
    rows = []
    for name, vals in m["rows"].items():
        row = {"setting": name, "rank": m["rank"], "form": m["form"], "rank mode": m.get("rank_mode", "past")}
        row.update(_with_intervals(vals))
        rows.append(row)
    return rows


def _with_intervals(vals: dict) -> dict:
    """Figures that have an interval as ``value [lo, hi]``; runs made before the protocol have none."""
    out = {}
    for k, v in vals.items():
        if k.endswith("_ci") or k == "scored_per_module":
            continue
        ci = vals.get(f"{k}_ci")
        if ci is not None and isinstance(v, float):
            scale = 100 if "minus" in k else 1
            out[k + (" (pt)" if scale == 100 else "")] = protocol.interval(
                v, tuple(ci), 1 if scale == 100 else 3, scale
            )
        else:
            out[k] = v
    return out


def _headline(row: dict, key: str) -> str:
    ci = row.get(f"{key}_ci")
    return (
        protocol.interval(row[key], tuple(ci))
        if ci
        else f"{row[key]:.3f} (no interval: made before the protocol)"
    )


def summary_rows(runs: Sequence[tuple[Path, dict]]) -> list[dict]:
    """One row per finished run: its setting and the held-out headline metric before and after tuning
    (encoders: mean cosine to dense; decoders: next-token top-1), with intervals where the run has them.
    A field a run does not record (runs made before it existed) is shown as unknown, never as 0."""
    rows = []
    for path, meta in runs:
        s, m = meta["settings"], meta["metrics"]["rows"]
        key = "cosine_mean" if "cosine_mean" in m["dense"] else "top1"
        fig = {name: _headline(m[name], key) for name in SETTINGS}

        rows.append(
            {
                "run": tuned_label(meta),
                "steps": s["steps"],
                "skipped steps": meta.get("skipped_steps", "unknown"),
                "metric": "cosine to dense" if key == "cosine_mean" else "next-token top-1",
                "dense": fig["dense"],
                "untuned ATP": fig["atp_untuned"],
                "tuned ATP": fig["atp_tuned"],
                "tuned weights, dense attention": fig["dense_tuned_weights"],
                "training minutes": meta["train_seconds"] / 60,
                "folder": str(path),
            }
        )
    return rows
