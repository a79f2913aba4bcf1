"""Fine-tuning a decoder in the paper's speed setting: a fixed number of principal keys for the middle of the
past, behind an exact window and sinks (LoLCATs' recipe), the middle's basis kept as running sums."""

from __future__ import annotations

import json

import pytest
import torch

from atp_viz import forms
from atp_viz.analysis import serving
from atp_viz.analysis.finetune import objectives, training
from atp_viz.analysis.finetune.config import TuneConfig
from atp_viz.hf import models, tuned

SHORT = " ".join(
    [
        "Return the sum of a list of numbers, or zero when the list is empty.",
        "Open a file and read its lines, stripping the trailing newline of each one.",
        "Split the path into its directory and base name; an empty directory means the current one.",
        "Parse a date in ISO format and return it as a tuple of year, month and day.",
    ]
    * 4
)


def _ids(seed: int, n: int = 96) -> torch.Tensor:
    return torch.randint(5, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


def test_running_sums_backpropagate_like_the_recomputed_basis(load):
    """Under autograd the running sums treat the basis as a constant, as the recomputed SVD does: the
    sign-invariant linear form gets the same gradient on a layer's projections either way (an in-place
    sum breaks backward; a sum that let gradients through the basis source gives another gradient)."""
    loaded = load("tiny-llama")
    ids = _ids(4)
    layer = loaded.model.model.layers[0].self_attn
    weights = [layer.k_proj.weight, layer.v_proj.weight, layer.q_proj.weight]
    keep = serving.ExactKeep(sinks=2, window=16)
    grads = []
    for update in ("moments", "recompute"):
        logits = serving.chunked_logits(
            loaded, ids, rank=5, form="linear", chunk=16, basis_from="keys", method="exact",
            basis_update=update, keep=keep,
        )  # fmt: skip
        loss = logits[16:].float().log_softmax(-1)[:, 7].mean()
        grads.append(torch.autograd.grad(loss, weights))
    for a, b in zip(*grads, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-5)


def test_the_middle_gate_spans_window_alone_to_untrained(load):
    """pksoftmax's per-head ``b`` weighs the middle's principal keys against the exact window: at 0 it is
    the untrained form, and far below 0 the middle gets no weight, which is the window alone."""
    loaded = load("tiny-llama")
    ids = _ids(5)
    keep = serving.ExactKeep(sinks=2, window=16)
    kw = dict(rank=4, form="pksoftmax", chunk=16, basis_from="keys", basis_update="moments")
    n, H = loaded.info.n_layers, loaded.info.n_heads
    with torch.no_grad():
        untrained = serving.chunked_logits(loaded, ids, keep=keep, **kw)
        zero = {i: {"b": torch.zeros(H)} for i in range(n)}
        shut = {i: {"b": torch.full((H,), -1e4)} for i in range(n)}
        alone = serving.chunked_logits(loaded, ids, rank=None, chunk=16, keep=serving.ExactKeep(2, 16, True))
        torch.testing.assert_close(
            serving.chunked_logits(loaded, ids, keep=keep, params=zero, **kw), untrained
        )
        torch.testing.assert_close(
            serving.chunked_logits(loaded, ids, keep=keep, params=shut, **kw), alone, rtol=1e-4, atol=1e-4
        )
    assert not torch.allclose(untrained, alone, atol=1e-3)  # the middle is read at b = 0


def test_window_objective_reads_no_later_token(load):
    """The stage-2 loss with a window, sinks and running sums, gradients on: perturbing tokens from p on
    leaves every loss predicting a token before p unchanged."""
    loaded = load("tiny-llama")
    ids = _ids(6)
    other = ids.clone()
    p = 70
    other[0, p:] = torch.randint(5, 1000, (ids.shape[1] - p,), generator=torch.Generator().manual_seed(7))
    cfg = TuneConfig(
        model="tiny-llama", rank=4, form="pksoftmax", window=16, sinks=2, basis_update="moments",
        basis_from="keys", seq_len=96, chunk=16,
    )  # fmt: skip
    o = cfg.stream_options()
    f, c, m = o.pop("form"), o.pop("chunk"), o.pop("rank_mode")
    a, _ = objectives.decoder_losses(loaded, ids, cfg.rank, f, c, m, None, False, **o)
    b, _ = objectives.decoder_losses(loaded, other, cfg.rank, f, c, m, None, False, **o)
    assert a.requires_grad
    o.pop("keep")  # the same loss without the window: the options really carry it
    assert not torch.allclose(
        a, objectives.decoder_losses(loaded, ids, cfg.rank, f, c, m, None, False, **o)[0]
    )
    n = p - c - 1
    torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=1e-6)
    assert not torch.allclose(a[n:], b[n:])


