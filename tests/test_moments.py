"""A past kept as running sums gives the same principal keys/values as an SVD of the past itself, so the
strictly causal chunked mode gives the same logits with either, and stays strictly causal."""

from __future__ import annotations

import pytest
import torch

from atp_viz import forms
from atp_viz.analysis import serving
from atp_viz.analysis.moments import MomentStore
from atp_viz.core.basis import principal_basis


def _past(seed: int, n: int = 90, Hkv: int = 2, dh: int = 8, d: int = 24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    k = torch.randn(Hkv, n, dh, generator=g, dtype=torch.float64)
    v = torch.randn(Hkv, n, dh, generator=g, dtype=torch.float64)
    return x, k, v


@pytest.mark.parametrize("basis_from", ["input", "keys"])
def test_running_sums_give_the_svd_principal_keys_up_to_sign(basis_from):
    x, k, v = _past(0)
    store = MomentStore(basis_from)
    for a in range(0, x.shape[0], 32):  # chunks of 32, 32, 26
        store.append(k[:, a : a + 32], v[:, a : a + 32], x[a : a + 32])
    r = 6
    got = store.past(r)
    src = x if basis_from == "input" else k.transpose(0, 1).reshape(x.shape[0], -1)
    u = principal_basis(src, r, "exact")
    sign = torch.where(u.sum(0) < 0, -1.0, 1.0).to(u.dtype)  # the sums' convention: U_r^T 1 >= 0
    ref = forms.compress(u * sign, k, v)
    assert got.u is None and got.n == x.shape[0]
    for a, b in ((got.kp, ref.kp), (got.vp, ref.vp), (got.s, ref.s)):
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-4)


def test_a_rank_above_the_directions_there_are_is_cut():
    x, k, v = _past(1, n=5)
    store = MomentStore("keys")
    store.append(k, v, x)
    assert store.past(50).kp.shape[1] == 5  # at most n directions
    assert MomentStore("keys").past(4) is None
    with pytest.raises(ValueError, match="basis_from"):
        MomentStore("values")


@pytest.mark.parametrize("form", ["linear", "pksoftmax"])
def test_chunked_logits_from_running_sums_equal_the_recomputed_basis(load, form, monkeypatch):
    """Sign-invariant linear form: the same logits; principal-key softmax: the same once both bases are
    signed alike (the SVD path signs by the largest entry, which the sums cannot see)."""
    loaded = load("tiny-llama")
    ids = torch.randint(5, 1000, (1, 80), generator=torch.Generator().manual_seed(2))
    kw = dict(rank=6, form=form, chunk=16, basis_from="keys", method="exact")
    a = serving.chunked_logits(loaded, ids, basis_update="moments", **kw)
    if form == "pksoftmax":
        import atp_viz.core.basis as basis_mod

        def by_sum(U):
            return U * torch.where(U.sum(-2, keepdim=True) < 0, -1.0, 1.0).to(U.dtype)

        monkeypatch.setattr(basis_mod, "_fix_signs", by_sum)
    b = serving.chunked_logits(loaded, ids, **kw)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(a, serving.chunked_logits(loaded, ids, rank=None, chunk=16), atol=1e-3)


def test_running_sums_read_no_later_token(load):
    loaded = load("tiny-llama")
    ids = torch.randint(5, 1000, (1, 64), generator=torch.Generator().manual_seed(3))
    kw = dict(rank=4, form="linear", chunk=16, basis_from="keys", basis_update="moments")
    base = serving.chunked_logits(loaded, ids, **kw)
    changed = ids.clone()
    changed[0, 40] = (changed[0, 40] + 7) % 1000  # inside the third chunk
    other = serving.chunked_logits(loaded, changed, **kw)
    torch.testing.assert_close(base[:40], other[:40], rtol=0, atol=0)
    assert not torch.allclose(base[40:], other[40:])


def test_forms_that_rebuild_past_keys_are_refused(load):
    ids = torch.ones(1, 40, dtype=torch.long)
    with pytest.raises(ValueError, match="recompute"):
        serving.chunked_logits(
            load("tiny-llama"), ids, rank=4, form="exact", chunk=16, basis_update="moments"
        )
    x, k, v = _past(4)
    store = MomentStore("keys")
    store.append(k, v, x)
    q = torch.randn(4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="U_r"):
        forms.get("taylor2").stream(q, k[:, :8], v[:, :8], store.past(3), scaling=0.3)
