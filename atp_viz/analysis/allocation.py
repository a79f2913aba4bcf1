"""Per-layer ranks chosen from each layer's spectrum under one budget, calibrated on training text.

Layers differ: some attention inputs keep 95% of their energy in a tenth of their directions, others
need half. One rank for every layer spends keys where they buy little. Here each layer's cumulative
energy curve (:func:`atp_viz.analysis.spectra.energy_curve`) is averaged over calibration texts from
the *training* split (never the held-out one the result is measured on), and
:func:`atp_viz.analysis.spectra.allocate` shares the budget (mean share of L over layers) out where it
keeps the most energy. The result goes into ``ATPConfig.layer_ranks`` and works with every form.

Below that, the measured split (what each layer's rank costs the output); :func:`choose_layer_ranks`
(one budget: fine-tuning, ``compare --layer-ranks``) and :func:`budget_splitter` (a grid of budgets:
``perplexity --layer-ranks``, the Serving page); the explorer splits with :func:`split_measurement` and
:func:`split_budget`. The budget-free measurement behind a split is kept on disk per model weights, form
and basis (:func:`split_measurement`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from atp_viz.analysis import spectra
from atp_viz.analysis.capture import capture
from atp_viz.core.progress import ProgressFn
from atp_viz.hf.model_info import LoadedModel, cache_dir

logger = logging.getLogger(__name__)

N_CALIBRATION = 32
SAME_BUDGET = 1e-6  # two budgets this close are one (a mean printed to 6 digits and typed back)


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
    centre_basis: bool = False,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Each layer's cumulative energy curve of its basis source (attention input X, or the keys of
    all kv heads side by side), averaged over ``texts``: ``[n_layers, grid + 1]``; with
    ``centre_basis``, the energy the centred basis keeps (:func:`spectra.basis_values`)."""
    if not texts:
        raise ValueError("No calibration texts.")
    total = np.zeros((loaded.info.n_layers, spectra.ALLOCATION_GRID + 1))
    for i, text in enumerate(texts):
        cap = capture(loaded, text, attentions="none")
        for layer in cap.layers:
            src = layer.x if basis_source == "input" else layer.k.transpose(1, 0, 2).reshape(cap.n_tokens, -1)
            total[layer.index] += spectra.energy_curve(spectra.basis_values(src, centre=centre_basis))
        if progress:
            progress((i + 1) / len(texts), f"calibration text {i + 1} of {len(texts)}")
    return total / len(texts)


