"""Low-rank-aware fine-tuning: loss goes down, adapters save and reload, metrics reproduce, no leak."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from atp_viz import forms
from atp_viz.analysis.finetune import data, evaluation, objectives, training
from atp_viz.analysis.finetune.config import Cancelled, TuneConfig
from atp_viz.core.basis import NonFiniteError, principal_basis
from atp_viz.hf import models, tuned
from atp_viz.hf.engine import ATPConfig, make_plan
from atp_viz.hf.model_info import TUNED_PREFIX, ModelLoadError
from atp_viz.text import corpus

SHORT_TEXTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Open the file and return a stream; raise OSError when the file cannot be opened.",
    "The queue is thread safe: put and get may be called from several threads at once.",
    "Split the string at the separator and return a list of the pieces, left to right.",
    "A context manager that closes the object when the block ends, even after an error.",
    "Compute the arithmetic mean of the data, which must contain at least one point.",
    "Parse the command line arguments and return them as attributes of a namespace.",
    "Encode the object as a JSON string, sorting keys when sort_keys is true.",
]


def test_split_is_by_module_and_disjoint():
    assert not set(corpus.TRAIN_MODULES) & set(corpus.HELDOUT_MODULES)
    train = set(corpus.docstrings(corpus.TRAIN_MODULES))
    held = set(corpus.docstrings(corpus.HELDOUT_MODULES))
    assert len(held) > 100 and len(train) > 1000
    assert not train & held  # no docstring in both splits


def test_the_wider_training_text_adds_modules_and_holds_out_the_same(load):
    """``train_text="wider"`` trains on the training split and more modules, none of them held out; the
    run's data and its recorded split follow the setting."""
    wider = corpus.TRAIN_TEXTS["wider"]
    assert set(corpus.TRAIN_MODULES) < set(wider) and not set(wider) & set(corpus.HELDOUT_MODULES)
    assert TuneConfig(train_text="wider").train_modules == wider
    loaded = load("tiny-bert")
    narrow = training._training_data(TuneConfig(model="tiny-bert"), loaded, None)
    more = training._training_data(TuneConfig(model="tiny-bert", train_text="wider"), loaded, None)
    assert len(more) > 1.2 * len(narrow) and set(narrow) <= set(more)
    held = set(corpus.docstrings(corpus.HELDOUT_MODULES))
    assert not set(corpus.docstrings(wider)) & held
    with pytest.raises(ValueError, match="train_text must be one of docstrings, wider"):
        TuneConfig(train_text="web")


@pytest.mark.parametrize(
    "model,kw",
    [
        # the same 8 texts every step (batch 8), so a decrease is not luck of the draw
        ("minilm", dict(rank=0.25, batch=8, eval_texts=12, lr=3e-3)),
        ("tiny-llama", dict(rank=0.5, seq_len=96, chunk=16, eval_windows=2, lr=3e-2)),
    ],
)
def test_two_steps_decrease_save_load_and_reproduce(tmp_path, model, kw):
    cfg = TuneConfig(model=model, steps=2, **kw)
    texts = SHORT_TEXTS if model == "minilm" else [" ".join(SHORT_TEXTS)]
    res = training.train(cfg, tmp_path / "run", texts=texts)
    assert res.config.model != "tiny-llama" or len(data.windows_of(texts[0], _tok(model), 96)) == 1
    assert len(res.losses) == 2 and res.losses[1] < res.losses[0]  # the same batch twice: must go down
    # adapters (small safetensors) + settings JSON with the split and the metrics
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", tuned.SETTINGS_FILE} <= files
    meta = json.loads((tmp_path / "run" / tuned.SETTINGS_FILE).read_text())
    assert meta["split"]["heldout_modules"] == list(corpus.HELDOUT_MODULES)
    assert meta["settings"]["rank"] == cfg.rank and meta["losses"] == res.losses
    rows = meta["metrics"]["rows"]
    assert set(rows) == {"dense", "dense_tuned_weights", "atp_untuned", "atp_tuned"}
    # the app's loader (models.load_model "tuned:<folder>") gives a model reproducing the saved metrics
    loaded = models.load_model(f"tuned:{tmp_path / 'run'}")
    assert "ATP-tuned" in loaded.info.label
    again = json.loads(json.dumps(evaluation.evaluate(models.load_model(model), loaded, cfg)["rows"]))
    for name, vals in rows.items():
        for k, v in vals.items():
            if isinstance(v, dict):  # scored per module: counts
                assert again[name][k] == v, (name, k)
            else:
                assert again[name][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
    # the tuned weights differ from the base model's (the adapters were merged in)
    base = models.load_model(model)
    diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(loaded.model.parameters(), base.model.parameters(), strict=True)
    )
    assert diff > 0
    found = tuned.find_runs([tmp_path])
    assert [run for run, _ in found] == [tmp_path / "run"]
    (row,) = evaluation.summary_rows(found)
    key = "cosine_mean" if model == "minilm" else "top1"
    for column, setting in (("tuned ATP", "atp_tuned"), ("untuned ATP", "atp_untuned")):
        value, (lo, hi) = rows[setting][key], rows[setting][f"{key}_ci"]
        assert row[column] == f"{value:.3f} [{lo:.3f}, {hi:.3f}]" and lo <= value <= hi
    # every held-out module that gave data is counted, and the counts add up to what was scored
    per_module = rows["dense"]["scored_per_module"]
    assert set(per_module) <= set(corpus.HELDOUT_MODULES) and len(per_module) > 1
    assert sum(per_module.values()) == rows["dense"]["n_scored" if model != "minilm" else "n_texts"]


