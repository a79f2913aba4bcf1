"""Property tests of the maths (principal bases, ranks, the dense reference, the exact and linear forms)
on small seeded tensors (float64 for tight checks, float32 at 1e-4). The checks every registered form
must pass are in test_forms.py; these are the built-in forms' own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atp_viz import forms
from atp_viz.core.attention import dense_attention, lift_principal_map, linearised_dense_attention
from atp_viz.core.basis import principal_basis
from atp_viz.core.ranks import resolve_rank
from atp_viz.forms import linear as linear_form


def atp_attention(q, k, v, basis, *, form="linear", chunk_size=None, **kw):
    """The registered form's full-sequence attention (``chunk_size``: the causal linear path's block)."""
    if chunk_size is None:
        return forms.get(form).attend(q, k, v, basis, **kw)
    saved, linear_form.CAUSAL_CHUNK = linear_form.CAUSAL_CHUNK, chunk_size
    try:
        return forms.get(form).attend(q, k, v, basis, **kw)
    finally:
        linear_form.CAUSAL_CHUNK = saved


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _qkv_from_x(x, H, Hkv, dh, seed=1):
    """q, k, v as linear maps of x [B, L, d] (like a layer without bias), shapes [B, heads, L, dh]."""
    B, L, d = x.shape
    g = _gen(seed)
    Wq = torch.randn(d, H * dh, generator=g, dtype=x.dtype) / d**0.5
    Wk = torch.randn(d, Hkv * dh, generator=g, dtype=x.dtype) / d**0.5
    Wv = torch.randn(d, Hkv * dh, generator=g, dtype=x.dtype) / d**0.5
    q = (x @ Wq).reshape(B, L, H, dh).transpose(1, 2)  # (B, H, L, dh)
    k = (x @ Wk).reshape(B, L, Hkv, dh).transpose(1, 2)  # (B, Hkv, L, dh)
    v = (x @ Wv).reshape(B, L, Hkv, dh).transpose(1, 2)  # (B, Hkv, L, dh)
    return q, k, v


def _proj(U):
    return U @ U.mT


def _assert_orthonormal(U, atol):
    r = U.shape[-1]
    eye = torch.eye(r, dtype=U.dtype).expand(*U.shape[:-2], r, r)
    torch.testing.assert_close(U.mT @ U, eye, atol=atol, rtol=0)


def _repeat(t, G):
    return t.repeat_interleave(G, dim=1)


# ------------------------------------------------------------------------------------------------
# principal_basis
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_basis_orthonormal_batched(dtype, atol):
    x = _randn(2, 3, 12, 7, dtype=dtype)
    U = principal_basis(x, 5)
    assert U.shape == (2, 3, 12, 5) and U.dtype == dtype
    _assert_orthonormal(U, atol)


def test_basis_half_input_is_computed_in_float32_and_cast_back():
    x = _randn(10, 6, dtype=torch.float32)
    U = principal_basis(x.to(torch.bfloat16), 3)
    assert U.dtype == torch.bfloat16
    _assert_orthonormal(U.float(), 2e-2)


def test_basis_spans_numpy_svd_subspace():
    x = _randn(20, 9, seed=3)
    r = 4
    U = principal_basis(x, r)
    Un = np.linalg.svd(x.numpy(), full_matrices=False)[0][:, :r]
    np.testing.assert_allclose(_proj(U).numpy(), Un @ Un.T, atol=1e-10)


def test_randomized_close_to_exact_on_decaying_spectrum():
    L, d, r = 64, 40, 6
    g = _gen(5)
    A = torch.linalg.qr(torch.randn(L, d, generator=g, dtype=torch.float64)).Q  # (L, d)
    Bm = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q  # (d, d)
    x = A @ torch.diag(2.0 ** -torch.arange(d, dtype=torch.float64)) @ Bm.T
    exact = principal_basis(x, r)
    rand = principal_basis(x, r, "randomized", niter=2, generator=_gen(7))
    _assert_orthonormal(rand, 1e-12)
    torch.testing.assert_close(_proj(rand), _proj(exact), atol=1e-8, rtol=0)
    # with the shared sign convention the columns themselves agree, not only the subspace
    torch.testing.assert_close(rand, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_basis_deterministic_and_sign_convention(method):
    x = _randn(3, 50, 30, seed=11)
    a = principal_basis(x, 4, method, generator=_gen(1))
    b = principal_basis(x, 4, method, generator=_gen(1))
    assert torch.equal(a, b)
    idx = a.abs().argmax(dim=-2, keepdim=True)
    assert (a.gather(-2, idx) > 0).all()
    # flipping x's sign flips U's columns; the convention flips them back
    torch.testing.assert_close(principal_basis(-x, 4), principal_basis(x, 4), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_basis_padding_rows_are_zero(method):
    L, d, n = 40, 30, 25
    # near rank 6, so that the randomised finder is accurate too
    x = _randn(2, L, 6, seed=2) @ _randn(2, 6, d, seed=3) + 1e-3 * _randn(2, L, d, seed=4)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, n:] = False
    x_padded = x.clone()
    x_padded[1, n:] = 1e3  # garbage in the padding must not matter
    U = principal_basis(x_padded, 6, method, valid=valid, generator=_gen(0))
    assert (U[1, n:] == 0).all()
    _assert_orthonormal(U, 1e-12)
    alone = principal_basis(x[1:, :n], 6)
    torch.testing.assert_close(_proj(U[1:, :n]), _proj(alone), atol=1e-8, rtol=0)


def test_basis_rank_beyond_min_L_d_is_completed():
    x = _randn(10, 3, seed=4)
    U = principal_basis(x, 6)
    _assert_orthonormal(U, 1e-12)
    torch.testing.assert_close(_proj(U[:, :3]), _proj(principal_basis(x, 3)), atol=1e-12, rtol=0)
    full = principal_basis(x, 10)
    torch.testing.assert_close(_proj(full), torch.eye(10, dtype=x.dtype), atol=1e-12, rtol=0)
    # rank-deficient x (rank 2 in a 10 x 6 matrix) also completes
    low = _randn(10, 2, seed=5) @ _randn(2, 6, seed=6)
    _assert_orthonormal(principal_basis(low, 8), 1e-12)


def test_basis_completion_with_padding_stays_on_valid_rows():
    x = _randn(2, 8, 3, seed=8)
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    U = principal_basis(x, 8, valid=valid)
    assert U.shape == (2, 8, 8)
    torch.testing.assert_close(_proj(U[0]), torch.eye(8, dtype=x.dtype), atol=1e-12, rtol=0)
    # only 5 columns can be orthonormal on 5 valid rows; the rest are zero
    assert (U[1, 5:] == 0).all() and (U[1, :, 5:] == 0).all()
    _assert_orthonormal(U[1, :, :5], 1e-12)
    torch.testing.assert_close(_proj(U[1]), torch.diag(valid[1].double()), atol=1e-12, rtol=0)


def test_basis_rank_validation():
    x = _randn(6, 4)
    for bad in (0, -1, 7):
        with pytest.raises(ValueError, match="rank"):
            principal_basis(x, bad)
    for bad in (2.5, True, "3"):
        with pytest.raises(TypeError, match="rank"):
            principal_basis(x, bad)
    with pytest.raises(ValueError, match="method"):
        principal_basis(x, 2, "eig")
    with pytest.raises(ValueError, match="valid"):
        principal_basis(x, 2, valid=torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# resolve_rank
# ------------------------------------------------------------------------------------------------


def test_resolve_rank_values():
    assert resolve_rank(5, 10) == (5, None)
    assert resolve_rank(0.5, 10) == (5, None)
    assert resolve_rank(0.25, 10) == (3, None)  # 2.5 rounds half up
    assert resolve_rank(1.0, 10) == (10, None)
    assert resolve_rank(0.01, 10) == (1, None)  # at least one key
    assert resolve_rank(np.int64(4), 10) == (4, None)
    assert resolve_rank(np.float32(0.5), 10) == (5, None)
    r, notice = resolve_rank(300, 128)
    assert r == 128 and notice is not None and "300" in notice and "128" in notice


@pytest.mark.parametrize("bad", [0, -3, 0.0, -0.5, 1.5, float("nan")])
def test_resolve_rank_value_errors(bad):
    with pytest.raises(ValueError):
        resolve_rank(bad, 10)


@pytest.mark.parametrize("bad", [True, False, np.True_, "3", None])
def test_resolve_rank_type_errors(bad):
    with pytest.raises(TypeError):
        resolve_rank(bad, 10)


# ------------------------------------------------------------------------------------------------
# dense references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (3, 1)])
def test_dense_matches_sdpa(causal, H, Hkv):
    B, L, dh = 2, 9, 8
    q, k, v = _randn(B, H, L, dh, seed=1), _randn(B, Hkv, L, dh, seed=2), _randn(B, Hkv, L, dh, seed=3)
    G = H // Hkv
    ref = F.scaled_dot_product_attention(q, _repeat(k, G), _repeat(v, G), is_causal=causal)
    out, w = dense_attention(q, k, v, causal=causal, return_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert w.shape == (B, H, L, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L, dtype=q.dtype))


def test_dense_key_mask_and_scaling_match_sdpa():
    B, H, L, dh = 2, 2, 7, 4
    q, k, v = _randn(B, H, L, dh, seed=1), _randn(B, H, L, dh, seed=2), _randn(B, H, L, dh, seed=3)
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, 4:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=km[:, None, None, :], scale=0.3)
    torch.testing.assert_close(dense_attention(q, k, v, key_mask=km, scaling=0.3), ref, atol=1e-12, rtol=0)


def test_rows_without_keys_are_zero_not_nan():
    q, k, v = _randn(1, 1, 4, 3), _randn(1, 1, 4, 3, seed=1), _randn(1, 1, 4, 3, seed=2)
    km = torch.tensor([[False, False, True, True]])  # left padding
    U = principal_basis(_randn(1, 4, 5), 2, valid=km)
    for out in (
        dense_attention(q, k, v, causal=True, key_mask=km),
        linearised_dense_attention(q, k, v, causal=True, key_mask=km),
        atp_attention(q, k, v, U, form="exact", causal=True, key_mask=km),
        atp_attention(q, k, v, U, form="linear", causal=True, key_mask=km),
    ):
        assert torch.isfinite(out).all()
        assert (out[:, :, :2] == 0).all()


# ------------------------------------------------------------------------------------------------
# ATP exact form
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_exact_full_rank_equals_dense_float32(causal):
    B, L, d, H, Hkv, dh = 2, 12, 16, 4, 2, 8
    x = _randn(B, L, d, seed=1, dtype=torch.float32)
    q, k, v = _qkv_from_x(x, H, Hkv, dh)
    dense = dense_attention(q, k, v, causal=causal)
    U = principal_basis(x, L)
    out = atp_attention(q, k, v, U, form="exact", causal=causal)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=0)
    # any orthonormal basis of R^L works at r = L
    Ur = torch.linalg.qr(_randn(B, L, L, seed=9, dtype=torch.float32)).Q
    out = atp_attention(q, k, v, Ur, form="exact", causal=causal)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_at_rank_of_x_equals_dense_float32(causal):
    """Full-rank exactness: K, V linear in X of rank 5 < L are spanned by the top-5 bases of X."""
    B, L, d, rk, H, Hkv, dh = 2, 16, 24, 5, 6, 2, 8
    x = (_randn(B, L, rk, seed=1) @ _randn(B, rk, d, seed=2)).float()
    q, k, v = _qkv_from_x(x, H, Hkv, dh)
    U = principal_basis(x, rk)
    out = atp_attention(q, k, v, U, form="exact", causal=causal)
    torch.testing.assert_close(out, dense_attention(q, k, v, causal=causal), atol=1e-4, rtol=0)
    # and one basis fewer is visibly not exact
    U4 = principal_basis(x, rk - 1)
    out4 = atp_attention(q, k, v, U4, form="exact", causal=causal)
    assert (out4 - dense_attention(q, k, v, causal=causal)).abs().max() > 1e-3


def test_exact_maps_are_softmax_over_reconstructed_keys():
    B, H, L, dh, r = 1, 2, 6, 4, 3
    q, k, v = _randn(B, H, L, dh, seed=1), _randn(B, H, L, dh, seed=2), _randn(B, H, L, dh, seed=3)
    U = principal_basis(_randn(B, L, 5, seed=4), r)
    out, maps = atp_attention(q, k, v, U, form="exact", causal=True, return_maps=True)
    P = maps["tokens"]
    assert P.shape == (B, H, L, L)
    torch.testing.assert_close(P.sum(-1), torch.ones(B, H, L, dtype=q.dtype))
    assert (P.triu(1) == 0).all()
    torch.testing.assert_close(P @ (U.unsqueeze(1) @ U.mT.unsqueeze(1) @ v), out)


# ------------------------------------------------------------------------------------------------
# ATP linear form
# ------------------------------------------------------------------------------------------------


def _explicit_linear(q, k, v, U, causal, c=None):
    """The first-order form written out with an L x L matrix: A_ij = 1 + c q_i k_r_j^T."""
    H, Hkv, dh = q.shape[1], k.shape[1], q.shape[3]
    c = dh**-0.5 if c is None else c
    P = (U @ U.mT).unsqueeze(1)  # (B, 1, L, L)
    Kr, Vr = _repeat(P @ k, H // Hkv), _repeat(P @ v, H // Hkv)  # (B, H, L, dh)
    A = 1 + c * q @ Kr.mT  # (B, H, L, L)
    if causal:
        A = A.tril()
    return (A @ Vr) / A.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (6, 2)])
def test_linear_equals_explicit_first_order(causal, H, Hkv):
    B, L, d, dh, r = 2, 11, 10, 4, 5
    x = _randn(B, L, d, seed=1)
    q, k, v = _qkv_from_x(x, H, Hkv, dh, seed=2)
    U = principal_basis(x, r)
    out = atp_attention(q, k, v, U, form="linear", causal=causal)
    torch.testing.assert_close(out, _explicit_linear(q, k, v, U, causal), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 64])
def test_linear_causal_chunk_boundaries(chunk):
    B, L, H, Hkv, dh, r = 1, 13, 4, 2, 3, 4
    x = _randn(B, L, 8, seed=3)
    q, k, v = _qkv_from_x(x, H, Hkv, dh, seed=4)
    U = principal_basis(x, r)
    out = atp_attention(q, k, v, U, causal=True, chunk_size=chunk)
    torch.testing.assert_close(out, _explicit_linear(q, k, v, U, True), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_float32(causal):
    B, L, d, H, Hkv, dh, r = 2, 20, 16, 4, 2, 8, 6
    x = _randn(B, L, d, seed=5)
    q, k, v = _qkv_from_x(x, H, Hkv, dh, seed=6)
    U = principal_basis(x, r)
    ref = _explicit_linear(q, k, v, U, causal)
    out = atp_attention(q.float(), k.float(), v.float(), U.float(), causal=causal)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_full_rank_equals_linearised_dense(causal):
    B, L, H, Hkv, dh = 2, 9, 6, 3, 4
    q, k, v = _randn(B, H, L, dh, seed=1), _randn(B, Hkv, L, dh, seed=2), _randn(B, Hkv, L, dh, seed=3)
    U = torch.linalg.qr(_randn(B, L, L, seed=4)).Q
    out = atp_attention(q, k, v, U, form="linear", causal=causal)
    torch.testing.assert_close(
        out, linearised_dense_attention(q, k, v, causal=causal), atol=1e-12, rtol=1e-10
    )


@pytest.mark.parametrize("form", ["linear", "exact"])
@pytest.mark.parametrize("causal", [False, True])
def test_sign_invariance(form, causal):
    # Every term of both forms is quadratic in each basis column u (u u^T, or u^T 1 times u^T K),
    # so flipping a column's sign changes nothing. A softmax over principal keys, softmax(q K'^T),
    # would not be invariant: K' = U^T K flips sign with the column.
    B, L, H, dh, r = 2, 10, 2, 4, 4
    x = _randn(B, L, 7, seed=1)
    q, k, v = _qkv_from_x(x, H, H, dh)
    U = principal_basis(x, r)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=U.dtype)
    a = atp_attention(q, k, v, U, form=form, causal=causal)
    b = atp_attention(q, k, v, U * flip, form=form, causal=causal)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("form", ["linear", "exact"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv(form, causal):
    B, L, H, Hkv, dh, r = 2, 10, 6, 2, 4, 4
    x = _randn(B, L, 12, seed=2)
    q, k, v = _qkv_from_x(x, H, Hkv, dh, seed=3)
    U = principal_basis(x, r)
    grouped = atp_attention(q, k, v, U, form=form, causal=causal)
    repeated = atp_attention(q, _repeat(k, 3), _repeat(v, 3), U, form=form, causal=causal)
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_maps_and_lift(causal):
    B, L, H, Hkv, dh, r = 2, 8, 4, 2, 3, 3
    x = _randn(B, L, 6, seed=7)
    q, k, v = _qkv_from_x(x, H, Hkv, dh, seed=8)
    U = principal_basis(x, r)
    out, maps = atp_attention(q, k, v, U, causal=causal, return_maps=True, chunk_size=3)
    Ap = maps["principal"]
    assert Ap.shape == (B, H, L, r)
    torch.testing.assert_close(out, atp_attention(q, k, v, U, causal=causal))
    Vp = _repeat(U.mT.unsqueeze(1) @ v, H // Hkv)  # (B, H, r, dh)
    torch.testing.assert_close(Ap @ Vp, out, atol=1e-12, rtol=1e-10)
    lifted = lift_principal_map(Ap, U)
    assert lifted.shape == (B, H, L, L)
    torch.testing.assert_close(lifted @ _repeat(v, H // Hkv), out, atol=1e-12, rtol=1e-10)


def test_L_equals_one():
    B, H, Hkv, dh = 2, 4, 2, 3
    q, k, v = _randn(B, H, 1, dh, seed=1), _randn(B, Hkv, 1, dh, seed=2), _randn(B, Hkv, 1, dh, seed=3)
    U = principal_basis(_randn(B, 1, 5, seed=4), 1)
    assert U.shape == (B, 1, 1) and (U == 1).all()
    expected = _repeat(v, 2)  # a single key gets all the weight
    for causal in (False, True):
        torch.testing.assert_close(dense_attention(q, k, v, causal=causal), expected)
        for form in ("linear", "exact"):
            torch.testing.assert_close(atp_attention(q, k, v, U, form=form, causal=causal), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_matches_unpadded(causal):
    L, n, d, H, Hkv, dh, r = 12, 8, 10, 4, 2, 4, 4
    x = _randn(2, L, d, seed=1)
    km = torch.ones(2, L, dtype=torch.bool)
    km[1, n:] = False
    q, k, v = _qkv_from_x(x, H, Hkv, dh, seed=2)
    U = principal_basis(x, r, valid=km)
    x1 = x[1:, :n]
    q1, k1, v1 = q[1:, :, :n], k[1:, :, :n], v[1:, :, :n]
    U1 = principal_basis(x1, r)

    out = dense_attention(q, k, v, causal=causal, key_mask=km)
    torch.testing.assert_close(out[1:, :, :n], dense_attention(q1, k1, v1, causal=causal))
    for form in ("linear", "exact"):
        out = atp_attention(q, k, v, U, form=form, causal=causal, key_mask=km)
        alone = atp_attention(q1, k1, v1, U1, form=form, causal=causal)
        torch.testing.assert_close(out[1:, :, :n], alone, atol=1e-10, rtol=1e-8)
        # the unpadded first sequence is untouched by the other's padding
        full0 = atp_attention(q[:1], k[:1], v[:1], U[:1], form=form, causal=causal)
        torch.testing.assert_close(out[:1], full0, atol=1e-12, rtol=1e-10)


def test_validation_errors():
    q, k, v = _randn(1, 4, 5, 2), _randn(1, 3, 5, 2), _randn(1, 3, 5, 2)
    U = principal_basis(_randn(1, 5, 3), 2)
    with pytest.raises(ValueError, match="multiple"):
        dense_attention(q, k, v)
    with pytest.raises(ValueError, match="multiple"):
        atp_attention(q, k, v, U)
    k, v = _randn(1, 2, 5, 2), _randn(1, 2, 5, 2)
    with pytest.raises(ValueError, match="basis"):
        atp_attention(q, k, v, U[:, :4])
    with pytest.raises(ValueError, match="form"):
        atp_attention(q, k, v, U, form="softmax")
    with pytest.raises(ValueError, match="key_mask"):
        atp_attention(q, k, v, U, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="lift_principal_map|basis"):
        lift_principal_map(_randn(1, 4, 5, 2), U[:, :4])


@pytest.mark.parametrize("causal", [False, True])
def test_linear_form_never_builds_L_by_L(causal):
    B, H, L, dh, r = 1, 1, 4096, 16, 8
    q, k, v = (_randn(B, H, L, dh, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    U = torch.linalg.qr(_randn(B, L, r, seed=4, dtype=torch.float32)).Q
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = atp_attention(q, k, v, U, causal=causal)
    assert out.shape == (B, H, L, dh) and torch.isfinite(out).all()
    shapes = [s for ev in prof.events() for s in _flat_shapes(ev.input_shapes)]
    assert shapes, "the profiler recorded no shapes"
    for s in shapes:
        assert sum(1 for dim in s if dim == L) < 2, f"an L x L operand {s} was built"
        assert math.prod(s) < L * L // 16, f"an operand {s} is quadratic-sized"


def _flat_shapes(entries):
    """Tensor shapes among a profiler event's inputs (tensor lists come as lists of shapes)."""
    for e in entries:
        if isinstance(e, list | tuple) and e and all(isinstance(i, int) for i in e):
            yield e
        elif isinstance(e, list | tuple):
            yield from _flat_shapes(e)


