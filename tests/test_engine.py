"""ATP inside real models: full-rank exactness end to end, per-call settings, padding, threads."""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import SENTENCE, TINY

from atp_viz import forms
from atp_viz.analysis import compare
from atp_viz.hf import backend, engine
from atp_viz.hf.engine import ATPConfig
from atp_viz.text.inputs import tokenize

TOL = dict(atol=1e-4, rtol=1e-4)


def _tok(loaded, text=SENTENCE, n=None):
    return tokenize(loaded.tokenizer, text, n or loaded.info.max_tokens)


def _final(run):
    return run.next_logits if run.next_logits is not None else run.embedding


@pytest.mark.parametrize("key", TINY + ("minilm", "smollm2"))
@pytest.mark.parametrize("source", ["input", "keys", "keys, centred"])
def test_exact_form_at_full_rank_equals_dense_end_to_end(load, key, source):
    loaded = load(key)
    tok = _tok(loaded)
    dense = compare.forward(loaded, tok)
    basis = {"basis_source": source.split(",")[0], "centre_basis": source.endswith("centred")}
    run = compare.forward(loaded, tok, ATPConfig(rank=1.0, form="exact", **basis))
    assert run.ranks == (tok.n_tokens,)
    np.testing.assert_allclose(_final(run), _final(dense), **TOL)
    # float32: the centred basis rounds once more (the mean taken out, then the last direction completed);
    # through SmolLM2's 30 layers that reaches 3.3e-4 in one of 9,216 entries of a layer's output
    atol = 5e-4 if basis["centre_basis"] else 2e-4
    for a, d in zip(run.layer_outputs, dense.layer_outputs, strict=True):
        np.testing.assert_allclose(a, d, atol=atol, rtol=1e-4)


def test_a_centred_basis_at_full_rank_is_exact_on_a_repeated_token(load):
    loaded = load("tiny-llama")  # RoPE: the first layer's inputs are identical rows
    ids = torch.full((1, 12), 100)
    tok = dataclasses.replace(
        _tok(loaded), input_ids=ids, attention_mask=torch.ones_like(ids), tokens=("a",) * 12, n_original=12
    )
    dense = compare.forward(loaded, tok)
    run = compare.forward(loaded, tok, ATPConfig(rank=1.0, form="exact", centre_basis=True))
    for a, d in zip(run.layer_outputs, dense.layer_outputs, strict=True):
        np.testing.assert_allclose(a, d, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["tiny-llama", "minilm"])
def test_a_centred_basis_reaches_every_layer(load, key):
    loaded = load(key)
    tok = _tok(loaded)
    runs = {
        c: compare.forward(
            loaded, tok, ATPConfig(rank=0.25, basis_source="keys", centre_basis=c), map_layers=[0]
        )
        for c in (False, True)
    }
    assert not np.allclose(_final(runs[True]), _final(runs[False]), atol=1e-4)
    basis = runs[True].maps[0]["basis"]  # (L, r): the mean direction first
    np.testing.assert_allclose(basis[:, 0], np.full(tok.n_tokens, tok.n_tokens**-0.5), atol=1e-6)


def test_an_atp_run_reports_progress_layer_by_layer(load):
    loaded = load("tiny-llama")
    seen = []
    compare.forward(loaded, _tok(loaded), ATPConfig(rank=0.5), progress=lambda f, m: seen.append((f, m)))
    assert seen == [(0.5, "layer 1 of 2"), (1.0, "layer 2 of 2")]


@pytest.mark.parametrize("key", ["tiny-bert", "tiny-qwen2", "minilm"])
def test_lowrank_linear_layers_at_full_rank_equal_dense(load, key):
    loaded = load(key)
    tok = _tok(loaded)
    dense = compare.forward(loaded, tok)
    run = compare.forward(loaded, tok, ATPConfig(rank=1.0, form="exact", lowrank_linear=True))
    np.testing.assert_allclose(_final(run), _final(dense), **TOL)