def calibrated_layer_ranks(
    loaded: LoadedModel,
    share: float,
    texts: Sequence[str] | None = None,
    *,
    basis_source: str = "input",
    centre_basis: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[float, ...]:
    """Per-layer shares of L with mean ``share``, from the calibration texts' spectra."""
    curves = layer_curves(
        loaded, calibration_texts(loaded) if texts is None else texts, basis_source=basis_source,
        centre_basis=centre_basis, progress=progress,
    )  # fmt: skip
    return spectra.allocate(curves, share)


# --------------------------------------------------------------------------------------------------
# Measured per-layer ranks: what each layer's rank costs the output, not its spectrum's energy
# --------------------------------------------------------------------------------------------------
# The energy a layer's spectrum keeps is a poor guide to what its rank costs the model's output: on
# MiniLM (basis from the keys) the spectrum's allocation lowered the untuned held-out cosine at both
# budgets. Measuring instead: each layer alone runs ATP at each share of a coarse grid (the others
# dense) and the loss 1 - cosine to the dense embedding is averaged over training-split texts. Assuming
# the layers' losses add up, the best shares under the budget come from a small dynamic programme (the
# measured curves are not concave, so the greedy choice of spectra.allocate would not be optimal).

MEASURED_GRID = 8  # shares of L in steps of 1/8: n_layers * 8 evaluations on the calibration texts


def layer_losses(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    form: str = "exact",
    basis_source: str = "input",
    centre_basis: bool = False,
    grid: int = MEASURED_GRID,
    max_tokens: int = 128,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """``[n_layers, grid]``: mean 1 - cosine to the dense sentence embedding over ``texts`` when only
    that layer runs ATP at share ``k / grid`` (k = 1 .. grid) and every other layer is dense. Encoders."""
    from atp_viz.analysis.finetune.evaluation import embeddings
    from atp_viz.hf.engine import ATPConfig

    if loaded.info.is_decoder:
        raise ValueError(
            "Measured per-layer ranks are for encoders (the loss is the sentence embedding's cosine)."
        )
    if not texts:
        raise ValueError("No calibration texts.")
    dense = embeddings(loaded, None, texts, max_tokens)
    n = loaded.info.n_layers
    out = np.zeros((n, grid))
    for layer in range(n):
        for k in range(1, grid + 1):
            cfg = ATPConfig(
                rank=k / grid,
                form=form,
                layers=(layer,),
                basis_source=basis_source,
                centre_basis=centre_basis,
            )
            out[layer, k - 1] = 1.0 - float(
                (embeddings(loaded, cfg, texts, max_tokens) * dense).sum(-1).mean()
            )
            if progress:
                progress((layer * grid + k) / (n * grid), f"layer {layer + 1} of {n}, share {k}/{grid}")
    return out


def allocate_measured(losses: np.ndarray, share: float) -> tuple[float, ...]:
    """Per-layer shares k_l / grid (k_l = 1 .. grid) with mean ``share`` (rounded to the grid) that
    minimise the summed ``losses[l, k_l - 1]``: exact for any curve shape, by dynamic programming over
    the layers and the steps spent so far (n_layers * budget * grid operations)."""
    losses = np.asarray(losses, dtype=np.float64)
    n, grid = losses.shape
    if not 0 < share <= 1:
        raise ValueError(f"The budget must be a share of L in (0, 1], got {share}.")
    budget = min(n * grid, max(n, round(share * grid * n)))
    best = np.full(budget + 1, np.inf)  # best[s]: least loss of the layers so far spending s steps
    best[0] = 0.0
    choice = np.zeros((n, budget + 1), dtype=int)
    for layer in range(n):
        nxt = np.full(budget + 1, np.inf)
        for k in range(1, min(grid, budget) + 1):
            cand = np.full(budget + 1, np.inf)
            cand[k:] = best[: budget + 1 - k] + losses[layer, k - 1]
            better = cand < nxt
            nxt[better], choice[layer, better] = cand[better], k
        best = nxt
    steps, s = [], budget
    for layer in reversed(range(n)):
        k = choice[layer, s]
        steps.append(k)
        s -= k
    return tuple(k / grid for k in reversed(steps))


def measured_layer_ranks(
    loaded: LoadedModel,
    share: float,
    texts: Sequence[str] | None = None,
    *,
    form: str = "exact",
    basis_source: str = "input",
    centre_basis: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[float, ...]:
    """Per-layer shares of L with mean ``share``, chosen by what each layer's rank costs the output on
    the calibration texts (training split; :func:`layer_losses`, :func:`allocate_measured`)."""
    losses = layer_losses(
        loaded, calibration_texts(loaded) if texts is None else texts, form=form,
        basis_source=basis_source, centre_basis=centre_basis, progress=progress,
    )  # fmt: skip
    return allocate_measured(losses, share)


# --------------------------------------------------------------------------------------------------
# Choosing a split: the budget-free measurement (kept on disk), then the budget's split of it
# --------------------------------------------------------------------------------------------------
# The spectra's curves and the measured losses do not depend on the budget, and the losses take about
# 35 s on MiniLM (n_layers * MEASURED_GRID passes over the calibration texts). Each is measured once per
# model weights, form and basis, and kept under <cache>/allocation, so a series of fine-tuning runs or
# a class moving the explorer's rank slider splits any budget at once.

SPLIT_SCHEMA = 1  # bump when layer_curves or layer_losses change what they compute


def _weights_digest(loaded: LoadedModel) -> str:
    """A digest of the model's weights and trained form parameters: a cached measurement belongs to
    these exact weights (a tuned copy or a local checkpoint of the same name does not reuse it)."""
    import torch

    h = hashlib.sha1()
    tensors = dict(loaded.model.state_dict())
    for form, layers in sorted(loaded.atp_params.items()):
        for layer, params in sorted(layers.items()):
            tensors.update({f"atp.{form}.{layer}.{k}": v for k, v in params.items()})
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_file(how: str, loaded: LoadedModel, texts: Sequence[str], **params) -> Path:
    import torch

    from atp_viz import __version__

    key = {
        "how": how, "model": loaded.info.key, "weights": _weights_digest(loaded),
        "texts": hashlib.sha1("\0".join(texts).encode()).hexdigest(), **params,
        "torch": torch.__version__, "atp_viz": __version__, "schema": SPLIT_SCHEMA,
    }  # fmt: skip
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.-]+", "_", loaded.info.key)[-40:]
    return cache_dir() / "allocation" / f"{name}-{how}-{digest}.npy"


def split_measurement(
    how: str,
    loaded: LoadedModel,
    *,
    form: str = "exact",
    basis_source: str = "input",
    centre_basis: bool = False,
    texts: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """What a per-layer split is chosen from, whatever the budget: "spectrum", the calibration texts'
    energy curves (:func:`layer_curves`; the form plays no part), or "measured", each layer's loss at
    each share (:func:`layer_losses`), with the plain or the centred basis (``centre_basis``). Read from
    the disk cache when these weights, form, basis and texts were measured before; otherwise measured
    (with ``progress``) and kept there."""
    if how not in ("spectrum", "measured"):
        raise ValueError(f"A split is chosen from 'spectrum' or 'measured', not {how!r}.")
    texts = calibration_texts(loaded) if texts is None else list(texts)
    params: dict = {"basis_source": basis_source}
    if centre_basis:  # only then: the plain basis's files, measured before it existed, keep their names
        params["centre_basis"] = True
    if how == "measured":
        params.update(form=form, grid=MEASURED_GRID)
    else:
        params.update(grid=spectra.ALLOCATION_GRID)
    path = _cache_file(how, loaded, texts, **params)
    try:
        return np.load(path)
    except (OSError, ValueError):  # not measured yet, or a file cut short: measure again
        pass
    if how == "measured":
        out = layer_losses(
            loaded, texts, form=form, basis_source=basis_source, centre_basis=centre_basis, progress=progress
        )
    else:
        out = layer_curves(
            loaded, texts, basis_source=basis_source, centre_basis=centre_basis, progress=progress
        )
    try:  # written aside, then renamed: two sessions measuring at once never read half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part")
        with open(part, "wb") as f:
            np.save(f, out)
        part.replace(path)
    except OSError as err:  # a read-only cache costs the time again next call, nothing else
        logger.warning("could not keep the per-layer measurement in %s: %s", path.parent, err)
    return out


def split_budget(how: str, measurement: np.ndarray, share: float) -> tuple[float, ...]:
    """The budget's per-layer shares from :func:`split_measurement`'s result: the greedy split of the
    energy curves, or the dynamic programme over the measured losses. Both work on a grid of shares
    (1/64 and 1/8 of L), so the shares' mean can differ a little from ``share``."""
    if how == "spectrum":
        return spectra.allocate(measurement, share)
    if how == "measured":
        return allocate_measured(measurement, share)
    raise ValueError(f"A split is chosen from 'spectrum' or 'measured', not {how!r}.")


def choose_layer_ranks(
    how: str,
    loaded: LoadedModel,
    share: float,
    *,
    form: str = "exact",
    basis_source: str = "input",
    centre_basis: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[tuple[float, ...], str]:
    """``(shares, source)`` for ``how``: "measured", "spectrum", or shares of L typed by the user (one
    per layer, mean ``share``: :func:`atp_viz.core.ranks.parse_layer_shares`); ValueError with a
    sentence otherwise."""
    how = (how or "").strip()
    if not isinstance(share, float):
        raise ValueError("Per-layer ranks share a budget given as a share of L (e.g. 0.25), not a key count.")
    if how in ("measured", "spectrum"):
        found = split_measurement(
            how, loaded, form=form, basis_source=basis_source, centre_basis=centre_basis, progress=progress
        )
        return split_budget(how, found, share), how
    return given_shares(how, loaded), "given"


def given_shares(text: str, loaded: LoadedModel) -> tuple[float, ...]:
    """Per-layer shares of L typed by the user (:func:`atp_viz.core.ranks.parse_layer_shares`), one per
    layer of ``loaded``; ValueError with a sentence otherwise."""
    from atp_viz.core.ranks import parse_layer_shares

    shares = parse_layer_shares(text)
    if len(shares) != loaded.info.n_layers:
        raise ValueError(f"{len(shares)} per-layer ranks given; the model has {loaded.info.n_layers} layers.")
    return shares


def typed_budget(shares, tuned_shares=(), tuned_rank: float | None = None) -> float:
    """The budget per-layer shares typed by a user serve: their mean, or the rank a run tuned with exactly
    these shares records (the split's rounding can leave their mean off it). A run tuned with one rank
    has no shares, so typed ones serve their mean."""
    if tuned_rank is not None and tuple(map(float, shares)) == tuple(map(float, tuned_shares)):
        return float(tuned_rank)
    return float(np.mean(shares))


def budget_splitter(
    how: str,
    loaded: LoadedModel,
    *,
    form: str = "exact",
    basis_source: str = "input",
    centre_basis: bool = False,
    budget: float | None = None,
    progress: ProgressFn | None = None,
) -> Callable[[float], tuple[float, ...] | None]:
    """A grid's per-layer choice as a function of each budget (a share of L) -> its per-layer shares:
    "spectrum" or "measured" split every budget (measured once, here, with ``progress``); shares of L
    typed by the user serve their own mean (or ``budget``: the rank a run tuned with them records, which
    may differ from their mean by the split's rounding) only, and any other budget keeps one rank (None)."""
    how = (how or "").strip()
    if how in ("measured", "spectrum"):
        found = split_measurement(
            how, loaded, form=form, basis_source=basis_source, centre_basis=centre_basis, progress=progress
        )
        return lambda share: split_budget(how, found, share)
    shares = given_shares(how, loaded)
    serves = float(np.mean(shares)) if budget is None else float(budget)
    return lambda share: shares if abs(share - serves) <= SAME_BUDGET else None