def test_randomized_falls_back_to_exact_when_nothing_to_save():
    x = _randn(10, 6, seed=12)  # rank + oversampling >= min(L, d)
    assert torch.equal(principal_basis(x, 3, "randomized"), principal_basis(x, 3))


@pytest.mark.parametrize("form", ["linear", "exact"])
def test_low_precision_dtypes_run_in_that_dtype(form):
    B, L, H, dh, r = 1, 16, 2, 8, 4
    x = _randn(B, L, 12, seed=1)
    q, k, v = _qkv_from_x(x, H, H, dh)
    U = principal_basis(x, r)
    ref = atp_attention(q, k, v, U, form=form, causal=True)
    for dtype in (torch.bfloat16, torch.float16):
        out = atp_attention(q.to(dtype), k.to(dtype), v.to(dtype), U.to(dtype), form=form, causal=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)


def test_the_one_rank_parser():
    from atp_viz.core.ranks import describe_window, parse_rank, parse_rank_list

    assert parse_rank("64") == 64 and isinstance(parse_rank("64"), int)
    assert parse_rank("0.5") == 0.5 and parse_rank("1.0") == 1.0 and parse_rank(" l/8 ") == 0.125
    assert parse_rank_list("4,16, 0.25,L/4") == [4, 16, 0.25, 0.25]
    for bad, match in (
        ("0", "at least 1"),
        ("1.5", r"\(0, 1\]"),
        ("L/0", "Cannot read"),
        ("half", "Cannot read"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_rank(bad)
    with pytest.raises(ValueError, match="at least one"):
        parse_rank_list(" , ")
    assert (
        describe_window(512, 4) == "exact window 512 + 4 sinks" and describe_window(64) == "exact window 64"
    )
    assert describe_window(0, 4) == ""  # no window, nothing read exactly
    assert parse_rank("0", check=False) == 0  # a caller with its own range says what is wrong
    # The fractional-rank message quotes no made-up token count (it once said "the 1000000 tokens").
    with pytest.raises(ValueError) as err:
        parse_rank("2.5")
    assert "1000000" not in str(err.value) and "sequence length L" in str(err.value)


def test_randomized_basis_is_deterministic_without_a_generator():
    """The same input gives the same basis whatever the global random state (a figure must not move
    between two runs of the same setting)."""
    x = _randn(300, 40, seed=21, dtype=torch.float32)
    torch.manual_seed(1)
    a = principal_basis(x, 6, "randomized")
    torch.manual_seed(2)
    torch.randn(10)
    assert torch.equal(principal_basis(x, 6, "randomized"), a)


@pytest.mark.parametrize("L", [7, 33, 150])
@pytest.mark.parametrize("r", [2, 8, 9, 30])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_branches_equal_the_explicit_L_by_L_formula(L, r, causal):
    """Both evaluation orders of the linear form, (q K'^T) [V'|s] (r <= 8 here) and q (K'^T [V'|s])
    (r >= 9), and the blockwise causal path, against an explicit (1 + s) L x L matrix on V_r."""
    r = min(r, L)
    dh = 16
    assert linear_form.reassociate(r, dh) == (r >= 9)
    x = _randn(2, L, 40, seed=L + r)
    q, k, v = _qkv_from_x(x, 4, 2, dh, seed=3)
    U = principal_basis(x, r)
    c = dh**-0.5
    Kr, Vr = _proj(U).unsqueeze(1) @ k, _proj(U).unsqueeze(1) @ v  # rebuilt keys and values
    A = 1.0 + c * (q @ _repeat(Kr, 2).mT)  # (B, H, L, L): the first-order weights, explicitly
    if causal:
        A = A.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), 0.0)
    expected = (A @ _repeat(Vr, 2)) / A.sum(-1, keepdim=True)
    out = atp_attention(q, k, v, U, form="linear", causal=causal, chunk_size=5)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("gqa", [True, False])
