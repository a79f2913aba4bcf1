"""The checks every registered attention form must pass (``atp_viz.forms``), run over ``forms.names()``.

A new form gets them by being registered: shapes, grouped-query attention without repeating K/V,
padding, no causal leak in the streaming step, sign invariance of the basis (or its absence, when the
form says so), full-rank behaviour where the form defines one, the explicit L x L weights as the
reference of the fast paths (and positivity where claimed), finite gradients, and a cost count of the
order the form declares. Float64 on small seeded tensors.
"""

from __future__ import annotations

import pytest
import torch

from atp_viz import forms
from atp_viz.core import attention as att
from atp_viz.core import costs
from atp_viz.core.basis import principal_basis

NAMES = forms.names()
B, H, HKV, L, DH, D = 2, 6, 2, 11, 4, 9


def _randn(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(seed=0, scale=0.5, L=L):
    """x [B, L, D] and q, k, v as projections of x (like a layer), q [B, H, L, DH], k/v [B, HKV, L, DH]."""
    x = _randn(B, L, D, seed=seed)
    w = [_randn(D, n * DH, seed=seed + 1 + i, scale=scale / D**0.5) for i, n in enumerate((H, HKV, HKV))]
    q, k, v = ((x @ wi).reshape(B, L, -1, DH).transpose(1, 2) for wi in w)
    return x, q, k, v


def _vr(U, v):
    return U.unsqueeze(1) @ (U.mT.unsqueeze(1) @ v)  # V_r = U_r U_r^T V


def _apply(weights, vr):
    """weights [B, H, L, L] @ V_r per query head (grouped)."""
    G = weights.shape[1] // vr.shape[1]
    return att.ungrouped(att.grouped(weights, vr.shape[1], G) @ vr.unsqueeze(2))


def test_registry_lists_the_builtin_forms_with_their_metadata():
    assert {"exact", "linear"} <= set(NAMES)
    assert NAMES[0] == forms.DEFAULT
    for name in NAMES:
        f = forms.get(name)
        assert f.name == name
        assert f.cost_order in ("L^2", "L r", "L r^2", "L d_h^2")
        assert f.display_name and f.latex and f.latex_causal
        assert f.description and "\n" not in f.description
        assert f.map_kind in ("principal", "tokens")
    with pytest.raises(ValueError, match="registered"):
        forms.get("softmax-of-nothing")
    with pytest.raises(ValueError, match="already registered"):
        forms.register(type(forms.get("exact"))())  # a second object under a taken name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_and_maps(name, causal):
    x, q, k, v = _inputs()
    U = principal_basis(x, 4)
    f = forms.get(name)
    out = f.attend(q, k, v, U, causal=causal)
    assert out.shape == (B, H, L, DH) and out.dtype == torch.float64 and torch.isfinite(out).all()
    out2, maps = f.attend(q, k, v, U, causal=causal, return_maps=True)
    assert torch.equal(out2, out)  # recording maps never changes the output (app and CLI agree)
    assert f.map_kind in maps
    assert maps[f.map_kind].shape == ((B, H, L, 4) if f.map_kind == "principal" else (B, H, L, L))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_the_reference_of_the_fast_paths(name, causal):
    """attend == token_weights @ V_r, rows of the weights sum to 1; positive forms have positive weights
    even for large scores (where 1 + s goes negative)."""
    f = forms.get(name)
    for scale in (0.5, 8.0):
        x, q, k, v = _inputs(seed=3, scale=scale)
        U = principal_basis(x, 5)
        W = f.token_weights(q, k, v, U, causal=causal)
        torch.testing.assert_close(
            f.attend(q, k, v, U, causal=causal), _apply(W, _vr(U, v)), atol=1e-8, rtol=1e-8
        )
        if f.normalised:
            torch.testing.assert_close(W.sum(-1), torch.ones(B, H, L, dtype=W.dtype), atol=1e-8, rtol=0)
        if causal:
            assert (W.triu(1) == 0).all()
        if f.positive:
            allowed = (
                torch.ones(L, L, dtype=torch.bool).tril() if causal else torch.ones(L, L, dtype=torch.bool)
            )
            assert (W[..., allowed] > 0).all()
        rows = f.token_weights(q, k, v, U, causal=causal, rows=(3, 8))
        torch.testing.assert_close(rows, W[:, :, 3:8], atol=1e-12, rtol=0)


@pytest.mark.parametrize("reassociated", [True, False])
@pytest.mark.parametrize(("n", "r"), [(1, 1), (7, 2), (11, 5), (23, 11)])
def test_both_linear_associations_equal_the_explicit_weights(monkeypatch, reassociated, n, r):
    """The non-causal linear form is evaluated as q (K'^T V') or (q K'^T) V', whichever is cheaper; both
    equal the explicit L x L weights (1 + s) / sum (1 + s) applied to V_r, at several L and r."""
    from atp_viz.forms import linear

    monkeypatch.setattr(linear, "reassociate", lambda r_, dh_: reassociated)
    f = forms.get("linear")
    x, q, k, v = _inputs(seed=5, L=n)
    U = principal_basis(x, r)
    W = f.token_weights(q, k, v, U, causal=False)
    torch.testing.assert_close(f.attend(q, k, v, U, causal=False), _apply(W, _vr(U, v)), atol=1e-9, rtol=1e-9)


def test_the_linear_form_is_not_positive_at_pretrained_scales():
    """What `positive = False` means: with scores in the tens, 1 + s has negative weights."""
    x, q, k, v = _inputs(seed=3, scale=8.0)
    W = forms.get("linear").token_weights(q, k, v, principal_basis(x, 5))
    assert (W < 0).any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_equals_repeated_kv_without_repeating(name, causal, monkeypatch):
    x, q, k, v = _inputs(seed=5)
    U = principal_basis(x, 4)
    f = forms.get(name)
    G = H // HKV
    repeated = f.attend(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), U, causal=causal)

    def refuse(*args, **kwargs):
        raise AssertionError("K/V were repeated")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    torch.testing.assert_close(f.attend(q, k, v, U, causal=causal), repeated, atol=1e-10, rtol=0)
    past = forms.compress(U[0, :6], k[0, :, :6], v[0, :, :6])
    f.stream(q[0, :, 6:], k[0, :, 6:], v[0, :, 6:], past, scaling=DH**-0.5)  # no repeat either


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_gives_what_the_sequence_gives_alone(name, causal, side):
    """A batch with one sequence padded equals that sequence run alone (its own basis, its own length)."""
    x, q, k, v = _inputs(seed=7)
    n = 7
    keep = slice(0, n) if side == "right" else slice(L - n, L)
    valid = torch.zeros(B, L, dtype=torch.bool)
    valid[0] = True
    valid[1, keep] = True
    garbage = x.clone()
    garbage[1, ~valid[1]] = 1e3  # padding must not matter
    U = principal_basis(garbage, 4, valid=valid).clone()
    pad = ~valid[1]
    U[1, pad] = 5.0  # rows of the basis at padding: ignored
    k, v = k.clone(), v.clone()
    k[1][:, pad], v[1][:, pad] = 1e3, -1e3  # keys and values at padding: ignored
    f = forms.get(name)
    out = f.attend(q, k, v, U, causal=causal, key_mask=valid)
    alone = f.attend(
        q[1:, :, keep], k[1:, :, keep], v[1:, :, keep], principal_basis(x[1:, keep], 4), causal=causal
    )
    torch.testing.assert_close(out[1:, :, keep], alone, atol=1e-9, rtol=1e-9)
    first = f.attend(q[:1], k[:1], v[:1], principal_basis(x[:1], 4), causal=causal)
    torch.testing.assert_close(out[:1], first, atol=1e-9, rtol=1e-9)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_invariant_to_the_signs_of_basis_vectors_when_the_form_says_so(name, causal):
    x, q, k, v = _inputs(seed=9, scale=2.0)
    U = principal_basis(x, 5)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    f = forms.get(name)
    a, b = f.attend(q, k, v, U, causal=causal), f.attend(q, k, v, U * flip, causal=causal)
    if f.sign_invariant:
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    else:
        assert not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_full_rank_behaviour(name, causal):
    """At r = L (the basis spans every token) the form is what it declares (dense, first-order, ...)."""
    x, q, k, v = _inputs(seed=11)
    xl = _randn(B, L, L + 3, seed=12)  # wide: rank L
    U = principal_basis(xl, L)
    f = forms.get(name)
    ref = f.full_rank_reference(q, k, v, causal=causal)
    if ref is None:
        pytest.skip(f"{name} has no full-rank identity ({f.full_rank})")
    torch.testing.assert_close(f.attend(q, k, v, U, causal=causal), ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_stream_sees_no_later_token(name):
    """The streaming step (current chunk against a compressed past and exact tail): changing chunk token j
    changes no output at i < j, and the past changes them all."""
    x, q, k, v = _inputs(seed=13)
    f = forms.get(name)
    past = forms.compress(principal_basis(x[0, :5], 3), k[0, :, :5], v[0, :, :5])
    qc, kc, vc = q[0, :, 5:], k[0, :, 5:], v[0, :, 5:]  # a tail of 2 exact tokens, then a chunk of 4
    base = f.stream(qc[:, 2:], kc, vc, past, scaling=DH**-0.5)
    for j in range(2, 6):
        k2, v2, q2 = kc.clone(), vc.clone(), qc.clone()
        k2[:, j] += 3.0
        v2[:, j] -= 2.0
        q2[:, j] *= -1.5
        out = f.stream(q2[:, 2:], k2, v2, past, scaling=DH**-0.5)
        i = j - 2  # row of token j in the chunk
        torch.testing.assert_close(out[:, :i], base[:, :i], atol=0, rtol=0)
        assert not torch.allclose(out[:, i], base[:, i])
    other = forms.compress(principal_basis(x[1, :5], 3), k[1, :, :5], v[1, :, :5])
    assert not torch.allclose(f.stream(qc[:, 2:], kc, vc, other, scaling=DH**-0.5)[:, 0], base[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_stream_with_a_full_rank_past_is_the_causal_full_rank_form(name):
    """A past compressed at r = n (nothing dropped) and no past at all both give the form's causal full-rank
    reference over past + chunk, on the chunk's rows."""
    _, q, k, v = _inputs(seed=17)
    f = forms.get(name)
    c = DH**-0.5
    ref = f.full_rank_reference(q[:1], k[:1], v[:1], causal=True)
    if ref is None:
        pytest.skip(f"{name} has no full-rank identity")
    ref = ref[0]  # (H, L, DH)
    n = 6
    u = principal_basis(_randn(n, n + 2, seed=18), n)  # orthonormal n x n
    past = forms.compress(u, k[0, :, :n], v[0, :, :n])
    out = f.stream(q[0, :, n:], k[0, :, n:], v[0, :, n:], past, scaling=c)
    torch.testing.assert_close(out, ref[:, n:], atol=1e-8, rtol=1e-8)
    whole = f.stream(q[0], k[0], v[0], None, scaling=c)
    torch.testing.assert_close(whole, ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_finite_gradients(name, causal):
    x, q, k, v = _inputs(seed=19)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    U = principal_basis(x, 4)
    forms.get(name).attend(q, k, v, U, causal=causal).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_cost_count_has_the_declared_order(name):
    f = forms.get(name)
    geom = costs.Geometry(n_heads=9, n_kv_heads=3, head_dim=64, d_model=576)
    r = 64
    a, b = f.attention_cost(4096, r, geom).macs, f.attention_cost(8192, r, geom).macs
    growth = b / a  # doubling L at a fixed r: x2 for L r (and L r^2), x4 for L^2
    assert (3.5 < growth < 4.5) if f.cost_order == "L^2" else (1.9 < growth < 2.1)
    total = f.cost(4096, r, geom, "randomized")
    assert total.basis_macs > 0 and total.macs == pytest.approx(total.attention_macs + total.basis_macs)
    assert f.cache_floats(100, 10, 3, 64) > 0


@pytest.mark.parametrize("name", [n for n in NAMES if forms.get(n).param_defaults])
@pytest.mark.parametrize("causal", [False, True])
def test_learnable_parameters_reach_every_path(name, causal):
    """With trained (non-default) per-head parameters, the fast paths still equal the explicit weights,
    the streaming step still equals the full-rank form, and the parameters change the output."""
    f = forms.get(name)
    x, q, k, v = _inputs(seed=23, scale=2.0)
    U = principal_basis(x, 5)
    gen = torch.Generator().manual_seed(3)
    params = {n: torch.rand(H, generator=gen, dtype=torch.float64) + 0.5 for n in f.param_defaults}
    out = f.attend(q, k, v, U, causal=causal, params=params)
    W = f.token_weights(q, k, v, U, causal=causal, params=params)
    torch.testing.assert_close(out, _apply(W, _vr(U, v)), atol=1e-8, rtol=1e-8)
    assert not torch.allclose(out, f.attend(q, k, v, U, causal=causal))
    ref = f.full_rank_reference(q[:1], k[:1], v[:1], causal=True, params=params)
    if causal and ref is not None:
        ref = ref[0]
        n = 6
        past = forms.compress(principal_basis(_randn(n, n + 2, seed=24), n), k[0, :, :n], v[0, :, :n])
        got = f.stream(q[0, :, n:], k[0, :, n:], v[0, :, n:], past, scaling=DH**-0.5, params=params)
        torch.testing.assert_close(got, ref[:, n:], atol=1e-8, rtol=1e-8)
    with pytest.raises(ValueError, match="shape"):
        f.attend(q, k, v, U, params={next(iter(f.param_defaults)): torch.ones(H + 1, dtype=torch.float64)})


@pytest.mark.parametrize("causal", [False, True])
def test_taylor2_closed_form_equals_its_explicit_weights(causal, monkeypatch):
    """The second-order form picks the closed form (long texts) or the explicit L x L weights (short
    ones) by cost; both give the same numbers, across causal blocks and with padding."""
    from atp_viz.forms import taylor2

    assert taylor2.closed_form(8192, 32, 64) and not taylor2.closed_form(128, 64, 32)
    f = forms.get("taylor2")
    Lx = taylor2.BLOCK + 22  # two causal blocks
    x, q, k, v = _inputs(seed=31, scale=2.0, L=Lx)
    U = principal_basis(x, 6)
    km = torch.ones(B, Lx, dtype=torch.bool)
    km[1, :9] = False  # left padding in the second sequence
    gen = torch.Generator().manual_seed(5)
    params = {n: torch.rand(H, generator=gen, dtype=torch.float64) + 0.5 for n in f.param_defaults}
    outs = []
    for closed in (True, False):
        monkeypatch.setattr(taylor2, "closed_form", lambda L, r, dh, closed=closed: closed)
        outs.append(f.attend(q, k, v, U, causal=causal, key_mask=km, params=params))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_cost_counts_are_what_the_implementation_multiplies(name):
    """The cost model (the Cost page, the bench's ceilings) counts the matrix products each path runs:
    torch's FLOP counter over ``attend`` and ``stream`` agrees with ``attention_cost`` / ``stream_cost``
    to within 6% (elementwise work is not counted by either). torch's fused CPU attention kernel is not
    seen by the counter, so attention runs through its math path here (the same products)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    Hq, Hk, dh, d, Lx, r, C = 6, 2, 16, 48, 300, 24, 32
    geom = costs.Geometry(n_heads=Hq, n_kv_heads=Hk, head_dim=dh, d_model=d)
    f = forms.get(name)
    q, k, v = (_randn(1, h, Lx, dh, seed=40 + i) for i, h in enumerate((Hq, Hk, Hk)))
    U = principal_basis(_randn(1, Lx, d, seed=44), r)
    with FlopCounterMode(display=False) as counter:
        f.attend(q, k, v, U)
    assert counter.get_total_flops() / 2 == pytest.approx(f.attention_cost(Lx, r, geom).macs, rel=0.06)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        past = forms.compress(U[0], k[0], v[0])
        f.stream(q[0, :, :C], k[0, :, :C], v[0, :, :C], past, scaling=dh**-0.5)
    assert counter.get_total_flops() / 2 == pytest.approx(f.stream_cost(C, Lx, r, geom), rel=0.06)


@pytest.mark.parametrize("causal", [False, True])
def test_denominators_of_the_kernel_forms(causal):
    """The linear form's normaliser is n_i + c q_i . sum_j k_r,j (it crosses zero at pretrained scales);
    the second-order form's is at least n_i / 2 (n_i: the keys query i may read)."""
    x, q, k, v = _inputs(seed=5, scale=8.0)
    U = principal_basis(x, 5)
    n = torch.arange(1, L + 1, dtype=q.dtype) if causal else torch.full((L,), float(L), dtype=q.dtype)
    lin = forms.get("linear").denominators(q, k, U, causal=causal)
    Kr = U.unsqueeze(1) @ (U.mT.unsqueeze(1) @ k)
    sums = Kr.cumsum(dim=2) if causal else Kr.sum(dim=2, keepdim=True).expand_as(Kr)
    ref = n + DH**-0.5 * (att.grouped(q, HKV, H // HKV) * sums.unsqueeze(2)).sum(-1).reshape(B, H, L)
    torch.testing.assert_close(lin, ref, atol=1e-9, rtol=1e-9)
    assert (lin <= 0).any()  # large scores: 1 + s is not positive
    t2 = forms.get("taylor2").denominators(q, k, U, causal=causal)
    assert (t2 >= n / 2).all()
    with pytest.raises(ValueError, match="kernel"):
        forms.get("pksoftmax").denominators(q, k, U)


def test_diagnostic_exact_variants_rebuild_only_their_input():
    """The two unregistered variants of the exact form (the README's projection split) keep one input
    exact: with keys exact, a basis spanning the values gives dense attention whatever it does to the
    keys, and the other way round. The app never lists them."""
    from atp_viz.core import attention as att
    from atp_viz.forms.exact import DIAGNOSTIC_VARIANTS

    keys_only, values_only = DIAGNOSTIC_VARIANTS
    assert not {keys_only.name, values_only.name} & set(forms.names())
    with forms.registered(*DIAGNOSTIC_VARIANTS):  # a measurement's own block only
        assert forms.get(keys_only.name) is keys_only
    assert not {keys_only.name, values_only.name} & set(forms.names())
    g = torch.Generator().manual_seed(0)
    L, r = 10, 4
    U = torch.linalg.qr(torch.randn(1, L, r, generator=g, dtype=torch.float64))[0]
    q = torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64)
    inside = U.unsqueeze(1) @ torch.randn(1, 2, r, 8, generator=g, dtype=torch.float64)  # in span(U)
    outside = torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64)
    dense = att.dense_attention(q, outside, inside, scaling=0.3)
    torch.testing.assert_close(values_only.attend(q, outside, inside, U, scaling=0.3), dense)
    dense = att.dense_attention(q, inside, outside, scaling=0.3)
    torch.testing.assert_close(keys_only.attend(q, inside, outside, U, scaling=0.3), dense)
    assert not torch.allclose(forms.get("exact").attend(q, inside, outside, U, scaling=0.3), dense)
