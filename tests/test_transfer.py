"""Two-stage fine-tuning: layer-wise attention transfer (stage 1), then end-to-end tuning (stage 2).

Properties: stage 1's target is each layer's dense attention output given the dense input, so the
exact form at full rank has nothing to learn; teacher forcing isolates the layers; stage 1 trains only
the form's per-head parameters and the Q/K adapters; both stages run for every registered form and
the trained per-head parameters travel with the run's folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from atp_viz import forms
from atp_viz.analysis.finetune import training, transfer
from atp_viz.analysis.finetune.config import TuneConfig
from atp_viz.hf import models, tuned
from atp_viz.hf.model_info import LoadedModel

TEXTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Open the file and return a stream; raise OSError when the file cannot be opened.",
    "The queue is thread safe: put and get may be called from several threads at once.",
    "Split the string at the separator and return a list of the pieces, left to right.",
]
DECODER_TEXT = " ".join(TEXTS * 3)


def _tuned(cfg: TuneConfig) -> tuple[LoadedModel, dict, object]:
    """Fresh adapters over ``cfg.model``, the form's initial per-head parameters, and the teacher."""
    loaded = models.load_model(cfg.model)
    peft_model = training._with_adapters(cfg, loaded)
    tuned_model = LoadedModel(model=peft_model, tokenizer=loaded.tokenizer, info=loaded.info)
    return tuned_model, training._form_parameters(cfg, tuned_model), peft_model.disable_adapter


def _item(tm: LoadedModel, cfg: TuneConfig):
    if tm.info.is_decoder:
        return tm.tokenizer(DECODER_TEXT, return_tensors="pt")["input_ids"][:, : cfg.seq_len]
    return TEXTS


@pytest.mark.parametrize(
    "cfg",
    [
        TuneConfig(model="tiny-bert", rank=1.0, form="exact"),
        TuneConfig(model="tiny-llama", rank=1.0, form="exact", seq_len=48, chunk=16),
    ],
    ids=["encoder", "decoder"],
)
def test_exact_form_at_full_rank_has_nothing_to_transfer(cfg):
    """At r = L the exact form is dense attention: given the dense input, every layer's output already
    equals the target (a misaligned teacher input, e.g. a wrong chunk offset, would not)."""
    tm, params, teacher = _tuned(cfg)
    loss = transfer.transfer_loss(tm, _item(tm, cfg), cfg, params, teacher)
    assert float(loss.detach()) < 1e-10
    half = TuneConfig(**{**cfg.__dict__, "rank": 0.25})
    assert transfer.transfer_loss(tm, _item(tm, half), half, params, teacher).item() > 1e-4


def test_teacher_forcing_isolates_the_layers():
    """Layer 1's student output depends on the teacher's input to layer 1 only: wrecking layer 0 (its
    expansion point far off) changes layer 0's output and leaves layer 1's bit for bit."""
    cfg = TuneConfig(model="tiny-llama", rank=0.5, form="taylor2", seq_len=48, chunk=16)
    tm, params, teacher = _tuned(cfg)
    ids = _item(tm, cfg)
    xs, _ = transfer._teacher(tm.model, lambda: tm.model(input_ids=ids, use_cache=False), teacher)

    def student(p):
        out: dict[int, list] = {}
        with torch.no_grad(), transfer._hooks(tm.model, xs, out):
            transfer.serving.chunked_logits(tm, ids, rank=cfg.rank, form=cfg.form, chunk=cfg.chunk, params=p)
        return {i: torch.cat(o, dim=1) for i, o in out.items()}

    before = student(params)
    wrecked = {**params, 0: {"t": params[0]["t"] * 5.0, "m": params[0]["m"] + 3.0}}
    after = student(wrecked)
    assert not torch.allclose(before[0], after[0])
    assert torch.equal(before[1], after[1])