def test_fused_attention_is_the_dense_reference(monkeypatch, gqa):
    """The streaming step's fused kernel gives the eager reference's numbers, bottom-right causal mask and
    grouped-query included, with torch's enable_gqa and with the repeat fallback of older torch."""
    from atp_viz.core import attention as att

    monkeypatch.setattr(att, "sdpa_has_gqa", lambda: gqa)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(1, 6, 5, 8, generator=gen),
        torch.randn(1, 2, 12, 8, generator=gen),
        torch.randn(1, 2, 12, 8, generator=gen),
    )
    allowed = torch.ones(5, 12, dtype=torch.bool).tril(12 - 5)
    ref = dense_attention(q, k, v, causal=True, scaling=0.3)
    torch.testing.assert_close(
        att.fused_attention(q, k, v, mask=allowed, scaling=0.3), ref, atol=1e-6, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# The centred basis: the mean token first, then the centred input's principal directions
# ------------------------------------------------------------------------------------------------


def _projector(u):
    return u @ u.mT


@pytest.mark.parametrize("method", ["exact", "randomized", "sketch"])
def test_centred_basis_is_the_mean_then_the_centred_principal_directions(method):
    x = _randn(2, 40, 24, seed=3) + 5 * _randn(1, 1, 24, seed=4)  # a large common part, as in real keys
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 31:] = False
    for r in (1, 6, 23):
        u = principal_basis(x, r, method, valid=valid, centre=True)
        assert u.shape == (2, 40, r)
        for b, n in ((0, 40), (1, 31)):
            ub = u[b, :n]
            torch.testing.assert_close(ub.mT @ ub, torch.eye(r, dtype=ub.dtype), atol=1e-10, rtol=0)
            torch.testing.assert_close(ub[:, 0], torch.full((n,), n**-0.5, dtype=ub.dtype))
            assert u[b, n:].abs().max() == 0 if n < 40 else True  # nothing on padding
            if method == "exact" and r > 1:  # the rest: the top r - 1 directions of the centred rows
                xc = x[b, :n] - x[b, :n].mean(0)
                top = torch.linalg.svd(xc, full_matrices=False).U[:, : r - 1]
                torch.testing.assert_close(_projector(ub[:, 1:]), _projector(top), atol=1e-8, rtol=0)


