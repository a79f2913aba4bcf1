"""Capture must match transformers' own outputs (output_attentions / output_hidden_states)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import BUNDLED, SENTENCE, TINY

from atp_viz.analysis.capture import capture
from atp_viz.hf import backend
from atp_viz.text.inputs import tokenize


def _reference(loaded, text):
    """An independent eager copy of the model, run the way transformers documents it."""
    ref = copy.deepcopy(loaded.model)
    ref.set_attn_implementation("eager")
    tok = tokenize(loaded.tokenizer, text, loaded.info.max_tokens)
    with torch.inference_mode():
        out = ref(
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            output_attentions=True,
            output_hidden_states=True,
        )
    return ref, out


def _attention_input(ref, info, hidden, i):
    """X of layer i written out per family: BERT feeds the layer input, Llama/Qwen2 its input norm,
    GPT-2 its ln_1."""
    if info.model_type == "bert":
        return hidden
    if info.model_type == "gpt2":
        return ref.transformer.h[i].ln_1(hidden)
    return ref.model.layers[i].input_layernorm(hidden)


def _final_norm(ref, info):
    return ref.transformer.ln_f if info.model_type == "gpt2" else ref.model.norm


def _values(attn_mod, x, info):
    """V = the value projection of X (GPT-2: the last third of the fused c_attn)."""
    if info.model_type == "gpt2":
        return attn_mod.c_attn(x).split(info.d_model, dim=-1)[2]
    return (getattr(attn_mod, "v_proj", None) or attn_mod.value)(x)


@pytest.mark.parametrize("key", TINY + BUNDLED)
def test_capture_matches_transformers(load, key):
    if key in BUNDLED:
        pytest.importorskip("safetensors")
    loaded = load(key)
    info = loaded.info
    cap = capture(loaded, SENTENCE, attentions="all")
    ref, out = _reference(loaded, SENTENCE)
    L = cap.n_tokens
    assert len(cap.layers) == info.n_layers == len(out.attentions)
    tol = dict(atol=2e-4, rtol=1e-4)
    with torch.inference_mode():
        for i, layer in enumerate(cap.layers):
            assert layer.x.shape == (L, info.d_model)
            assert layer.q.shape == (info.n_heads, L, info.head_dim)
            assert layer.k.shape == layer.v.shape == (info.n_kv_heads, L, info.head_dim)
            np.testing.assert_allclose(layer.resid, out.hidden_states[i][0].numpy(), **tol)
            x_ref = _attention_input(ref, info, out.hidden_states[i], i)[0]
            np.testing.assert_allclose(layer.x, x_ref.numpy(), **tol)
            # The block output is transformers' next hidden state (for the last decoder layer,
            # transformers reports the final norm's output instead, so compare before the norm).
            if info.is_decoder and i == info.n_layers - 1:
                np.testing.assert_allclose(
                    _final_norm(ref, info)(torch.from_numpy(layer.output.copy())).numpy(),
                    out.hidden_states[-1][0],
                    **tol,
                )
            else:
                np.testing.assert_allclose(layer.output, out.hidden_states[i + 1][0].numpy(), **tol)
            np.testing.assert_allclose(layer.attn, out.attentions[i][0].numpy(), **tol)
            # V is the value projection of X; Q and K (after rotary embedding) reproduce the attention.
            attn_mod = backend.layer_modules(ref)[i].attn
            v_ref = _values(attn_mod, torch.from_numpy(layer.x.copy()), info).view(L, info.n_kv_heads, -1)
            v_ref = v_ref.transpose(0, 1)
            np.testing.assert_allclose(layer.v, v_ref.numpy(), **tol)
            k = torch.from_numpy(layer.k.copy()).repeat_interleave(info.gqa_groups, dim=0)
            scores = torch.from_numpy(layer.q.copy()) @ k.transpose(1, 2) * info.head_dim**-0.5
            if info.is_decoder:
                scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            np.testing.assert_allclose(scores.softmax(-1).numpy(), out.attentions[i][0].numpy(), **tol)
    np.testing.assert_allclose(cap.final_hidden, out.hidden_states[-1][0].numpy(), **tol)
    if info.is_decoder:
        np.testing.assert_allclose(cap.next_token_logits, out.logits[0, -1].numpy(), atol=1e-3, rtol=1e-4)
        assert cap.embedding is None
    else:
        assert cap.embedding.shape == (info.d_model,)
        assert np.isclose(np.linalg.norm(cap.embedding), 1.0, atol=1e-5)


def test_minilm_embedding_matches_sentence_transformers(load):
    """The bundled MiniLM's embedding equals what sentence-transformers computes for the same model."""
    st = pytest.importorskip("sentence_transformers")
    from atp_viz.hf.checkpoints import minilm_dir

    loaded = load("minilm")
    cap = capture(loaded, SENTENCE, attentions="none")
    ref = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode([SENTENCE], convert_to_numpy=True)[0]
    assert float(cap.embedding @ ref / np.linalg.norm(ref)) > 0.9999


def test_capture_is_immutable_and_hooks_removed(load):
    loaded = load("tiny-llama")
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules())
    cap = capture(loaded, SENTENCE)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules()) == n_hooks
    with pytest.raises(ValueError):
        cap.layers[0].x[0, 0] = 1.0
    with pytest.raises(AttributeError):
        cap.tokens = ()
    assert backend.current_state() is None


def test_hooks_removed_when_forward_fails(load):
    loaded = load("tiny-bert")
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules())
    with pytest.raises(IndexError), backend.activate(loaded.model, capture=True):
        loaded.model(input_ids=torch.tensor([[10**9]]))  # out-of-range id: the embedding lookup fails
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules()) == n_hooks
    assert backend.current_state() is None


def test_attention_maps_dropped_when_too_large_is_reported(load, monkeypatch):
    import atp_viz.analysis.capture as capmod

    monkeypatch.setattr(capmod, "MAX_ATTN_FLOATS", 10)
    cap = capture(load("tiny-bert"), SENTENCE)
    assert all(layer.attn is None for layer in cap.layers)
    assert any("Attention maps were not kept" in n for n in cap.notes)
    cap = capture(load("tiny-bert"), SENTENCE, attentions=[1])
    assert cap.layers[0].attn is None and cap.layers[1].attn is not None


def test_truncation_is_reported(load):
    loaded = load("tiny-bert")
    cap = capture(loaded, "word " * 40, max_tokens=16)
    assert cap.n_tokens == 16 and cap.truncated and cap.n_original == 42
    assert any("only the first 16" in n for n in cap.notes)
    assert cap.tokens[-1] == "[SEP]"


def test_capture_without_maps_matches_and_records_no_probabilities(load):
    """Layers whose maps are not kept run through SDPA: same activations, no L x L tensor recorded."""
    loaded = load("tiny-llama")
    full = capture(loaded, SENTENCE, attentions="all")
    with backend.activate(loaded.model, capture=True, keep_attn=frozenset()) as state, torch.inference_mode():
        tok = tokenize(loaded.tokenizer, SENTENCE, loaded.info.max_tokens)
        loaded.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    assert all("attn" not in rec for rec in state.records.values())
    none = capture(loaded, SENTENCE, attentions="none")
    for a, b in zip(full.layers, none.layers, strict=True):
        assert b.attn is None
        np.testing.assert_allclose(a.output, b.output, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(a.k, b.k, atol=1e-5, rtol=1e-5)