def test_a_window_run_trains_the_gate_saves_and_reloads(tmp_path):
    """Both stages with a window, sinks, a fixed rank and running sums: the gate ``b`` is trained and
    saved, the JSON and the sidebar label say the setting, and the reloaded folder reproduces the metrics
    under that same setting."""
    from atp_viz.analysis.finetune import evaluation

    cfg = TuneConfig(
        model="tiny-llama", rank=4, form="pksoftmax", window=16, sinks=2, basis_update="moments",
        basis_from="keys", seq_len=96, chunk=16, transfer_steps=2, steps=2, eval_windows=2, lr=3e-2,
    )  # fmt: skip
    res = training.train(cfg, tmp_path / "run", texts=[SHORT])
    meta = json.loads((tmp_path / "run" / tuned.SETTINGS_FILE).read_text())
    s = meta["settings"]
    assert (s["rank"], s["window"], s["sinks"], s["basis_update"]) == (4, 16, 2, "moments")
    assert (
        "the 16 tokens before it exactly" in meta["metrics"]["what"]
        and "r = 4 principal keys" in meta["metrics"]["what"]
    )
    params = tuned.load_params(tmp_path / "run")["pksoftmax"]
    assert any(float(p["b"].abs().max()) > 0 for p in params.values())  # the gate moved
    loaded = models.load_model(f"tuned:{tmp_path / 'run'}")
    assert "window 16" in loaded.info.label
    again = evaluation.evaluate(models.load_model("tiny-llama"), loaded, cfg)["rows"]
    for name in ("atp_untuned", "atp_tuned"):
        assert again[name]["perplexity"] == pytest.approx(res.metrics["rows"][name]["perplexity"], rel=1e-5)
    assert again["atp_tuned"]["perplexity"] != pytest.approx(again["atp_untuned"]["perplexity"], rel=1e-6)
    # `perplexity --model tuned:DIR` reads the run as it was tuned (window, sinks, running sums) by default:
    # its pksoftmax row is the run's own tuned figure; exact cannot use running sums and recomputes.
    from atp_viz.cli import main

    out = tmp_path / "ppl.json"
    argv = ["perplexity", "--model", f"tuned:{tmp_path / 'run'}", "--windows", "2", "--seq-len", "96"]
    assert (
        main([*argv, "--chunk", "16", "--ranks", "4", "--forms", "pksoftmax,exact", "--json", str(out)]) == 0
    )
    ppl = json.loads(out.read_text())
    assert (ppl["exact_window"], ppl["exact_sinks"], ppl["basis_update"]) == (16, 2, "moments")
    rows = {r["form"]: r for r in ppl["rows"] if r["rank"] == 4}
    assert rows["pksoftmax"]["perplexity"] == pytest.approx(
        res.metrics["rows"]["atp_tuned"]["perplexity"], rel=1e-5
    )
    assert (rows["pksoftmax"]["basis_update"], rows["exact"]["basis_update"]) == ("moments", "recompute")
    assert (
        main(
            [*argv, "--chunk", "16", "--ranks", "4", "--forms", "exact", "--window", "0", "--json", str(out)]
        )
        == 0
    )
    ppl = json.loads(out.read_text())  # no window asked for: none, and no sinks either (they need one)
    assert (ppl["exact_window"], ppl["exact_sinks"]) == (0, 0) and "--window 0 (tuned: 16)" in ppl[
        "not_as_tuned"
    ]
    # `bench --prefill` reads it as tuned too: its form, keys, chunk, window, sinks and basis update
    argv = ["bench", "--prefill", "--model", f"tuned:{tmp_path / 'run'}", "--tokens", "64", "--repeats", "1",
            "--max-repeats", "1", "--basis-method", "exact", "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert (r["form"], r["rank"], r["chunk"], r["basis_from"], r["basis_update"]) == (
        "pksoftmax",
        4,
        16,
        "keys",
        "moments",
    )
    assert (r["exact_window"], r["exact_sinks"]) == (16, 2)
    # `compare` reads one text in one pass: the run's form, basis and rank by default, and it says that
    # the window is not read, and which command reads it.
    text = tmp_path / "t.txt"
    text.write_text(SHORT)
    argv = ["compare", "--model", f"tuned:{tmp_path / 'run'}", "--text-file", str(text), "--new-tokens", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert (got["config"]["rank"], got["config"]["form"], got["config"]["basis_source"]) == (
        4,
        "pksoftmax",
        "keys",
    )
    assert "exact window 16 + 2 sinks" in got["not_as_tuned"] and "perplexity --model" in got["not_as_tuned"]


def test_window_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sinks need a window"):
        TuneConfig(sinks=4)
    with pytest.raises(ValueError, match="rank_mode must be 'past'"):
        TuneConfig(window=64, rank_mode="effective")
    with pytest.raises(ValueError, match="recompute"):
        TuneConfig(form="exact", basis_update="moments")
    with pytest.raises(ValueError, match="share of L"):
        TuneConfig(rank=0)
    for bad in (dict(rank=8), dict(window=16), dict(basis_update="moments", form="linear")):
        with pytest.raises(ValueError, match="for decoders"):
            training.train(TuneConfig(model="tiny-bert", steps=1, **bad), tmp_path / "enc")


def test_run_labels_name_the_window_one_way():
    """A run's sidebar label, its config label and its sentence name the exact window the same way, and a
    dense control's label leads with what it is (its rank is only where its ATP rows start)."""
    s = {"model": "smollm2", "rank": 128, "form": "pksoftmax", "basis_from": "keys", "window": 512,
         "sinks": 4, "basis_update": "moments"}  # fmt: skip
    cfg = TuneConfig(model="smollm2", rank=128, form="pksoftmax", basis_from="keys", window=512, sinks=4,
                     basis_update="moments")  # fmt: skip
    for text in (tuned.tuned_label({"settings": s}), cfg.label(), tuned.trained_setting(s)):
        assert "exact window 512 + 4 sinks" in text, text
    control = {"model": "smollm2", "rank": 0.5, "form": "exact", "attention": "dense"}
    label = tuned.tuned_label({"settings": control})
    assert label.startswith("SmolLM2-135M-Instruct + dense-tuned control (trained without ATP"), label


def test_at_e_one_half_a_past_of_one_repeated_token_is_read_as_dense_attention_reads_it():
    """n copies of one key/value compressed to r = 1 principal key: K' = sqrt(n) k, V' / sqrt(n) = v. With
    the logit scale t / n^e at e = 1/2 and the mass log(n / r), the streaming step weighs the past exactly
    as a softmax over the n copies does; at e = 0 (the untrained form) its logit is sqrt(n) times too
    large."""
    from atp_viz import forms

    g = torch.Generator().manual_seed(8)
    Hkv, G, C, dh, n = 2, 2, 5, 8, 40
    q = torch.randn(Hkv * G, C, dh, generator=g, dtype=torch.float64)
    k = torch.randn(Hkv, C, dh, generator=g, dtype=torch.float64)
    v = torch.randn(Hkv, C, dh, generator=g, dtype=torch.float64)
    kp = torch.randn(Hkv, 1, dh, generator=g, dtype=torch.float64)
    vp = torch.randn(Hkv, 1, dh, generator=g, dtype=torch.float64)
    past = forms.compress(
        torch.full((n, 1), n**-0.5, dtype=torch.float64), kp.expand(Hkv, n, dh), vp.expand(Hkv, n, dh)
    )
    keys, vals = torch.cat([kp.expand(Hkv, n, dh), k], 1), torch.cat([vp.expand(Hkv, n, dh), v], 1)
    dense = forms.get("exact").stream(q, keys, vals, None, scaling=dh**-0.5)  # the n copies read exactly
    f, H = forms.get("pksoftmax"), Hkv * G
    half = f.stream(q, k, v, past, scaling=dh**-0.5, params={"e": torch.full((H,), 0.5, dtype=torch.float64)})
    torch.testing.assert_close(half, dense, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(f.stream(q, k, v, past, scaling=dh**-0.5), dense, atol=1e-3)


def test_form_init_sets_where_the_parameters_start(load):
    cfg = TuneConfig(model="tiny-llama", form="pksoftmax", form_init="e=0.5, b=-2")
    assert cfg.initial_params() == {"e": 0.5, "b": -2.0}
    params = training._form_parameters(cfg, load("tiny-llama"))
    first = params[0]
    assert torch.all(first["e"] == 0.5) and torch.all(first["b"] == -2.0) and torch.all(first["t"] == 1.0)
    assert first["e"].requires_grad and len(params) == load("tiny-llama").info.n_layers
    with pytest.raises(ValueError, match="no parameter 'm'"):
        TuneConfig(form="pksoftmax", form_init="m=1")
    with pytest.raises(ValueError, match="name=number"):
        TuneConfig(form="pksoftmax", form_init="e=half")
    with pytest.raises(ValueError, match="none"):
        TuneConfig(form="exact", form_init="e=0.5")
    with pytest.raises(ValueError, match="dense control"):
        TuneConfig(form="pksoftmax", attention="dense", form_init="e=0.5")


def test_at_e_one_half_the_whole_text_form_reads_a_text_written_twice_as_the_text():
    """Over the whole text: every token written twice doubles n and scales K' by sqrt(2) (U_r becomes
    [U_r; U_r] / sqrt(2)), so at e = 1/2 the principal keys' logits and V' / sqrt(n) are unchanged and so is
    each query's output; at e = 0 the logits grow by sqrt(2)."""
    from atp_viz import forms
    from atp_viz.core.basis import principal_basis

    g = torch.Generator().manual_seed(9)
    B, H, Hkv, n, dh, d, r = 1, 4, 2, 12, 8, 10, 4
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, n, dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, n, dh, generator=g, dtype=torch.float64) for _ in range(2))
    f, half = forms.get("pksoftmax"), {"e": torch.full((H,), 0.5, dtype=torch.float64)}
    twice = torch.cat([x, x], 1), torch.cat([q, q], 2), torch.cat([k, k], 2), torch.cat([v, v], 2)
    one = f.attend(q, k, v, principal_basis(x, r), params=half)
    two = f.attend(*twice[1:], principal_basis(twice[0], r), params=half)
    torch.testing.assert_close(two[:, :, :n], one, rtol=1e-8, atol=1e-10)
    base = f.attend(q, k, v, principal_basis(x, r))
    assert not torch.allclose(f.attend(*twice[1:], principal_basis(twice[0], r))[:, :, :n], base, atol=1e-4)


