"""Model families as data (atp_viz.hf.families): each tiny model matches its declaration, a renamed
architecture is matched by layout, an unknown layout is refused with what to add, and GPT-2 (one
entry) works end to end: capture, explorer, serving and fine-tuning, from a local folder too."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import SENTENCE
from streamlit.testing.v1 import AppTest

from atp_viz.analysis import serving
from atp_viz.analysis.capture import capture
from atp_viz.analysis.finetune.config import TuneConfig
from atp_viz.analysis.finetune.training import train
from atp_viz.hf import backend, families
from atp_viz.hf.models import load_model
from atp_viz.text.inputs import tokenize

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.mark.parametrize(
    ("key", "family", "encoder"),
    [("tiny-bert", "bert", True), ("tiny-llama", "llama", False), ("tiny-qwen2", "llama", False),
     ("tiny-gpt2", "gpt2", False)],
)  # fmt: skip
def test_each_model_matches_its_declaration(load, key, family, encoder):
    loaded = load(key)
    fam = families.family_of(loaded.model)
    assert fam.name == family == loaded.info.family and loaded.info.is_decoder is not encoder
    mods = backend.layer_modules(loaded.model)
    assert len(mods) == loaded.info.n_layers
    for m in mods:
        assert all(isinstance(getattr(m.attn, name), torch.nn.Module) for name in fam.qkv)
        assert m.mlp is not None


def test_a_renamed_architecture_is_matched_by_layout(load):
    model = copy.deepcopy(load("tiny-llama").model)
    model.config.model_type = "my-own-llama"
    assert families.by_model_type("my-own-llama") is None
    assert families.family_of(model).name == "llama"


def test_an_unknown_layout_is_refused_with_what_to_add():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd", "num_hidden_layers": 2})()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])

    with pytest.raises(families.FamilyError, match="families.py"):
        families.family_of(Odd())


def test_lora_regex_targets_the_declared_layers():
    import re

    bert = families.by_model_type("bert").lora_regex()
    assert re.match(bert, "encoder.layer.0.attention.self.query")
    assert re.match(bert, "encoder.layer.0.output.dense")
    assert not re.match(bert, "pooler.dense")  # BERT's pooler is not used by mean pooling
    gpt2 = families.by_model_type("gpt2").lora_regex()
    assert re.match(gpt2, "transformer.h.1.attn.c_attn") and re.match(gpt2, "transformer.h.1.mlp.c_fc")


def test_gpt2_serving_is_strictly_causal_and_exact_with_an_exact_past(load):
    loaded = load("tiny-gpt2")
    ids = torch.randint(5, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dense = loaded.model(input_ids=ids, use_cache=False).logits[0]
        chunked = serving.chunked_logits(loaded, ids, rank=None, chunk=16)
        torch.testing.assert_close(chunked, dense, atol=1e-4, rtol=1e-4)
        for form in ("exact", "linear"):
            a = serving.chunked_logits(loaded, ids, rank=8, form=form, chunk=16)
            other = ids.clone()
            other[0, 40] = 7
            b = serving.chunked_logits(loaded, other, rank=8, form=form, chunk=16)
            torch.testing.assert_close(a[:40], b[:40], atol=0, rtol=0)
            assert not torch.allclose(a[40:], b[40:])


@pytest.mark.filterwarnings("error:fan_in_fan_out")  # the family config sets it; peft need not correct it
def test_gpt2_fine_tunes_and_reloads(tmp_path):
    text = " ".join([SENTENCE] * 40)
    cfg = TuneConfig(model="tiny-gpt2", steps=2, seq_len=64, chunk=16, eval_windows=1, lr=3e-2)
    res = train(cfg, tmp_path / "run", texts=[text])
    assert len(res.losses) == 2 and res.skipped == 0
    tuned = load_model(f"tuned:{tmp_path / 'run'}")
    assert tuned.info.family == "gpt2" and "ATP-tuned" in tuned.info.label


def test_a_local_gpt2_checkpoint_loads_and_captures(load, tmp_path):
    src = load("tiny-gpt2")
    folder = tmp_path / "my-gpt2"
    src.model.save_pretrained(folder, safe_serialization=True)
    src.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.info.family == "gpt2" and loaded.info.is_decoder
    cap = capture(loaded, SENTENCE, attentions="all")
    ref = capture(src, SENTENCE, attentions="all")
    torch.testing.assert_close(
        torch.from_numpy(cap.final_hidden.copy()), torch.from_numpy(ref.final_hidden.copy())
    )
    assert tokenize(loaded.tokenizer, SENTENCE, 64).n_tokens == cap.n_tokens


def test_explorer_and_serving_pages_on_gpt2():
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["model"] = "tiny-gpt2"
    at.switch_page("pages/explorer.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == "tiny-gpt2"
    assert any(m.label.startswith("Next-token KL") for m in at.metric)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["model"] = "tiny-gpt2"
    at.switch_page("pages/serving.py").run()
    assert not at.exception, at.exception
    at.button(key="serve_go").click().run()
    assert not at.exception, at.exception
    assert any(m.label == "Token agreement" for m in at.metric)
