"""Per-layer ranks chosen from each layer's spectrum under one budget, calibrated on training text.

Layers differ: some attention inputs keep 95% of their energy in a tenth of their directions, others
need half. One rank for every layer spends keys where they buy little. Here each layer's cumulative
energy curve (:func:`atp_viz.analysis.spectra.energy_curve`) is averaged over calibration texts from
the *training* split (never the held-out one the result is measured on), and
:func:`atp_viz.analysis.spectra.allocate` shares the budget (mean share of L over layers) out where it
keeps the most energy. The result goes into ``ATPConfig.layer_ranks`` and works with every form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atp_viz.analysis import spectra
from atp_viz.analysis.capture import capture
from atp_viz.core.progress import ProgressFn
from atp_viz.hf.model_info import LoadedModel

N_CALIBRATION = 32


def calibration_texts(loaded: LoadedModel, n: int = N_CALIBRATION, max_tokens: int = 128) -> list[str]:
    """``n`` training-split texts spread evenly over it (docstrings of the training modules)."""
    from atp_viz.analysis.finetune.data import encoder_texts
    from atp_viz.text.corpus import TRAIN_MODULES

    texts = encoder_texts(TRAIN_MODULES, loaded.tokenizer, max_tokens=max_tokens)
    step = max(1, len(texts) // n)
    return texts[::step][:n]


def layer_curves(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    basis_source: str = "input",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Each layer's cumulative energy curve of its basis source (attention input X, or the keys of
    all kv heads side by side), averaged over ``texts``: ``[n_layers, grid + 1]``."""
    if not texts:
        raise ValueError("No calibration texts.")
    total = np.zeros((loaded.info.n_layers, spectra.ALLOCATION_GRID + 1))
    for i, text in enumerate(texts):
        cap = capture(loaded, text, attentions="none")
        for layer in cap.layers:
            src = layer.x if basis_source == "input" else layer.k.transpose(1, 0, 2).reshape(cap.n_tokens, -1)
            total[layer.index] += spectra.energy_curve(spectra.singular_values(src))
        if progress:
            progress((i + 1) / len(texts), f"calibration text {i + 1} of {len(texts)}")
    return total / len(texts)


def calibrated_layer_ranks(
    loaded: LoadedModel,
    share: float,
    texts: Sequence[str] | None = None,
    *,
    basis_source: str = "input",
    progress: ProgressFn | None = None,
) -> tuple[float, ...]:
    """Per-layer shares of L with mean ``share``, from the calibration texts' spectra."""
    curves = layer_curves(
        loaded, calibration_texts(loaded) if texts is None else texts, basis_source=basis_source,
        progress=progress,
    )  # fmt: skip
    return spectra.allocate(curves, share)
