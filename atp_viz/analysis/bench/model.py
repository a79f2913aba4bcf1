"""Whole-model prefill benchmark: dense vs ATP (every form, every basis method) on real text."""

from __future__ import annotations

import time
from typing import Any

from atp_viz import forms
from atp_viz.analysis.bench.timing import summary
from atp_viz.core import basis as _basis
from atp_viz.core.progress import ProgressFn
from atp_viz.text.corpus import BENCH_MODULES, bench_text

MODEL_KEY, MODEL_LENGTH, MODEL_RANK, MODEL_REPEATS = "smollm2", 2048, 128, 3
TINY_MODEL_KEY, TINY_MODEL_LENGTH, TINY_MODEL_RANK, TINY_MODEL_REPEATS = "tiny-llama", 64, 8, 1
DEFAULT_WARMUP = 1


def run_model_bench(
    model_key: str = MODEL_KEY,
    length: int = MODEL_LENGTH,
    rank: int = MODEL_RANK,
    *,
    repeats: int = MODEL_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Whole-model prefill (``compare.forward``, which times the model call): dense vs ATP, both forms, both
    basis methods, on ``length`` tokens of standard-library docstrings. ``warmup`` untimed dense calls, then
    ``repeats`` interleaved rounds of every configuration."""
    from atp_viz.analysis import compare
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model
    from atp_viz.text.inputs import tokenize

    say = progress or (lambda f, m: None)
    say(0.0, f"model bench: loading {model_key}")
    t0 = time.perf_counter()
    loaded = load_model(model_key, device=device)
    load_s = time.perf_counter() - t0
    n = min(length, loaded.info.max_tokens)
    tok = tokenize(loaded.tokenizer, bench_text(), n)
    configs: dict[str, ATPConfig | None] = {"dense": None}
    for form in sorted(forms.names(), key=lambda f: f != "linear"):  # the paper's first, as before
        for method in _basis.METHODS:
            configs[f"atp_{form}_{method}"] = ATPConfig(rank=rank, form=form, basis_method=method)
    for i in range(warmup):
        say(0.05, f"model bench: warm-up {i + 1}/{warmup}")
        compare.forward(loaded, tok, None)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, Any] = {}
    for rep in range(repeats):
        for name, cfg in configs.items():
            say((rep + 0.5) / repeats, f"model bench: round {rep + 1}/{repeats}, {name}")
            run = compare.forward(loaded, tok, cfg)
            seconds[name].append(run.seconds)
            last[name] = run
    how_dense = "torch SDPA (atp_viz backend, dense pass keeping no maps)"
    dense = {**summary(seconds["dense"]), "attention": how_dense}
    runs = {}
    for name, cfg in configs.items():
        if cfg is None:
            continue
        s = summary(seconds[name])
        runs[name] = {
            **s,
            "form": cfg.form,
            "basis_method": cfg.basis_method,
            "rank": last[name].ranks[0] if last[name].ranks else rank,
            "speedup_vs_dense": dense["median_s"] / s["median_s"],
        }
        if last["dense"].next_logits is not None:
            runs[name]["next_token_kl_dense_to_atp"] = compare.kl_divergence(
                last["dense"].next_logits, last[name].next_logits
            )
    return {
        "model": model_key,
        "label": loaded.info.label,
        "n_tokens": tok.n_tokens,
        "requested_tokens": length,
        "text": f"docstrings of the standard-library modules {', '.join(BENCH_MODULES)}",
        "load_seconds": load_s,
        "repeats": repeats,
        "warmup": warmup,
        "timing_method": (
            "compare.forward's own timer around the model call (the basis is computed per layer inside "
            f"it); all {loaded.info.n_layers} layers use ATP; warm-up: untimed dense forwards; interleaved "
            "rounds, every configuration once per round"
        ),
        "dense": dense,
        "atp": runs,
    }