def _same(a, b, rel=1e-6) -> bool:
    """Equal up to float rounding, through dicts, tuples and lists (pytest.approx does not nest)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=rel, abs=1e-12)
    return a == b


def test_untrained_adapters_change_nothing(tmp_path):
    """LoRA's B starts at zero: with 0 steps the tuned model equals the base model, up to float rounding
    (since the streaming step runs torch's fused attention, the two differed by ~1e-7 relative in one run
    of the whole suite, not when run alone)."""
    cfg = TuneConfig(model="tiny-llama", steps=0, seq_len=48, chunk=16, eval_windows=1)
    res = training.train(cfg, tmp_path / "zero", texts=[" ".join(SHORT_TEXTS)])
    rows = res.metrics["rows"]
    tuned_row = {k: v for k, v in rows["atp_tuned"].items() if "dense_tuned_weights" not in k}
    assert _same(tuned_row, rows["atp_untuned"])
    assert _same(
        rows["atp_tuned"]["top1_minus_dense_tuned_weights"], rows["atp_untuned"]["top1_minus_reference"]
    )
    dense_tuned = {k: v for k, v in rows["dense_tuned_weights"].items() if "reference" not in k}
    assert _same(dense_tuned, rows["dense"])
    assert rows["dense_tuned_weights"]["top1_minus_reference"] == 0.0


@pytest.mark.parametrize("form", ["exact", "linear"])
def test_decoder_objective_does_not_read_the_future(load, form):
    """Perturbing tokens from position p on leaves every loss predicting a token before p unchanged,
    with gradients on (as in training)."""
    loaded = load("tiny-llama")
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (1, 64))
    chunk, p = 16, 40
    other = ids.clone()
    other[0, p:] = torch.randint(5, 1000, (64 - p,))
    a, _ = objectives.decoder_losses(loaded, ids, 0.5, form, chunk)
    b, _ = objectives.decoder_losses(loaded, other, 0.5, form, chunk)
    assert a.requires_grad or not any(q.requires_grad for q in loaded.model.parameters())
    # entry j predicts token chunk + j + 1 from tokens <= chunk + j; unchanged while chunk + j + 1 < p
    n = p - chunk - 1
    torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=1e-6)
    assert not torch.allclose(a[n:], b[n:])


def test_a_whole_sequence_basis_would_leak(load):
    """Why the decoder objective uses the chunked mode: with the basis over the whole sequence (the
    explorer's prefill view), earlier logits change when later tokens do."""
    from atp_viz.hf import backend

    loaded = load("tiny-llama")
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (1, 32))
    other = ids.clone()
    other[0, 24:] = torch.randint(5, 1000, (8,))
    outs = []
    for x in (ids, other):
        plan = make_plan(ATPConfig(rank=0.25, form="exact"), loaded.info.n_layers)
        with torch.no_grad(), backend.activate(loaded.model, atp=plan):
            outs.append(loaded.model(input_ids=x, use_cache=False).logits[0, :20])
    assert not torch.allclose(outs[0], outs[1], atol=1e-5)


def _tok(model):
    return models.load_model(model).tokenizer


