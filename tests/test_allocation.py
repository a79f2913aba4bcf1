"""Per-layer ranks under one budget: the allocation is optimal and keeps the budget, and the engine
gives each layer its own rank."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from atp_viz.analysis import allocation, spectra
from atp_viz.analysis.compare import forward
from atp_viz.hf.engine import ATPConfig
from atp_viz.text.inputs import tokenize


def _curves(rng: np.random.Generator, n_layers: int, grid: int) -> np.ndarray:
    """Random concave energy curves from random sorted spectra."""
    return np.stack(
        [spectra.energy_curve(np.sort(rng.gamma(0.5, size=grid))[::-1], grid) for _ in range(n_layers)]
    )


def test_energy_curve_is_cumulative_energy_on_a_share_grid():
    s = np.array([3.0, 2.0, 1.0, 1.0])
    curve = spectra.energy_curve(s, grid=4)
    np.testing.assert_allclose(curve, np.concatenate([[0], np.cumsum(s**2) / (s**2).sum()]))
    assert np.all(np.diff(spectra.energy_curve(np.sort(np.random.rand(37))[::-1], 16), 2) <= 1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_the_best_split_of_the_budget(seed):
    """Brute force over every split with the same total: none keeps more energy."""
    rng = np.random.default_rng(seed)
    grid, n_layers, share = 6, 3, 0.5
    curves = _curves(rng, n_layers, grid)
    shares = spectra.allocate(curves, share)
    steps = [round(x * grid) for x in shares]
    assert sum(steps) == round(share * grid * n_layers) and min(steps) >= 1
    best = max(
        sum(curves[i, k] for i, k in enumerate(split))
        for split in itertools.product(range(1, grid + 1), repeat=n_layers)
        if sum(split) == sum(steps)
    )
    assert sum(curves[i, k] for i, k in enumerate(steps)) == pytest.approx(best)


def test_allocation_follows_the_spectra():
    grid = 64
    sharp = spectra.energy_curve(np.r_[100.0, np.ones(63) * 0.01], grid)  # one direction holds it all
    flat = spectra.energy_curve(np.ones(64), grid)
    assert spectra.allocate(np.stack([flat, flat, flat]), 0.25) == (0.25, 0.25, 0.25)  # same: uniform
    a = spectra.allocate(np.stack([sharp, flat]), 0.25)
    assert a[0] < a[1] and np.mean(a) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="budget"):
        spectra.allocate(np.stack([flat]), 1.5)


def test_per_layer_ranks_reach_each_layer(load):
    """Equal per-layer ranks are the one rank; a full rank in layer 0 (exact form) makes that layer dense,
    while a low rank in layer 1 still changes the output."""
    loaded = load("tiny-bert")
    tok = tokenize(loaded.tokenizer, "Principal keys keep what matters in attention. " * 3, 64)
    dense = forward(loaded, tok)
    one = forward(loaded, tok, ATPConfig(rank=0.25))
    same = forward(loaded, tok, ATPConfig(rank=0.25, layer_ranks=(0.25, 0.25)))
    np.testing.assert_array_equal(one.final_hidden, same.final_hidden)
    mixed = forward(loaded, tok, ATPConfig(rank=0.625, layer_ranks=(1.0, 0.25)))

    def err(run, i):
        return np.linalg.norm(run.layer_outputs[i] - dense.layer_outputs[i]) / np.linalg.norm(
            dense.layer_outputs[i]
        )

    assert err(mixed, 0) < 1e-6 < err(one, 0)  # layer 0: full rank is dense; the one rank is not
    assert err(mixed, 1) > 1e-5
    assert "per-layer" in ATPConfig(rank=0.5, layer_ranks=(0.5, 0.5)).label()
    with pytest.raises(ValueError, match="layer 1 has none"):
        forward(loaded, tok, ATPConfig(rank=0.5, layer_ranks=(0.5,)))


def test_calibration_uses_training_texts_and_keeps_the_budget(load):
    loaded = load("tiny-bert")
    texts = allocation.calibration_texts(loaded, n=4)
    from atp_viz.text.corpus import HELDOUT_MODULES, docstrings

    held = set(docstrings(HELDOUT_MODULES))
    assert len(texts) == 4 and not any(t in held for t in texts)
    shares = allocation.calibrated_layer_ranks(loaded, 0.5, texts)
    assert len(shares) == loaded.info.n_layers and np.mean(shares) == pytest.approx(0.5, abs=1 / 64)


def test_typed_shares_serve_their_mean_or_the_rank_their_run_records():
    shares = (0.375, 0.28125)  # a split's 1/64 rounding: mean 0.328125, the run records 0.33
    assert allocation.typed_budget(shares) == pytest.approx(0.328125)
    assert allocation.typed_budget(shares, shares, 0.33) == 0.33
    assert allocation.typed_budget((0.5, 0.25), shares, 0.33) == pytest.approx(0.375)  # not that run's