def test_prefill_of_a_tuned_run_is_also_scored_against_the_original_dense_model(tmp_path):
    """``bench --prefill --model tuned:DIR`` times the tuned model dense against ATP and scores its ATP
    prefill against the untouched base model's dense prefill on the same positions as well: that original
    perplexity is the base model's own dense perplexity there."""
    from atp_viz.analysis.bench import prefill
    from atp_viz.cli import main

    cfg = TuneConfig(model="tiny-llama", rank=4, seq_len=96, chunk=16, steps=1, eval_windows=1, lr=3e-2)
    training.train(cfg, tmp_path / "run", texts=[SHORT])
    out = tmp_path / "prefill.json"
    argv = ["bench", "--prefill", "--model", f"tuned:{tmp_path / 'run'}", "--tokens", "64", "--form", "exact"]
    argv += ["--rank", "4", "--chunk", "16", "--repeats", "1", "--max-repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    base = prefill.run_prefill(models.load_model("tiny-llama"), 64, form="exact", rank=4, chunk=16, repeats=1,
                               max_repeats=1)  # fmt: skip
    assert r["original_dense_perplexity"] == pytest.approx(base["dense_perplexity"], rel=1e-5)
    assert r["dense_perplexity"] != pytest.approx(base["dense_perplexity"], rel=1e-6)  # the tuned weights
    want = r["atp_perplexity"] / r["original_dense_perplexity"]
    assert r["perplexity_ratio_to_original_dense"] == pytest.approx(want, rel=1e-5)
    assert "perplexity_ratio_to_original_dense" not in base


