"""Spectra: agree with numpy's SVD and with their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SENTENCE

from atp_viz.analysis import spectra
from atp_viz.analysis.capture import capture


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_singular_values_match_numpy(rng):
    x = rng.normal(size=(40, 12)).astype(np.float32)
    np.testing.assert_allclose(
        spectra.singular_values(x), np.linalg.svd(x.astype(np.float64), compute_uv=False)
    )
    xc = x - x.mean(0)
    np.testing.assert_allclose(
        spectra.singular_values(x, centered=True), np.linalg.svd(xc.astype(np.float64), compute_uv=False)
    )
    np.testing.assert_allclose(
        spectra.singular_values(x, skip_first=True), np.linalg.svd(x[1:].astype(np.float64), compute_uv=False)
    )


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_basis_values_are_what_each_basis_keeps_column_by_column(rng, shape):
    """The energy curve a split is chosen from is the energy the basis really keeps: with k columns of
    principal_basis (plain or centred), ||U_k U_k^T X||^2 is the sum of the first k squared values."""
    import torch

    from atp_viz.core.basis import principal_basis

    x = rng.normal(size=shape) + 3.0 * rng.normal(size=(1, shape[1]))  # a large mean token, as keys have
    t = torch.from_numpy(x)
    for centre in (False, True):
        values = spectra.basis_values(x, centre=centre)
        assert values.shape == (min(shape),)
        for k in (1, 2, 5, min(shape)):
            u = principal_basis(t, k, centre=centre)
            kept = float((u @ (u.mT @ t)).square().sum())
            assert (values[:k] ** 2).sum() == pytest.approx(kept, rel=1e-6), (centre, k)
    plain, centred = spectra.basis_values(x), spectra.basis_values(x, centre=True)
    # The plain SVD keeps the most energy at every k (Eckart-Young); the centred basis another amount, so a
    # centred run gets its own split.
    assert np.all(np.cumsum(centred**2) <= np.cumsum(plain**2) * (1 + 1e-9))
    assert not np.allclose(np.cumsum(centred**2)[:-1], np.cumsum(plain**2)[:-1])


def test_low_rank_matrix_has_low_rank_needed(rng):
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 20))  # rank 3
    sp = spectra.spectrum(x)
    assert sp.rank_for(0.99) <= 3
    assert sp.rank_for(1.0) == 3
    assert sp.cumulative_energy[-1] == pytest.approx(1.0)
    assert 1.0 <= sp.effective_rank <= 3.0 + 1e-9
    assert sp.fraction_for(0.99) <= 3 / 50


def test_energy_definitions():
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert spectra.rank_for_energy(s, 0.9) == 2  # (9 + 4) / 14 = 0.93
    assert spectra.rank_for_energy(s, 0.6) == 1  # 9 / 14 = 0.64
    assert spectra.rank_for_energy(s, 0.95) == 3
    assert spectra.rank_for_energy(np.zeros(3), 0.9) == 0
    with pytest.raises(ValueError):
        spectra.rank_for_energy(s, 0.0)


def test_effective_rank_bounds():
    assert spectra.effective_rank(np.array([5.0, 0, 0])) == pytest.approx(1.0)
    assert spectra.effective_rank(np.ones(7)) == pytest.approx(7.0)
    p = np.array([0.5, 0.3, 0.2])
    assert spectra.effective_rank(p * 10) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_scale_and_rotation_invariance(rng):
    """Spectra of X, c X and X R (R orthogonal) agree up to the scale: what the UI plots is intrinsic."""
    x = rng.normal(size=(30, 10))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a, b = spectra.spectrum(x), spectra.spectrum(3.0 * x @ q)
    np.testing.assert_allclose(a.normalized, b.normalized, atol=1e-10)
    assert [a.rank_for(t) for t in spectra.THRESHOLDS] == [b.rank_for(t) for t in spectra.THRESHOLDS]


def test_ranks_table_and_prefix_lengths(rng):
    xs = [rng.normal(size=(20, 8)) for _ in range(3)]
    table = spectra.ranks_table(spectra.layer_spectra(xs))
    assert table.shape == (3, len(spectra.THRESHOLDS))
    assert (np.diff(table, axis=1) >= 0).all()  # a higher threshold never needs fewer components
    assert spectra.prefix_lengths(100) == [16, 32, 64, 100]
    assert spectra.prefix_lengths(10) == [10]


def test_single_token_skip_first_is_an_error():
    with pytest.raises(ValueError, match="leaves nothing to analyse"):
        spectra.singular_values(np.ones((1, 4)), skip_first=True)


def test_capture_spectra_on_model(load):
    cap = capture(load("tiny-llama"), SENTENCE)
    sps = spectra.layer_spectra([layer.x for layer in cap.layers])
    assert len(sps) == 2 and all(sp.n_rows == cap.n_tokens for sp in sps)
    heads = spectra.head_spectra(cap.layers[0].k)
    assert len(heads) == cap.info.n_kv_heads


def test_effective_rank_by_length_uses_each_prefix(load):
    from atp_viz.analysis.lengths import effective_rank_by_length

    loaded = load("tiny-bert")
    lengths, er = effective_rank_by_length(loaded, "one two three four five six seven eight nine ten " * 4)
    assert lengths[0] == 16 and lengths[-1] == 42 and er.shape == (2, len(lengths))
    assert (er <= np.minimum(lengths, loaded.info.d_model) + 1e-9).all() and (er >= 1).all()
