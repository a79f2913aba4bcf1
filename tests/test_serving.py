"""Serving: chunked strictly causal perplexity and generation with a compressed KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SENTENCE

from atp_viz import forms
from atp_viz.analysis import protocol, serving
from atp_viz.core.basis import METHODS, basis_path
from atp_viz.text.inputs import tokenize

TEXT = SENTENCE + " " + "The basis is computed from past tokens only, so nothing leaks from the future." * 2


def _ids(loaded, text=TEXT):
    return tokenize(loaded.tokenizer, text, loaded.info.max_tokens).input_ids


def _dense_logits(loaded, ids):
    with torch.inference_mode():
        return loaded.model(input_ids=ids).logits[0]


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-qwen2", "smollm2"])
def test_chunked_dense_and_full_rank_exact_equal_the_model(load, key):
    loaded = load(key)
    ids = _ids(loaded)
    ref = _dense_logits(loaded, ids)
    with torch.inference_mode():
        dense = serving.chunked_logits(loaded, ids, rank=None, chunk=7)
        full = serving.chunked_logits(loaded, ids, rank=10_000, form="exact", chunk=7)
    torch.testing.assert_close(dense, ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(full, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("form", forms.names())
def test_dense_is_the_softmax_whatever_form_is_asked(load, form):
    """rank=None is dense attention for every form (fine-tuning's evaluation scores its dense rows with
    the run's form: with taylor2 it once ran taylor2's kernel over the exact past and called it dense).
    A trained model: a tiny random one's scores are so small that every kernel is close to exp."""
    loaded = load("smollm2")
    ids = _ids(loaded)
    with torch.inference_mode():
        dense = serving.chunked_logits(loaded, ids, rank=None, form=form, chunk=7)
    torch.testing.assert_close(dense, _dense_logits(loaded, ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("form", forms.names())
@pytest.mark.parametrize("basis_from", ["input", "keys"])
@pytest.mark.parametrize("method", METHODS)
def test_no_future_leak_inside_the_current_chunk(load, form, basis_from, method):
    """Changing one token j in the middle of a chunk leaves every logit before j unchanged, those of the
    same chunk included (a non-causal current chunk would fail here), and changes the logit at j. The
    text is long enough (past of 576 tokens, r = 4) that the randomised and sketch bases really run."""
    loaded = load("tiny-llama")
    L, chunk, r = 768, 192, 4
    ids = torch.randint(5, 3000, (1, L), generator=torch.Generator().manual_seed(0))
    d = loaded.info.d_model if basis_from == "input" else loaded.info.n_kv_heads * loaded.info.head_dim
    assert basis_path(3 * chunk, d, r, method) == method  # the method's own path, not its exact fallback
    j = 3 * chunk + 5
    other = ids.clone()
    other[0, j] = 7
    kw = dict(rank=r, form=form, chunk=chunk, basis_from=basis_from, method=method)
    with torch.inference_mode():
        a = serving.chunked_logits(loaded, ids, **kw)
        b = serving.chunked_logits(loaded, other, **kw)
    torch.testing.assert_close(a[:j], b[:j], atol=0, rtol=0)
    assert not torch.allclose(a[j], b[j])


@pytest.mark.parametrize("form", forms.names())
def test_a_centred_basis_reads_no_later_token(load, form):
    """The centred basis takes each chunk's mean from its past alone: changing token j leaves every logit
    before j unchanged, with a window of exact tokens or without."""
    loaded = load("tiny-llama")
    ids = torch.randint(5, 3000, (1, 96), generator=torch.Generator().manual_seed(1))
    j = 3 * 24 + 5
    other = ids.clone()
    other[0, j] = 7
    for keep in (None, serving.ExactKeep(2, 16)):
        kw = dict(rank=4, form=form, chunk=24, basis_from="keys", centre_basis=True, keep=keep)
        with torch.inference_mode():
            a = serving.chunked_logits(loaded, ids, **kw)
            b = serving.chunked_logits(loaded, other, **kw)
        torch.testing.assert_close(a[:j], b[:j], atol=0, rtol=0)
        assert not torch.allclose(a[j], b[j])


def test_dense_scoring_is_the_teacher_forced_model_on_the_scored_positions(load):
    """The protocol's dense scores are the plain model's on positions chunk .. L-2, and a setting equal
    to dense has a paired difference of exactly 0 with the interval [0, 0]."""
    loaded = load("tiny-llama")
    windows = protocol.text_windows(loaded.tokenizer, TEXT * 4, 40)
    dense = protocol.score_decoder(loaded, windows, rank=None, form="exact", chunk=8)
    again = protocol.score_decoder(loaded, windows, rank=10_000, form="exact", chunk=8)  # nothing dropped
    for ids, hits, nll in zip(windows.ids, dense.hits, dense.nll, strict=True):
        logits = _dense_logits(loaded, ids)
        target = ids[0, 9:]
        ref = torch.nn.functional.cross_entropy(logits[8:-1].double(), target, reduction="none")
        np.testing.assert_allclose(nll, ref.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(hits, (logits[8:-1].argmax(-1) == target).numpy())
    row = protocol.decoder_summary(again, windows, dense)
    assert row["n_scored"] == len(windows.ids) * (40 - 8 - 1)
    assert row["top1_minus_reference"] == 0.0 and tuple(row["top1_minus_reference_ci"]) == (0.0, 0.0)
    assert row["top1_ci"][0] <= row["top1"] <= row["top1_ci"][1]


def test_generation_dense_matches_transformers_generate(load):
    loaded = load("smollm2")
    ids = _ids(loaded, "The capital of France is")
    gen = serving.generate(loaded, ids, rank=None, max_new_tokens=8)
    with torch.inference_mode():
        mask = torch.ones_like(ids)
        ref = loaded.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert list(gen.new_ids) == ref[0, ids.shape[1] :].tolist()[: len(gen.new_ids)]
    assert gen.kv_cache_bytes == gen.dense_kv_cache_bytes


def test_generation_compressed_full_rank_exact_equals_dense(load):
    loaded = load("tiny-llama")
    ids = _ids(loaded)
    dense = serving.generate(loaded, ids, rank=None, max_new_tokens=6)
    full = serving.generate(loaded, ids, rank=ids.shape[1], form="exact", max_new_tokens=6)
    assert full.new_ids == dense.new_ids
    low = serving.generate(loaded, ids, rank=4, form="linear", max_new_tokens=6)
    n = len(dense.new_ids) - 1 + ids.shape[1]  # tokens whose keys are cached at the end
    assert dense.kv_cache_bytes == serving.kv_bytes(loaded.info, n, 0, None, "exact")
    assert low.kv_cache_bytes == serving.kv_bytes(
        loaded.info, len(low.new_ids) - 1, ids.shape[1], 4, "linear"
    )
    assert low.kv_cache_bytes < dense.kv_cache_bytes


def test_generation_says_when_the_models_context_ended_it(load):
    import dataclasses

    loaded = load("tiny-llama")
    ids = _ids(loaded)
    L = ids.shape[1]
    short = dataclasses.replace(loaded, info=dataclasses.replace(loaded.info, max_tokens=L + 3))
    for rank in (None, 4):
        gen = serving.generate(short, ids, rank=rank, form="exact", max_new_tokens=6)
        assert len(gen.new_ids) == 3 and gen.stop_reason == "context"
        assert "3 new tokens of the 6 asked" in gen.context_notice
        roomy = serving.generate(loaded, ids, rank=rank, form="exact", max_new_tokens=3)
        assert roomy.stop_reason == "max_new_tokens" and roomy.context_notice is None
        assert roomy.new_ids == gen.new_ids  # the limit ends it, and changes no token before it


def test_agreement_counts_positions_and_finds_the_first_divergence():
    assert serving.agreement((1, 2, 3, 4), (1, 2, 9, 4)) == (0.75, 2)
    assert serving.agreement((1, 2), (1, 2)) == (1.0, None)
    assert serving.agreement((1, 2, 3), (1, 2)) == (1.0, 2)  # one text stopped early


def test_kv_bytes_formulas(load):
    info = load("smollm2").info  # 30 layers, 3 kv heads, dh 64
    per_token = 2 * 3 * 64 * 30 * 4
    assert serving.kv_bytes(info, 100, 0, None, "exact") == 100 * per_token
    linear = serving.kv_bytes(info, 0, 100, 25, "linear")
    assert linear == (2 * 3 * 25 * 64 + 25) * 30 * 4
    assert serving.kv_bytes(info, 0, 100, 25, "exact") == linear + 100 * 25 * 30 * 4


def test_bad_inputs(load):
    loaded = load("tiny-llama")
    ids = _ids(loaded)
    with pytest.raises(ValueError, match="smaller than the text"):
        serving.chunked_logits(loaded, ids, rank=4, chunk=ids.shape[1])
    with pytest.raises(ValueError, match="larger than the prompt"):
        serving.generate(loaded, ids, rank=ids.shape[1] + 1)
    with pytest.raises(ValueError, match="one token"):
        serving.generate(loaded, ids[:, :1], rank=1)
    with pytest.raises(ValueError, match="decoder"):
        serving.chunked_logits(load("tiny-bert"), ids, rank=4, chunk=4)


def test_perplexity_text_is_long_and_deterministic():
    from atp_viz.text import corpus

    text, mods = corpus.perplexity_text()
    assert len(text) >= 60_000 and "collections" in mods
    assert corpus.perplexity_text()[0] == text