def test_bad_settings_and_folders(tmp_path):
    for bad in (1.5, 0, 0.0):  # an int (principal keys of the past) is a decoder rank: test_window_tuning
        with pytest.raises(ValueError, match="share of L"):
            TuneConfig(rank=bad)
    with pytest.raises(ValueError, match="form"):
        TuneConfig(form="fast")
    with pytest.raises(ValueError, match="chunk"):
        TuneConfig(seq_len=64, chunk=64)
    with pytest.raises(ValueError, match="eval_texts"):
        TuneConfig(eval_windows=-1)
    with pytest.raises(ValueError, match="eval_texts"):
        TuneConfig(eval_texts=1)
    with pytest.raises(ValueError, match="rank_mode"):
        TuneConfig(rank_mode="total")
    with pytest.raises(ModelLoadError, match="not an ATP fine-tuning run"):
        models.load_model(f"tuned:{tmp_path}")
    (tmp_path / tuned.SETTINGS_FILE).write_text("{}")
    with pytest.raises(ValueError, match="already holds a fine-tuning run"):
        training.train(TuneConfig(model="tiny-llama"), tmp_path)


def test_cancel_saves_nothing(tmp_path):
    cfg = TuneConfig(model="tiny-llama", steps=5, seq_len=48, chunk=16)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled, match="after 1 of 5 steps"):
        training.train(cfg, tmp_path / "c", texts=[" ".join(SHORT_TEXTS)], stop=stop)
    assert not (tmp_path / "c").exists()


def test_finetune_page_runs_a_job_and_lists_it(tmp_path, monkeypatch):
    """The Fine-tuning page starts a run in the background, shows progress, and lists it when done."""
    import time
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))  # the run's default folder: <cache>/tuned/...
    original = tuned.find_runs  # only this test's runs, not the repository's data/tuned
    monkeypatch.setattr(tuned, "find_runs", lambda roots=None: original([tmp_path / "tuned"]))
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    at = AppTest.from_file(app, default_timeout=120)
    at.switch_page("pages/finetune.py").run()
    assert not at.exception, at.exception
    assert any("No finished run yet" in i.value for i in at.info)
    at.selectbox(key="tune_model").set_value("tiny-llama")
    at.number_input(key="tune_steps").set_value(2)
    at.number_input(key="tune_transfer_steps").set_value(1)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception, at.exception
    job = at.session_state["tune_job"]
    deadline = time.time() + 600
    while job.running and time.time() < deadline:
        time.sleep(0.5)
    snap = job.snapshot()
    assert snap["error"] is None and snap["result"] is not None, snap["error"]
    assert len(snap["losses"]) == 2 and len(snap["transfer_losses"]) == 1  # both stages ran
    at.run()
    assert not at.exception, at.exception
    assert any("Done:" in s.value for s in at.success)
    assert any("ATP-tuned" in e.label for e in at.expander)  # the finished run is listed


def test_explorer_shows_a_tuned_model_next_to_dense_and_untuned(tmp_path, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    cfg = TuneConfig(model="tiny-bert", steps=1, batch=8, eval_texts=8)
    run = training.train(cfg, texts=SHORT_TEXTS).out_dir
    assert run.parent == tmp_path / "tuned" and run.name.startswith("tiny-bert-r0.5-exact-")
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    at = AppTest.from_file(app, default_timeout=120)
    at.switch_page("pages/explorer.py")
    at.query_params["model"] = f"{TUNED_PREFIX}{run}"
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == f"{TUNED_PREFIX}{run}"
    label = (
        f"Tiny random BERT + ATP-tuned r=0.5 (exact) · {run.name}"  # the folder tells same-setting runs apart
    )
    assert label in at.selectbox(key="model_choice").options
    table = at.dataframe[0].value  # the only table of an encoder's explorer (AppTest keeps no df key)
    assert len(table) == 4 and table["setting"].iloc[0].startswith("original model, dense")
    assert table["embedding cosine to dense"].iloc[0] == pytest.approx(1.0)
    assert not [i for i in at.info if "never trained for" in i.value]  # the run's own setting
    assert not [b for b in at.button if b.key == "explorer_as_tuned"]
    at.radio(key="basis_source").set_value("keys").run()
    at.slider(key="rank_frac").set_value(0.25).run()
    assert [i for i in at.info if "never trained for" in i.value]  # a basis it was not tuned with
    at.button(key="explorer_as_tuned").click().run()  # one click back to the setting it was tuned at
    assert not at.exception, at.exception
    assert at.radio(key="basis_source").value == "input" and at.slider(key="rank_frac").value == 0.5
    assert (at.query_params["basis"], at.query_params["rank"]) == ("input", "0.50")
    assert not [i for i in at.info if "never trained for" in i.value]
    assert not [b for b in at.button if b.key == "explorer_as_tuned"]
    at.radio(key="rank_unit").set_value("tokens").run()  # the same rank in another unit: the same setting
    assert not [b for b in at.button if b.key == "explorer_as_tuned"]


def test_the_explorer_says_a_dense_control_trained_no_atp_setting(tmp_path, monkeypatch):
    """A dense-tuned control trained no ATP setting: the before/after table says so, claims no 'tuned at'
    setting and offers no button to show one; a decoder's rows are said to run over the whole text."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    cfg = TuneConfig(model="tiny-llama", attention="dense", transfer_steps=0, steps=1, seq_len=96, chunk=16,
                     eval_windows=1)  # fmt: skip
    run = training.train(cfg, texts=[" ".join(SHORT_TEXTS)]).out_dir
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.switch_page("pages/explorer.py")
    at.query_params["model"] = f"{TUNED_PREFIX}{run}"
    at.run()
    assert not at.exception, at.exception
    heading = next(m.value for m in at.markdown if m.value.startswith("**Before / after"))
    assert "dense-tuned control, trained without ATP" in heading and "tuned at" not in heading
    infos = " ".join(i.value for i in at.info)
    assert "dense-tuned control" in infos and "strictly causal chunked mode" not in infos
    at.slider(key="rank_frac").set_value(0.25).run()  # off its default ATP rows: still nothing to go back to
    assert not [b for b in at.button if b.key == "explorer_as_tuned"]


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """The linear form can send a layer's input to inf/NaN (its denominator crosses zero); such a step
    is skipped, counted in the run's JSON, and training goes on."""
    real = training.decoder_distillation
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "decoder_distillation", flaky)
    cfg = TuneConfig(model="tiny-llama", steps=3, seq_len=96, chunk=16, eval_windows=1)
    res = training.train(cfg, tmp_path / "r", texts=[" ".join(SHORT_TEXTS)])
    assert res.skipped == 1 and len(res.losses) == 3
    assert res.losses[0] != res.losses[0] and all(v == v for v in res.losses[1:])  # nan, then numbers
    assert json.loads((tmp_path / "r" / tuned.SETTINGS_FILE).read_text())["skipped_steps"] == 1