def test_lowrank_linear_layers_change_output_below_full_rank(load):
    loaded = load("minilm")
    tok = _tok(loaded)
    plain = compare.forward(loaded, tok, ATPConfig(rank=0.25, form="exact"))
    lowrank = compare.forward(loaded, tok, ATPConfig(rank=0.25, form="exact", lowrank_linear=True))
    assert not np.allclose(plain.embedding, lowrank.embedding, atol=1e-3)


def test_linear_form_at_full_rank_is_the_linearised_model(load):
    """At r = L the linear form is exactly first-order attention on the full keys, in every layer."""
    from atp_viz.core.attention import linearised_dense_attention

    loaded = load("tiny-llama")
    tok = _tok(loaded)
    run = compare.forward(loaded, tok, ATPConfig(rank=1.0, form="linear"))

    def linearised(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        out = linearised_dense_attention(q, k, v, causal=True, scaling=scaling)
        return out.transpose(1, 2), None

    # Reference: the same model with every attention replaced by the explicit linearised formula.
    from transformers import AttentionInterface

    AttentionInterface.register("test_linearised", linearised)
    try:
        loaded.model.set_attn_implementation("test_linearised")
        with torch.inference_mode():
            ref = loaded.model(input_ids=tok.input_ids, logits_to_keep=1).logits[0, -1].numpy()
    finally:
        loaded.model.set_attn_implementation(backend.NAME)
    np.testing.assert_allclose(run.next_logits, ref, atol=1e-3, rtol=1e-3)


def test_layers_subset_leaves_other_layers_dense(load):
    loaded = load("tiny-llama")
    tok = _tok(loaded)
    dense = compare.forward(loaded, tok)
    run = compare.forward(loaded, tok, ATPConfig(rank=2, form="exact", layers=(1,)))
    np.testing.assert_allclose(run.layer_outputs[0], dense.layer_outputs[0], atol=1e-6)
    assert not np.allclose(run.layer_outputs[1], dense.layer_outputs[1], atol=1e-3)


@pytest.mark.parametrize("key", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("form", forms.names())
@pytest.mark.parametrize("rank", [0.5, 3])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_unbatched(load, key, form, rank, side):
    """A batch padded on either side gives each sequence what it gives alone (positions passed
    explicitly, so left padding does not shift them)."""
    loaded = load(key)
    texts = [SENTENCE, "Short text here."]
    cfg = ATPConfig(rank=rank, form=form, lowrank_linear=(form == "exact"))
    tokenizer = copy.copy(loaded.tokenizer)
    tokenizer.padding_side = side
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 0} if loaded.info.is_decoder else {}
    with torch.inference_mode():
        plan = engine.make_plan(cfg, loaded.info.n_layers)
        with backend.activate(loaded.model, atp=plan, key_mask=mask):
            out = loaded.model(**batch, position_ids=positions, **kwargs)
        for b, text in enumerate(texts):
            tok = _tok(loaded, text)
            n = tok.n_tokens
            single_plan = engine.make_plan(cfg, loaded.info.n_layers)
            with backend.activate(loaded.model, atp=single_plan, key_mask=tok.attention_mask):
                ref = loaded.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, **kwargs)
            rows = slice(0, n) if side == "right" else slice(mask.shape[1] - n, None)
            got = out.logits[b, rows] if loaded.info.is_decoder else out.last_hidden_state[b, rows]
            want = ref.logits[0] if loaded.info.is_decoder else ref.last_hidden_state[0]
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-4, rtol=1e-4)
            assert plan.ranks[b] == single_plan.ranks[0]


