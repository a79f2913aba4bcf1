"""The token-sketch basis: cheap, approximate, and exact where the sample spans x's row space."""

import pytest
import torch

from atp_viz.core.basis import principal_basis
from atp_viz.hf.engine import ATPConfig


def _projector(u):
    return u @ u.mT


def test_sketch_spans_an_exactly_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 64, generator=g, dtype=torch.float64
    )
    u = principal_basis(x, 5, "sketch")
    exact = principal_basis(x, 5, "exact")
    torch.testing.assert_close(u.mT @ u, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(_projector(u), _projector(exact), atol=1e-8, rtol=0)
    assert torch.equal(principal_basis(x, 5, "sketch"), u)  # deterministic


def test_sketch_is_approximate_but_orthonormal_and_respects_padding():
    g = torch.Generator().manual_seed(1)
    scales = 0.8 ** torch.arange(48, dtype=torch.float32)
    x = (torch.randn(1200, 48, generator=g) * scales) @ torch.linalg.qr(torch.randn(48, 48, generator=g)).Q
    valid = torch.ones(1200, dtype=torch.bool)
    valid[1100:] = False
    u = principal_basis(x, 8, "sketch", valid=valid)
    torch.testing.assert_close(u.mT @ u, torch.eye(8), atol=1e-5, rtol=0)
    assert u[1100:].abs().max() == 0
    xe = x * valid[:, None]
    s = torch.linalg.svdvals(xe)
    captured = (u.mT @ xe).pow(2).sum() / s[:8].pow(2).sum()
    assert 0.9 < captured <= 1.0 + 1e-5


def test_sketch_falls_back_to_exact_for_short_inputs():
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(principal_basis(x, 7, "sketch"), principal_basis(x, 7, "exact"))


def test_config_accepts_the_sketch_and_rejects_unknown_methods():
    assert "sketch basis" in ATPConfig(basis_method="sketch").label()
    with pytest.raises(ValueError, match="basis_method"):
        ATPConfig(basis_method="magic")
