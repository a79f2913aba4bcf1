"""Serving: chunked strictly causal perplexity and generation with a compressed KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCE

from atp_viz.analysis import serving
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


@pytest.mark.parametrize("form", ["exact", "linear"])
@pytest.mark.parametrize("basis_from", ["input", "keys"])
def test_no_future_leak(load, form, basis_from):
    """Perturbing tokens after position i leaves the logits at positions <= i unchanged."""
    loaded = load("tiny-llama")
    ids = _ids(loaded)
    L = ids.shape[1]
    i = L // 2 + 3  # inside a chunk, so both the compressed past and the current chunk are involved
    other = ids.clone()
    other[0, i + 1 :] = torch.randint(1000, 2000, (L - i - 1,))
    with torch.inference_mode():
        a = serving.chunked_logits(loaded, ids, rank=3, form=form, chunk=6, basis_from=basis_from)
        b = serving.chunked_logits(loaded, other, rank=3, form=form, chunk=6, basis_from=basis_from)
    torch.testing.assert_close(a[: i + 1], b[: i + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[i + 2 :], b[i + 2 :], atol=1e-3)  # later positions do change


def test_perplexity_low_rank_differs_and_reports(load):
    loaded = load("tiny-llama")
    ids = _ids(loaded)
    dense = serving.perplexity(loaded, ids, rank=None, chunk=8)
    low = serving.perplexity(loaded, ids, rank=2, form="exact", chunk=8)
    assert dense.perplexity > 1 and low.perplexity > 1
    assert dense.nll != pytest.approx(low.nll)
    assert 0 <= low.top1 <= 1
    # Dense chunked perplexity equals the plain teacher-forced one (legitimate for dense attention).
    logits = _dense_logits(loaded, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[0, 1:]).item()
    assert dense.nll == pytest.approx(nll, rel=1e-4)


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
    assert low.kv_cache_bytes < dense.kv_cache_bytes
    share, first = serving.agreement(dense.new_ids, low.new_ids)
    assert 0 <= share <= 1 and (first is None or 0 <= first <= len(dense.new_ids))


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