def test_the_serving_page_reads_a_window_run_as_it_was_tuned(tmp_path, monkeypatch):
    """Selecting a run tuned behind an exact window, the Serving page's perplexity starts from its window,
    sinks and basis update, and each row says whether it used running sums."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from atp_viz.hf.model_info import TUNED_PREFIX

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    cfg = TuneConfig(
        model="tiny-llama", rank=4, form="pksoftmax", window=16, sinks=2, basis_update="moments",
        seq_len=96, chunk=16, steps=1, eval_windows=1,
    )  # fmt: skip
    run = training.train(cfg, texts=[SHORT]).out_dir
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.switch_page("pages/serving.py")
    at.query_params["model"] = f"{TUNED_PREFIX}{run}"
    at.run()
    assert not at.exception, at.exception
    assert (at.number_input(key="ppl_window").value, at.number_input(key="ppl_sinks").value) == (16, 2)
    assert at.radio(key="ppl_update").value == "moments"
    assert (at.number_input(key="ppl_seq").value, at.number_input(key="ppl_chunk").value) == (96, 16)
    assert at.radio(key="serve_form").value == "pksoftmax"  # generation too starts in the run's form
    at.selectbox(key="model_choice").set_value("tiny-llama").run()
    assert at.radio(key="serve_form").value == forms.DEFAULT  # and another model in the default
    at.selectbox(key="model_choice").set_value(f"{TUNED_PREFIX}{run}").run()
    at.number_input(key="ppl_windows").set_value(1).run()
    at.number_input(key="ppl_seq").set_value(96).run()
    at.number_input(key="ppl_chunk").set_value(16).run()
    at.multiselect(key="ppl_ranks").set_value([8]).run()
    at.multiselect(key="ppl_forms").set_value(["pksoftmax", "exact"]).run()
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    by_form = dict(zip(table["form"], table["rank"], strict=False))
    assert by_form["pksoftmax"].endswith("(running sums)") and not by_form["exact"].endswith("(running sums)")