def test_two_threads_with_different_ranks_get_their_own_results(load):
    """Two app sessions share one model object; each call's settings stay its own."""
    loaded = load("minilm")
    tok = _tok(loaded)
    cfgs = {"low": ATPConfig(rank=2, form="exact"), "full": ATPConfig(rank=1.0, form="exact")}
    expected = {name: compare.forward(loaded, tok, cfg).embedding for name, cfg in cfgs.items()}
    dense = compare.forward(loaded, tok).embedding
    results: dict[str, list] = {"low": [], "full": [], "dense": []}
    barrier = threading.Barrier(3)

    def work(name):
        barrier.wait()
        for _ in range(6):
            cfg = cfgs.get(name)
            results[name].append(compare.forward(loaded, tok, cfg).embedding)

    threads = [threading.Thread(target=work, args=(n,)) for n in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for emb in results["low"]:
        np.testing.assert_allclose(emb, expected["low"], atol=1e-5)
    for emb in results["full"]:
        np.testing.assert_allclose(emb, expected["full"], atol=1e-5)
    for emb in results["dense"]:
        np.testing.assert_allclose(emb, dense, atol=1e-5)
    assert not np.allclose(expected["low"], dense, atol=1e-3)


def test_rank_clamping_and_errors(load):
    loaded = load("tiny-bert")
    tok = _tok(loaded)
    run = compare.forward(loaded, tok, ATPConfig(rank=10_000, form="exact"))
    assert run.ranks == (tok.n_tokens,)
    assert any("exceeds the sequence length" in n for n in run.notices)
    for bad in (0, -3, 0.0, 1.5):
        with pytest.raises(ValueError):
            ATPConfig(rank=bad)
    with pytest.raises(TypeError):
        ATPConfig(rank=True)
    with pytest.raises(ValueError, match="do not exist"):
        compare.forward(loaded, tok, ATPConfig(rank=2, layers=(7,)))
    with pytest.raises(ValueError):
        ATPConfig(form="softmax")


def test_single_token_sequence(load):
    loaded = load("tiny-llama")
    tok = _tok(loaded)
    one = type(tok)(tok.input_ids[:, :1], tok.attention_mask[:, :1], tok.tokens[:1], 1, tok.max_tokens)
    dense = compare.forward(loaded, one)
    for form in ("exact", "linear"):
        run = compare.forward(loaded, one, ATPConfig(rank=1, form=form))
        assert run.ranks == (1,)
        # One token: the basis spans it, and first-order attention over one key is exact too.
        np.testing.assert_allclose(run.next_logits, dense.next_logits, atol=1e-4)


def test_comparison_metrics_and_maps(load):
    loaded = load("tiny-llama")
    tok = _tok(loaded)
    dense = compare.forward(loaded, tok)
    from atp_viz.analysis.capture import capture

    cap = capture(loaded, SENTENCE, attentions="all")
    for form in ("exact", "linear"):
        run = compare.forward(loaded, tok, ATPConfig(rank=4, form=form), map_layers=[1])
        c = compare.compare(dense, run)
        assert c.rank == 4 and c.kl >= 0 and len(c.top_dense) == len(c.top_atp) == 10
        assert c.layer_rel_error.shape == (2,)
        # Decoder: errors only at the last token (earlier positions read later tokens via the basis).
        assert c.errors_at == "last token"
        want = compare.relative_error(run.layer_outputs[1][-1:], dense.layer_outputs[1][-1:])
        assert c.layer_rel_error[1] == pytest.approx(want)
        maps = compare.attention_maps(cap.layers[1].attn, run, layer=1, head=3)
        L = tok.n_tokens
        assert maps.dense.shape == maps.lifted.shape == (L, L) and maps.principal.shape == (L, 4)
        np.testing.assert_allclose(maps.dense, cap.layers[1].attn[3])
        # The lifted map and the principal map describe the same output: P V' = A_lift V.
        u = run.maps[1]["basis"]
        np.testing.assert_allclose(
            maps.principal @ u.T, maps.lifted if form == "linear" else maps.lifted @ u @ u.T, atol=1e-5
        )


def test_full_rank_comparison_reports_no_error(load):
    loaded = load("minilm")
    tok = _tok(loaded)
    c = compare.compare(compare.forward(loaded, tok), compare.forward(loaded, tok, ATPConfig(rank=1.0)))
    assert c.embedding_cosine == pytest.approx(1.0, abs=1e-5)
    assert c.final_rel_error < 1e-4
    assert c.errors_at == "all tokens"


def test_kl_and_downsample():
    logits = np.array([1.0, 2.0, 3.0])
    assert compare.kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert compare.kl_divergence(logits, logits[::-1]) > 0
    m = np.arange(600 * 600, dtype=float).reshape(600, 600)
    small, f = compare.downsample(m, 256)
    assert f == 3 and small.shape == (200, 200)
    assert small[0, 0] == pytest.approx(m[:3, :3].mean())
    same, f1 = compare.downsample(m[:100, :100], 256)
    assert f1 == 1 and same.shape == (100, 100)


def test_continuation_and_sweep(load):
    loaded = load("tiny-llama")
    tok = _tok(loaded)
    cont = compare.continuation(loaded, tok, ATPConfig(rank=1.0, form="exact"), n_new=4)
    assert cont.dense_ids == cont.atp_ids and cont.first_divergence is None
    dense = compare.forward(loaded, tok)
    ranks = compare.sweep_ranks(tok.n_tokens, 5)
    assert ranks[-1] == tok.n_tokens and tok.n_tokens // 2 in ranks
    sw = compare.error_sweep(loaded, tok, dense, ATPConfig(), ranks)
    assert list(sw.errors) == list(forms.names())  # every registered form
    assert all(e.shape == (len(ranks),) for e in sw.errors.values())
    assert sw.errors["exact"][-1] == pytest.approx(0.0, abs=1e-6)  # full rank: the exact form is dense
    # The sweep's entries are the errors of single runs at those settings.
    run = compare.forward(loaded, tok, ATPConfig(rank=int(ranks[1]), form="linear"))
    assert sw.errors["linear"][1] == pytest.approx(compare.kl_divergence(dense.next_logits, run.next_logits))


@pytest.mark.parametrize("key", ["tiny-bert", "tiny-llama"])
def test_recording_maps_never_changes_the_numbers(load, key):
    """The explorer records one layer's maps, the command line none: the same setting must give the
    same figures to the last bit (the linear form once moved in the second decimal between them)."""
    loaded = load(key)
    tok = _tok(loaded)
    for form in forms.names():
        cfg = ATPConfig(rank=0.5, form=form)
        plain = compare.forward(loaded, tok, cfg)
        mapped = compare.forward(loaded, tok, cfg, map_layers=[0, 1])
        assert mapped.maps and not plain.maps
        for a, b in zip(plain.layer_outputs, mapped.layer_outputs, strict=True):
            assert np.array_equal(a, b), form


def test_dense_sdpa_pass_uses_the_causal_kernel_only_for_a_pure_causal_mask(load, monkeypatch):
    """A decoder's dense pass hands a mask that is exactly the causal triangle to SDPA as is_causal (the
    tensor mask made torch's CPU kernel compute the whole square); its logits equal the eager reference.
    A padded batch keeps its mask."""
    loaded = load("tiny-llama")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal"), kwargs.get("attn_mask") is None))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(5, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = loaded.model(input_ids=ids).logits  # no backend block: the eager reference
        assert not calls
        with backend.activate(loaded.model):
            fused = loaded.model(input_ids=ids).logits
        assert calls and all(c == (True, True) for c in calls)
        torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
        calls.clear()
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, :5] = 0  # left padding: not a pure causal triangle
        with backend.activate(loaded.model, key_mask=mask.bool()):
            loaded.model(input_ids=ids.repeat(2, 1), attention_mask=mask)
        assert calls and all(c == (False, False) for c in calls)
    m = torch.zeros(1, 1, 4, 4)
    m[..., torch.ones(4, 4, dtype=torch.bool).triu(1)] = torch.finfo(torch.float32).min
    assert backend.only_causal(m)
    m[..., 3, 0] = torch.finfo(torch.float32).min  # one more blocked key in the last row
    assert not backend.only_causal(m)
