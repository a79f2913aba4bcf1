"""Analytical costs: the counts quoted in the issue for SmolLM2's geometry at L = 8192, r = 128."""

import pytest

from atp_viz import costs


def test_smollm2_counts_at_8192():
    dense = costs.dense_cost(8192, 9, 64)
    atp = costs.atp_cost(8192, 128, 9, 3, 64, 576)
    assert dense.macs == pytest.approx(77.3e9, rel=1e-3)  # "about 77 G"
    assert atp.macs - costs.basis_macs(8192, 576, 128) == pytest.approx(1.61e9, rel=1e-2)  # "about 1.6 G"
    assert costs.basis_macs(8192, 576, 128) == pytest.approx(3.9e9, rel=1e-2)  # "about 3.9 G"
    assert costs.speedup_ceiling(8192, 128, 9, 3, 64, 576) == pytest.approx(14.0, abs=0.1)  # "near 14x"
    assert dense.scores / atp.scores == 8192 / 128


def test_quadratic_vs_linear_scaling():
    d1, d2 = costs.dense_cost(1024, 9, 64).macs, costs.dense_cost(2048, 9, 64).macs
    a1 = costs.atp_cost(1024, 64, 9, 3, 64, 576).macs
    a2 = costs.atp_cost(2048, 64, 9, 3, 64, 576).macs
    assert d2 / d1 == pytest.approx(4.0)
    assert a2 / a1 == pytest.approx(2.0)
    dense_ll, low_ll = costs.linear_layer_macs(1024, 64, 576, 576)
    assert low_ll < dense_ll