def test_stage_one_trains_the_form_and_query_key_adapters_only(tmp_path):
    cfg = TuneConfig(
        model="tiny-bert", rank=0.25, form="taylor2", transfer_steps=4, steps=0, batch=4, eval_texts=4
    )
    res = training.train(cfg, tmp_path / "run", texts=TEXTS)
    assert len(res.transfer_losses) == 4 and res.losses == []
    assert res.transfer_losses[-1] < res.transfer_losses[0]  # the same 4 texts every step
    meta = json.loads((tmp_path / "run" / tuned.SETTINGS_FILE).read_text())
    assert meta["transfer_losses"] == res.transfer_losses and meta["transfer_skipped_steps"] == 0
    # the form's per-head parameters moved, were saved, and come back with the model
    saved = load_file(str(tmp_path / "run" / tuned.PARAMS_FILE))
    init = forms.get("taylor2").init_params(2)
    assert any(not torch.equal(v, init[k.split("/")[-1]]) for k, v in saved.items())
    loaded = models.load_model(f"tuned:{tmp_path / 'run'}")
    got = loaded.form_params("taylor2")
    for key, value in saved.items():
        _, layer, name = key.split("/")
        assert torch.equal(got[int(layer)][name].cpu(), value)
    # only query/key adapters were trained: every other LoRA B is still zero (LoRA's initial B)
    adapters = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    moved = {k for k, v in adapters.items() if "lora_B" in k and v.abs().max() > 0}
    assert moved and all(".query." in k or ".key." in k for k in moved)


@pytest.mark.parametrize("form", forms.names())
def test_both_stages_run_for_every_form(tmp_path, form):
    cfg = TuneConfig(
        model="tiny-llama", rank=0.5, form=form, transfer_steps=2, steps=2, seq_len=48, chunk=16,
        eval_windows=1, lr=1e-2,
    )  # fmt: skip
    res = training.train(cfg, tmp_path / form, texts=[DECODER_TEXT])
    assert len(res.transfer_losses) == 2 and len(res.losses) == 2
    meta = json.loads((tmp_path / form / tuned.SETTINGS_FILE).read_text())
    assert meta["skipped_steps"] == res.skipped + res.transfer_skipped
    finite = [v for v in res.transfer_losses + res.losses if v == v]
    assert len(finite) == 4 - meta["skipped_steps"]
    has_params = bool(forms.get(form).param_defaults)
    assert (tmp_path / form / tuned.PARAMS_FILE).exists() == has_params


@pytest.mark.parametrize("form", ["exact", "taylor2"])
def test_teacher_passes_run_the_fused_dense_kernel(monkeypatch, form):
    """The original model's passes in both stages (stage 1's targets, stage 2's KL teacher) go through
    torch SDPA, as the student's dense neighbours do; a bare model call would run the slow eager path.
    Eager attention is never needed to train (no attention maps are kept)."""
    from atp_viz.analysis.finetune import objectives
    from atp_viz.hf import backend

    cfg = TuneConfig(model="tiny-llama", rank=0.5, form=form, seq_len=48, chunk=16)
    tm, params, teacher = _tuned(cfg)
    ids = _item(tm, cfg)
    calls = []
    real = backend.eager_attention
    monkeypatch.setattr(backend, "eager_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    transfer.transfer_loss(tm, ids, cfg, params, teacher)
    objectives.decoder_distillation(tm, ids, cfg, params=params, kl_weight=1.0, teacher=teacher)
    assert not calls


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_the_basis_source_reaches_both_stages_and_the_evaluation(model, monkeypatch):
    """A run with the basis from the keys uses it in stage 1, stage 2 and the held-out evaluation: each
    gives another number than the input basis (evaluated afresh; the cache key is checked apart)."""
    from atp_viz.analysis.finetune import evaluation

    paths = {
        evaluation._cache_path(TuneConfig(model=model, basis_from=s), "atp_untuned", 4)
        for s in ("input", "keys")
    }
    assert len(paths) == 2  # the evaluation cache keeps the two apart
    monkeypatch.setattr(evaluation, "_cache_path", lambda *a: None)
    seen = []
    for source in ("input", "keys"):
        cfg = TuneConfig(
            model=model, rank=0.25, form="exact", basis_from=source, seq_len=48, chunk=16, eval_texts=4,
            eval_windows=1,
        )  # fmt: skip
        tm, params, teacher = _tuned(cfg)
        item = _item(tm, cfg)
        with torch.no_grad():
            stage1 = transfer.transfer_loss(tm, item, cfg, params, teacher).item()
            stage2 = float(training._stage2_loss(cfg, tm, item, params, teacher))
        rows = evaluation.evaluate(models.load_model(model), tm, cfg)["rows"]
        key = "top1" if tm.info.is_decoder else "cosine_mean"
        nll = rows["atp_untuned"].get("perplexity", rows["atp_untuned"][key])
        seen.append((stage1, stage2, nll))
        assert cfg.label().endswith("basis from keys)") == (source == "keys")
    for a, b in zip(*seen, strict=True):
        assert a != b  # the same setting gives the same bits; another basis does not