def test_a_non_finite_layer_input_gives_a_clear_error():
    x = torch.randn(8, 4)
    x[3, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="inf or NaN"):
        principal_basis(x, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_form_backpropagates_like_its_explicit_reference(causal):
    """Under autograd the linear form divides out of place (the first MiniLM linear-form run failed in
    backward when it did not); its outputs and gradients equal those of the explicit L x L formula."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    u = principal_basis(torch.randn(2, 12, 16, dtype=torch.float64), 9)  # r = 9 > (dh + 1) / 2: reassociated
    form = forms.get("linear")
    out = form.attend(q, k, v, u, causal=causal)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    weights = form.token_weights(q, k, v, u, causal=causal)  # explicit (1 + s) / sum over V_r
    vr = u.unsqueeze(1) @ (u.mT.unsqueeze(1) @ v)
    ref = (weights.reshape(2, 2, 2, 12, 12) @ vr.unsqueeze(2)).reshape(2, 4, 12, 8)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-8)


def test_overflowing_gradients_are_counted_not_silently_zeroed(tmp_path, monkeypatch):
    """clip_grad_norm_ would scale an inf-norm gradient by 0 and the step would change nothing without a
    word (it happened with SmolLM2's linear form); such steps are counted as skipped."""
    inf = torch.tensor(float("inf"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: inf)
    cfg = TuneConfig(model="tiny-llama", steps=2, seq_len=96, chunk=16, eval_windows=1, lr=3e-2)
    res = training.train(cfg, tmp_path / "r", texts=[" ".join(SHORT_TEXTS)])
    assert res.skipped == 2
    rows = res.metrics["rows"]
    # nothing was learned, and the JSON says why
    assert rows["atp_tuned"]["top1"] == rows["atp_untuned"]["top1"]
    # the tuned model is reloaded from its folder: the same weights, summed in another order
    assert rows["atp_tuned"]["perplexity"] == pytest.approx(rows["atp_untuned"]["perplexity"], rel=1e-6)


def test_reevaluate_measures_a_finished_run_again_and_keeps_the_old_metrics(tmp_path, monkeypatch):
    """``finetune --reevaluate DIR`` after a fix in the evaluation: the run's metrics are measured again
    from its folder (here equal to the first measurement, nothing having changed), the replaced ones
    are kept, and the JSON says it was re-measured."""
    cfg = TuneConfig(model="tiny-llama", rank=0.5, steps=1, seq_len=96, chunk=16, eval_windows=2)
    training.train(cfg, tmp_path / "run", texts=[" ".join(SHORT_TEXTS)])
    path = tmp_path / "run" / tuned.SETTINGS_FILE
    meta = json.loads(path.read_text())
    good = json.loads(json.dumps(meta["metrics"]))
    meta["metrics"]["rows"]["dense"]["perplexity"] = -1.0  # what a broken evaluation wrote
    path.write_text(json.dumps(meta))
    monkeypatch.setattr(evaluation, "_cache_path", lambda *a: pytest.fail("a re-measurement read the cache"))
    again = training.reevaluate(tmp_path / "run", command=["test"])
    after = json.loads(path.read_text())
    assert after["metrics"] == json.loads(json.dumps(again))
    for row in good["rows"]:
        assert again["rows"][row]["perplexity"] == pytest.approx(good["rows"][row]["perplexity"], rel=1e-5)
    assert after["superseded_metrics"][0]["rows"]["dense"]["perplexity"] == -1.0
    assert after["reevaluated"]["command"] == ["test"] and after["losses"] == meta["losses"]
    with pytest.raises(ValueError, match="not a fine-tuning run"):
        training.reevaluate(tmp_path)


def test_dense_control_trains_with_dense_attention(load, tmp_path):
    """The control's objective is the dense model's own loss on the scored positions (with untrained
    adapters the KL to the original is 0), whatever ATP rank or form it names; an ATP run's is not."""
    import contextlib

    loaded = load("tiny-llama")
    torch.manual_seed(2)
    ids = torch.randint(5, 1000, (1, 64))
    with torch.no_grad():
        logits = objectives.dense_logits(loaded.model, ids)[0, 16:-1]
    expected = torch.nn.functional.cross_entropy(logits.float(), ids[0, 17:])
    teacher = contextlib.nullcontext  # no adapters here: the student is the original model
    for rank, form in ((0.25, "exact"), (0.5, "linear")):
        cfg = TuneConfig(model="tiny-llama", rank=rank, form=form, attention="dense", seq_len=64, chunk=16)
        with torch.no_grad():
            loss = objectives.decoder_distillation(loaded, ids, cfg, params={}, kl_weight=1, teacher=teacher)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    atp = TuneConfig(model="tiny-llama", rank=0.25, seq_len=64, chunk=16)
    with torch.no_grad():
        atp_loss = objectives.decoder_distillation(loaded, ids, atp, params={}, kl_weight=1, teacher=teacher)
    assert abs(float(atp_loss) - float(expected)) > 1e-3

    cfg = TuneConfig(
        model="tiny-llama",
        attention="dense",
        form="taylor2",
        steps=2,
        seq_len=96,
        chunk=16,
        eval_windows=2,
        lr=3e-2,
    )
    res = training.train(cfg, tmp_path / "control", texts=[" ".join(SHORT_TEXTS)])
    assert len(res.losses) == 2 and res.losses[1] < res.losses[0]
    meta = json.loads((tmp_path / "control" / tuned.SETTINGS_FILE).read_text())
    assert meta["settings"]["attention"] == "dense" and meta["metrics"]["trained_with"] == "dense"
    assert "dense control" in meta["metrics"]["what"]
    assert "dense-tuned control" in models.load_model(f"tuned:{tmp_path / 'control'}").info.label
    assert tuned.load_params(tmp_path / "control") == {}  # a control trains no ATP parameter


def test_dense_control_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="attention must be one of"):
        TuneConfig(attention="sparse")
    with pytest.raises(ValueError, match="no stage 1"):
        TuneConfig(model="tiny-llama", attention="dense", transfer_steps=5)
    with pytest.raises(ValueError, match="for decoders"):
        training.train(TuneConfig(model="tiny-bert", attention="dense", steps=1), tmp_path / "enc")
    assert not (tmp_path / "enc").exists()


def test_a_skipped_step_logs_its_loss_without_a_torch_warning():
    """A NaN loss still carries its graph; logging it must not trip torch's 'requires_grad to scalar'
    warning, which printed a second alarming message for every skipped step of a run."""
    w = torch.nn.Parameter(torch.ones(2))
    loss = (w * float("nan")).sum()
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training._update(loss, [w], opt, sched, 0) is False
    assert torch.equal(w.detach(), torch.ones(2))


def test_a_setting_the_other_kind_of_model_reads_is_said_to_be_ignored(tmp_path, caplog):
    cfg = TuneConfig(model="tiny-bert", steps=1, batch=4, eval_texts=2, kl_weight=5.0, rank_mode="effective")
    with caplog.at_level("WARNING"):
        training.train(cfg, tmp_path / "run", texts=SHORT_TEXTS)
    assert "rank_mode, kl_weight are not read by an encoder: this run ignores them." in caplog.text
    decoder = models.load_model("tiny-llama").info
    assert training.ignored_settings(TuneConfig(model="tiny-llama", batch=4), decoder) == ["batch"]