def test_centred_basis_rebuilds_the_mean_and_ignores_a_common_shift():
    x = _randn(30, 16, seed=5)
    shift = 7 * _randn(1, 16, seed=6)
    u = principal_basis(x, 4, centre=True)
    torch.testing.assert_close((_projector(u) @ x).mean(0), x.mean(0))  # the mean token, exactly
    torch.testing.assert_close(_projector(principal_basis(x + shift, 4, centre=True)), _projector(u))
    plain = _projector(principal_basis(x, 4))  # the plain SVD's subspace moves with the shift
    assert (_projector(principal_basis(x + shift, 4)) - plain).abs().max() > 0.1


@pytest.mark.parametrize("spread", [0.0, 1e-6, 1e-2])
def test_centred_basis_stays_orthonormal_when_the_tokens_barely_differ(spread):
    """A repeated token (a RoPE decoder's first layer on 'a a a a'): centring leaves only rounding along the
    mean, which must not come back as a second copy of the mean column."""
    row = 300 * torch.randn(1, 16, generator=_gen(8))
    x = (row.repeat(9, 1) + spread * torch.randn(9, 16, generator=_gen(9))).float()
    for r in (2, 5, 9):
        u = principal_basis(x, r, centre=True).double()
        torch.testing.assert_close(u.mT @ u, torch.eye(r, dtype=u.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_form_on_a_full_rank_centred_basis_equals_dense(causal):
    x = _randn(1, 12, 20, seed=7) + 3
    q, k, v = _qkv_from_x(x, 4, 2, 8)
    u = principal_basis(x, 12, centre=True)
    out = atp_attention(q, k, v, u, form="exact", causal=causal)
    torch.testing.assert_close(out, dense_attention(q, k, v, causal=causal), atol=1e-10, rtol=0)
