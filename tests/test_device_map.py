"""Bigger models on GPUs: ``device_map``/``dtype`` reach ``from_pretrained`` and the model is left
where accelerate put it. CUDA is mocked: this checks the plumbing, not a real GPU run."""

from __future__ import annotations

import pytest
import torch

from atp_viz.deploy.settings import Settings, load_settings
from atp_viz.hf.model_info import LoadedModel, ModelLoadError
from atp_viz.hf.models import load_model

HUB_ID = "someorg/bigger-llama"


@pytest.fixture
def fake_hub(monkeypatch, load):
    """``HUB_ID`` "downloads" as tiny-llama; records the keyword arguments of from_pretrained."""
    import transformers

    tiny = load("tiny-llama")
    calls: dict = {}

    def fake_model(source, **kwargs):
        calls["model"] = (source, kwargs)
        model = transformers.AutoModelForCausalLM.from_config(tiny.model.config)
        model.to = lambda *a, **k: pytest.fail(f"a dispatched model must not be moved (to{a}{k})")
        return model

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: tiny.model.config)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def test_device_map_and_half_precision_reach_from_pretrained(fake_hub):
    loaded = load_model(HUB_ID, device_map="auto", dtype=torch.float16)
    source, kwargs = fake_hub["model"]
    assert source == HUB_ID
    assert kwargs["device_map"] == "auto" and kwargs["dtype"] is torch.float16
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    assert loaded.device == next(loaded.model.parameters()).device  # where the embedding is


def test_dtype_by_name(fake_hub):
    load_model(HUB_ID, device_map="auto", dtype="bfloat16")
    assert fake_hub["model"][1]["dtype"] is torch.bfloat16
    with pytest.raises(ModelLoadError, match="Unsupported dtype"):
        load_model(HUB_ID, dtype="float8")


def test_settings_pass_device_map_only_with_cuda(fake_hub):
    s = load_settings({"ATP_VIZ_DEVICE_MAP": "auto", "ATP_VIZ_DTYPE": "float16"})
    assert not s.server_mode
    assert s.load_kwargs(cuda_available=False) == {}  # a CPU machine loads as always
    assert s.load_kwargs(cuda_available=True) == {"device_map": "auto", "dtype": "float16"}
    load_model(HUB_ID, settings=s, **s.load_kwargs())  # torch.cuda.is_available is mocked True here
    assert fake_hub["model"][1]["device_map"] == "auto"


def test_cpu_default_is_unchanged(monkeypatch, load):
    import transformers

    tiny = load("tiny-llama")
    seen = {}

    def fake_model(source, **kwargs):
        seen.update(kwargs)
        return transformers.AutoModelForCausalLM.from_config(tiny.model.config)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: tiny.model.config)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    loaded = load_model(HUB_ID, device="cpu")
    assert "device_map" not in seen and seen["dtype"] is torch.float32
    assert loaded.device == torch.device("cpu")


def test_device_map_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="needs CUDA"):
        load_model("minilm", device_map="auto")
    with pytest.raises(ModelLoadError, match="not both"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        load_model("minilm", device="cpu", device_map="auto")


def test_loaded_model_device_is_the_first_parameters():
    class Spread(torch.nn.Module):  # as after device_map: the embedding on one device, the rest elsewhere
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Parameter(torch.zeros(2, device="meta"))
            self.head = torch.nn.Parameter(torch.zeros(2))

    lm = LoadedModel(model=Spread(), tokenizer=None, info=None)
    assert lm.device == torch.device("meta")


def test_server_settings_still_apply_with_device_map(fake_hub):
    s = Settings(server_mode=True, device_map="auto")
    with pytest.raises(ModelLoadError, match="not one of this server's models"):
        load_model(HUB_ID, settings=s, **s.load_kwargs())
    assert "model" not in fake_hub  # refused before anything is downloaded
