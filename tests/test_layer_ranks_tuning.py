"""Per-layer ranks chosen by what each layer's rank costs the output, and fine-tuning with them: the
choice is the best split of the budget, each layer is measured alone, and a run trains, evaluates and
labels itself with its own per-layer ranks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from atp_viz.analysis import allocation
from atp_viz.analysis.finetune import evaluation, training
from atp_viz.analysis.finetune.config import TuneConfig
from atp_viz.cli import main
from atp_viz.core.ranks import format_layer_shares
from atp_viz.hf import tuned
from atp_viz.hf.engine import ATPConfig
from atp_viz.outputs.result_tuning import render_runs

TEXTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Open the file and return a stream; raise OSError when the file cannot be opened.",
    "The queue is thread safe: put and get may be called from several threads at once.",
    "Split the string at the separator and return a list of the pieces, left to right.",
]


@pytest.mark.parametrize("seed", range(6))
def test_measured_allocation_is_the_best_split_of_the_budget(seed):
    """Brute force over every split with the same total, on curves of any shape (not concave, not even
    falling): none costs less. A greedy step-by-step choice fails on such curves."""
    rng = np.random.default_rng(seed)
    n_layers, grid = 3, 5
    losses = rng.random((n_layers, grid))
    for share in (0.2, 0.4, 0.6, 1.0):
        shares = allocation.allocate_measured(losses, share)
        steps = [round(x * grid) for x in shares]
        total = round(share * grid * n_layers)
        assert sum(steps) == total and min(steps) >= 1 and max(steps) <= grid
        best = min(
            sum(losses[i, k - 1] for i, k in enumerate(split))
            for split in itertools.product(range(1, grid + 1), repeat=n_layers)
            if sum(split) == total
        )
        assert sum(losses[i, k - 1] for i, k in enumerate(steps)) == pytest.approx(best)
    with pytest.raises(ValueError, match="budget"):
        allocation.allocate_measured(losses, 0.0)


def test_layer_losses_run_one_layer_at_a_time(load):
    loaded = load("minilm")
    losses = allocation.layer_losses(loaded, TEXTS, grid=2)
    assert losses.shape == (loaded.info.n_layers, 2)
    assert np.all(np.abs(losses[:, -1]) < 1e-5)  # the exact form at full rank is dense
    dense = evaluation.embeddings(loaded, None, TEXTS, 128)

    def loss(cfg):
        return 1 - float((evaluation.embeddings(loaded, cfg, TEXTS, 128) * dense).sum(-1).mean())

    alone = loss(ATPConfig(rank=0.5, layers=(1,)))
    assert losses[1, 0] == pytest.approx(alone, rel=1e-6) and alone > 1e-4
    centred = allocation.layer_losses(loaded, TEXTS, grid=2, centre_basis=True)  # what a centred run costs
    alone_centred = loss(ATPConfig(rank=0.5, layers=(1,), centre_basis=True))
    assert centred[1, 0] == pytest.approx(alone_centred, rel=1e-6) and abs(alone_centred - alone) > 1e-5
    assert loss(ATPConfig(rank=0.5)) > 2 * alone  # every layer at once is not what was measured
    with pytest.raises(ValueError, match="encoders"):
        allocation.layer_losses(load("tiny-llama"), TEXTS)


def test_choosing_per_layer_ranks_reads_and_refuses(load):
    loaded = load("tiny-bert")
    assert allocation.choose_layer_ranks("0.5, L/4", loaded, 0.375) == ((0.5, 0.25), "given")
    shares, source = allocation.choose_layer_ranks("measured", loaded, 0.25)
    assert source == "measured" and len(shares) == 2 and np.mean(shares) == pytest.approx(0.25)
    for bad, match in (("3,4", "not key counts"), ("0.5", "2 layers"), ("half", "Cannot read")):
        with pytest.raises(ValueError, match=match):
            allocation.choose_layer_ranks(bad, loaded, 0.5)
    with pytest.raises(ValueError, match="share of L"):
        allocation.choose_layer_ranks("measured", loaded, 16)
    # a grid's choice: a split for every budget, or given shares for their own mean only
    split = allocation.budget_splitter("spectrum", loaded)
    assert all(np.mean(split(b)) == pytest.approx(b, abs=1 / 64) for b in (0.5, 0.25))
    given = allocation.budget_splitter("0.5, L/4", loaded)
    assert given(0.375) == (0.5, 0.25) == given(0.375 + 1e-7) and given(0.5) is None
    # a run tuned with shares records its rank, which the split's rounding may leave off their mean
    as_tuned = allocation.budget_splitter("0.5, L/4", loaded, budget=0.38)
    assert as_tuned(0.38) == (0.5, 0.25) and as_tuned(0.375) is None
    with pytest.raises(ValueError, match="2 layers"):
        allocation.budget_splitter("0.5", loaded)


def test_the_config_keeps_one_budget_and_keys_its_cached_scores_by_the_ranks():
    cfg = TuneConfig(rank=0.375, layer_ranks=[0.5, 0.25], layer_ranks_from="given")  # a JSON list
    assert cfg.layer_ranks == (0.5, 0.25) and hash(cfg)
    assert cfg.atp_config().layer_ranks == (0.5, 0.25) and "per layer" in cfg.label()
    assert TuneConfig(**json.loads(json.dumps(vars(cfg)))) == cfg  # how --reevaluate reads it back
    uniform = TuneConfig(rank=0.375)
    assert uniform.atp_config().layer_ranks is None
    # an untuned score cached by a uniform run must not stand in for a per-layer one (and vice versa)
    assert evaluation._cache_path(cfg, "atp_untuned", 8) != evaluation._cache_path(uniform, "atp_untuned", 8)
    assert evaluation._cache_path(cfg, "dense", 8) == evaluation._cache_path(uniform, "dense", 8)
    with pytest.raises(ValueError, match="one budget"):
        TuneConfig(rank=0.5, layer_ranks=(0.5, 0.25), layer_ranks_from="given")
    with pytest.raises(ValueError, match="needs the ranks"):
        TuneConfig(layer_ranks_from="given")
    with pytest.raises(ValueError, match="layer_ranks_from"):
        TuneConfig(rank=0.5, layer_ranks=(0.5, 0.5))
    with pytest.raises(ValueError, match="not key counts"):
        TuneConfig(model="tiny-llama", rank=64, layer_ranks_from="measured")
    pending = TuneConfig(model="tiny-bert", rank=0.25, layer_ranks_from="measured")
    with pytest.raises(ValueError, match="not chosen yet"):  # never one rank for every layer instead
        pending.atp_config()


def test_training_chooses_measured_ranks_when_it_starts(load, tmp_path):
    pending = TuneConfig(model="tiny-bert", rank=0.25, layer_ranks_from="measured", steps=0, eval_texts=2)
    res = training.train(pending, tmp_path / "run", texts=TEXTS)
    cfg = res.config
    assert cfg.layer_ranks_from == "measured" and len(cfg.layer_ranks) == 2
    assert np.mean(cfg.layer_ranks) == pytest.approx(0.25) and cfg.atp_config().layer_ranks == cfg.layer_ranks
    meta = json.loads((tmp_path / "run" / tuned.SETTINGS_FILE).read_text())
    assert meta["settings"]["layer_ranks"] == list(cfg.layer_ranks) and meta["layer_ranks_seconds"] > 0
    chosen = TuneConfig(model="tiny-bert", rank=0.375, layer_ranks=(0.5, 0.25), layer_ranks_from="given")
    assert training._choose_layer_ranks(chosen, load("tiny-bert"), lambda f, m: None) is chosen


def test_the_runs_tables_caption_is_no_one_runs_per_layer_ranks():
    """The caption under the README's runs table says what every row scored; a run with its own per-layer
    ranks (each row shows its shares) must not lend it its note, whichever file sorts first."""
    from pathlib import Path

    runs_dir = Path(__file__).resolve().parent.parent / "docs" / "finetune-runs"
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("minilm-exact-keys-*r0.25*.json"))]
    per_layer = [r for r in runs if r["settings"].get("layer_ranks")]
    assert per_layer and runs[0] is per_layer[0]  # the case: a per-layer run sorts first
    caption = render_runs(runs).split("\n\n", 1)[1]
    assert "per-layer ranks" not in caption and "475 held-out texts" in caption


def test_a_centred_setting_chooses_its_ranks_with_the_centred_basis(load, tmp_path, monkeypatch):
    """A centred run, and compare --centre-basis, split the budget by what the centred basis keeps or
    costs, not by the plain basis's measurement."""
    seen = []

    def choose(how, loaded, share, **kwargs):
        seen.append(kwargs.get("centre_basis"))
        return (share, share), how

    monkeypatch.setattr(allocation, "choose_layer_ranks", choose)
    pending = TuneConfig(model="tiny-bert", rank=0.5, layer_ranks_from="measured", centre_basis=True)
    assert training._choose_layer_ranks(pending, load("tiny-bert"), lambda f, m: None).layer_ranks == (
        0.5,
        0.5,
    )
    text = tmp_path / "t.txt"
    text.write_text(TEXTS[0])
    argv = ["compare", "--model", "tiny-bert", "--text-file", str(text), "--layer-ranks", "measured"]
    assert main([*argv, "--centre-basis", "--json", str(tmp_path / "c.json")]) == 0
    assert main([*argv, "--json", str(tmp_path / "p.json")]) == 0
    assert seen == [True, True, False]


def test_a_run_trains_and_evaluates_with_its_per_layer_ranks(tmp_path, monkeypatch):
    seen = []
    real = training.encoder_distillation

    def spy(tuned_model, texts, atp, *a, **kw):
        seen.append(atp)
        return real(tuned_model, texts, atp, *a, **kw)

    monkeypatch.setattr(training, "encoder_distillation", spy)
    shares = (1.0, 0.25, 0.25, 0.25, 0.25, 0.25)
    cfg = TuneConfig(
        model="minilm", rank=0.375, layer_ranks=shares, layer_ranks_from="given", steps=1, batch=4,
        eval_texts=4,
    )  # fmt: skip
    res = training.train(cfg, tmp_path / "run", texts=TEXTS)
    assert seen and all(a.layer_ranks == shares for a in seen)
    meta = json.loads((tmp_path / "run" / tuned.SETTINGS_FILE).read_text())
    assert meta["settings"]["layer_ranks"] == list(shares) == meta["metrics"]["layer_ranks"]
    assert "per-layer ranks" in meta["metrics"]["what"]
    assert "per-layer ranks (given)" in tuned.tuned_label(meta)
    assert tuned.trained_setting(meta["settings"]).startswith("r = 0.375 L on average, per layer")
    row = render_runs([meta]).splitlines()[2]  # the README's runs table
    assert "per-layer ranks (given)" in row and "on average (1, 0.25, 0.25, 0.25, 0.25, 0.25)" in row
    # the untuned row ran the run's per-layer ranks, not the one rank
    cos = res.metrics["rows"]["atp_untuned"]["cosine_mean"]
    base = training.load_model("minilm")
    one_rank = TuneConfig(model="minilm", rank=0.375, eval_texts=4)
    uniform = evaluation.evaluate(base, base, one_rank, cache=False)["rows"]["atp_untuned"]["cosine_mean"]
    assert abs(cos - uniform) > 1e-6
    # compare checks any text with the run's ranks by default, and says when it is run without them
    text, out = tmp_path / "t.txt", tmp_path / "c.json"
    text.write_text(TEXTS[0])
    argv = ["compare", "--model", f"tuned:{tmp_path / 'run'}", "--text-file", str(text)]
    typed = "1.0,0.25,0.25,0.25,0.25,0.25"
    for given in ([], ["--rank", "0.375"], ["--rank", "0.375", "--layer-ranks", typed]):
        assert main([*argv, *given, "--json", str(out)]) == 0
        got = json.loads(out.read_text())
        assert "not_as_tuned" not in got and len(got["layer_ranks"]) == 6, given
    assert main([*argv, "--layer-ranks", "one", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert f"--layer-ranks {typed}" in got["not_as_tuned"] and "layer_ranks" not in got
    assert main([*argv, "--rank", "0.5", "--json", str(out)]) == 0  # another budget: one rank, said
    assert "--rank 0.375" in json.loads(out.read_text())["not_as_tuned"]


def test_per_layer_ranks_are_refused_where_they_do_not_apply(tmp_path):
    with pytest.raises(ValueError, match="for encoders"):
        training.train(
            TuneConfig(model="tiny-llama", rank=0.5, layer_ranks_from="measured", seq_len=48, chunk=16),
            tmp_path / "dec",
        )
    with pytest.raises(ValueError, match="has 2 layers"):
        training.train(
            TuneConfig(model="tiny-bert", rank=0.5, layer_ranks=(0.5,) * 3, layer_ranks_from="given"),
            tmp_path / "enc",
        )
    # --reevaluate measures a run with its own ranks: a --layer-ranks next to it would be ignored
    assert main(["finetune", "--reevaluate", str(tmp_path), "--layer-ranks", "measured"]) == 2


def test_the_explorer_runs_a_per_layer_run_as_it_was_tuned(tmp_path, monkeypatch):
    """For a run tuned with per-layer ranks the explorer offers its own ranks: until they are picked it
    says the rows run other ranks (and gives the command); picked, every layer runs its tuned share."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from atp_viz.core.ranks import resolve_rank
    from atp_viz.hf.model_info import TUNED_PREFIX

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    cfg = TuneConfig(
        model="tiny-bert",
        rank=0.375,
        layer_ranks=(0.5, 0.25),
        layer_ranks_from="given",
        steps=0,
        eval_texts=2,
    )
    run = training.train(cfg, texts=TEXTS).out_dir
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.switch_page("pages/explorer.py")
    at.query_params["model"] = f"{TUNED_PREFIX}{run}"
    at.run()
    assert not at.exception, at.exception
    notes = [i.value for i in at.info if "its own rank per layer" in i.value]
    assert notes and "--rank 0.375 --layer-ranks 0.5,0.25" in notes[0]
    at.radio(key="basis_source").set_value("keys").run()  # a second difference: both are said
    assert [i for i in at.info if "its own rank per layer" in i.value]
    assert [i for i in at.info if "never trained for" in i.value]
    at.radio(key="basis_source").set_value("input").run()
    at.radio(key="layer_split").set_value("tuned").run()
    assert not at.exception, at.exception
    assert not [i.value for i in at.info if "its own rank per layer" in i.value]
    assert any("as tuned: 0.5,0.25" in c.value for c in at.caption)
    layer_rs = next(c.value for c in at.caption if c.value.startswith("Each ATP layer's r"))
    n = int(at.subheader[0].value.split("of L = ")[1].split()[0])
    want = ", ".join(str(resolve_rank(share, n)[0]) for share in (0.5, 0.25))
    assert layer_rs == f"Each ATP layer's r on this text: {want}."
    assert "on average over the layers" in at.subheader[0].value


def test_a_split_is_measured_once_per_weights_form_and_basis(load, tmp_path, monkeypatch):
    """The budget-free measurement behind a split is kept on disk: read back for any budget, measured
    again for other weights or another form, never for a new budget."""
    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    loaded = load("tiny-bert")
    calls = []
    real = allocation.layer_losses

    def counted(*args, **kwargs):
        calls.append(kwargs.get("form") + (" centred" if kwargs.get("centre_basis") else ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(allocation, "layer_losses", counted)
    first = allocation.split_measurement("measured", loaded, texts=TEXTS)
    assert allocation.split_measurement("measured", loaded, texts=TEXTS).tolist() == first.tolist()
    assert calls == ["exact"]
    for share in (0.25, 0.5, 0.75):
        assert allocation.choose_layer_ranks("measured", loaded, share)[0] == allocation.split_budget(
            "measured", allocation.split_measurement("measured", loaded), share
        )
    assert calls == ["exact", "exact"]  # the default calibration texts: measured once for all budgets
    allocation.split_measurement("measured", loaded, texts=TEXTS, form="linear")
    assert calls[-1] == "linear"
    with torch.no_grad():
        weight = loaded.model.get_input_embeddings().weight
        weight[0, 0] += 1.0
        try:
            allocation.split_measurement("measured", loaded, texts=TEXTS)
        finally:
            weight[0, 0] -= 1.0
    assert calls == ["exact", "exact", "linear", "exact"]
    allocation.split_measurement("measured", loaded, texts=TEXTS, centre_basis=True)  # another basis
    allocation.split_measurement("measured", loaded, texts=TEXTS, centre_basis=True)
    assert calls == ["exact", "exact", "linear", "exact", "exact centred"]
    with pytest.raises(ValueError, match="'spectrum' or 'measured'"):
        allocation.split_measurement("energy", loaded)


def test_a_comparison_with_per_layer_ranks_reports_each_layers_rank(load):
    """With per-layer ranks the one r shown is the budget's, not whichever layer ran last, and every
    layer's own r is reported."""
    from atp_viz.analysis import compare
    from atp_viz.core.ranks import resolve_rank
    from atp_viz.text.inputs import tokenize

    loaded = load("tiny-bert")
    tok = tokenize(loaded.tokenizer, " ".join(TEXTS), 64)
    n = tok.n_tokens
    dense = compare.forward(loaded, tok)
    cfg = ATPConfig(rank=0.375, layer_ranks=(0.5, 0.25))
    d = compare.compare(dense, compare.forward(loaded, tok, cfg)).as_dict()

    def r(share):
        return resolve_rank(share, n)[0]

    assert d["rank"] == r(0.375) and d["layer_ranks"] == [r(0.5), r(0.25)]
    one = compare.compare(dense, compare.forward(loaded, tok, ATPConfig(rank=0.25))).as_dict()
    assert one["rank"] == r(0.25) and "layer_ranks" not in one


@pytest.mark.parametrize("basis_update", ["recompute", "moments", "window"])
def test_a_decoders_chunked_past_takes_each_layers_own_rank(load, monkeypatch, basis_update):
    """In the strictly causal chunked mode every layer compresses its past to its own rank: the same share
    in every layer is the one rank, full shares are dense (exact form), each layer's r is the one asked
    for, and nothing after a position reaches it."""
    from atp_viz.analysis import serving
    from atp_viz.core.ranks import chunk_rank

    loaded = load("tiny-llama")
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (1, 64))
    form = "pksoftmax" if basis_update == "moments" else "exact"
    kw = {"form": form, "chunk": 16, "basis_from": "keys", "basis_update": basis_update}
    if basis_update == "window":  # sinks and a window read exactly, the middle at each layer's rank
        kw.update(basis_update="recompute", keep=serving.ExactKeep(2, 8))
    with torch.no_grad():
        one = serving.chunked_logits(loaded, ids, rank=0.25, **kw)
        same = serving.chunked_logits(loaded, ids, rank=0.25, layer_ranks=(0.25, 0.25), **kw)
        mixed = serving.chunked_logits(loaded, ids, rank=0.5, layer_ranks=(0.75, 0.25), **kw)
        dense = serving.chunked_logits(loaded, ids, rank=None, layer_ranks=(0.75, 0.25), **kw)
        swapped = serving.chunked_logits(loaded, ids, rank=0.5, layer_ranks=(0.25, 0.75), **kw)
        first = serving.chunked_logits(loaded, ids, rank=0.75, **kw)
    torch.testing.assert_close(same, one, rtol=0, atol=0)
    for other in (one, dense, swapped, first):  # each layer at its own rank, in layer order
        assert not torch.allclose(mixed, other, atol=1e-4)
    if basis_update == "recompute":  # the whole past kept in every layer is dense attention
        with torch.no_grad():
            full = serving.chunked_logits(loaded, ids, rank=1.0, layer_ranks=(1.0, 1.0), **kw)
        torch.testing.assert_close(full, dense, rtol=1e-4, atol=1e-4)
        seen = []
        real = serving.compressed
        monkeypatch.setattr(serving, "compressed", lambda m, r, **k: seen.append(r) or real(m, r, **k))
        with torch.no_grad():
            serving.chunked_logits(loaded, ids, rank=0.5, layer_ranks=(0.75, 0.25), **kw)
        # chunks 1..3, layers in order: each layer's share of its past (16, 32, 48 tokens)
        want = [chunk_rank(share, start, 16, "past") for start in (16, 32, 48) for share in (0.75, 0.25)]
        assert seen == want
    other = ids.clone()
    other[0, 40:] = torch.randint(5, 1000, (24,))
    with torch.no_grad():
        changed = serving.chunked_logits(loaded, other, rank=0.5, layer_ranks=(0.75, 0.25), **kw)
    torch.testing.assert_close(changed[:40], mixed[:40], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 per-layer ranks given; the model has 2 layers"):
        serving.chunked_logits(loaded, ids, rank=0.5, layer_ranks=(0.5,) * 3, **kw)


def test_a_decoder_run_trains_and_evaluates_with_per_layer_ranks(load, tmp_path, monkeypatch):
    """A decoder run with per-layer ranks from the spectra: chosen when it starts, used by both stages and
    the evaluation's ATP rows (whose attended share is the layers' mean), recorded in its JSON."""
    from atp_viz.analysis import protocol, serving

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path / "cache"))
    seen = []
    real = serving.chunked_logits

    def spy(loaded, ids, **kw):
        if kw.get("rank") is not None:
            seen.append(kw.get("layer_ranks"))
        return real(loaded, ids, **kw)

    monkeypatch.setattr(serving, "chunked_logits", spy)
    cfg = TuneConfig(
        model="tiny-llama", rank=0.25, layer_ranks_from="spectrum", seq_len=48, chunk=16, steps=1,
        transfer_steps=1, eval_windows=2,
    )  # fmt: skip
    res = training.train(cfg)  # into the cache's tuned runs, which the app's links may name
    run = res.out_dir
    shares = res.config.layer_ranks
    assert len(shares) == 2 and np.mean(shares) == pytest.approx(0.25, abs=1 / 64)
    assert seen and all(tuple(r) == shares for r in seen)  # stage 1, stage 2 and the evaluation
    meta = json.loads((run / tuned.SETTINGS_FILE).read_text())
    assert meta["settings"]["layer_ranks"] == list(shares) and "per-layer ranks" in meta["metrics"]["what"]
    # the attended share reported is the layers' mean (here far from the budget the rank labels)
    windows = protocol.heldout_windows(load("tiny-llama").tokenizer, 48, max_windows=2)
    got = protocol.score_decoder(load("tiny-llama"), windows, rank=0.25, form="exact", chunk=16,
                                 rank_mode="effective", layer_ranks=(1.0, 0.5)).shares  # fmt: skip
    want = np.mean([protocol.mean_share(s, 48, 16, "effective") for s in (1.0, 0.5)])
    assert got == [pytest.approx(want)] and want > protocol.mean_share(0.25, 48, 16, "effective") + 0.1
    # `perplexity` reads the run as it was tuned: its shares at its budget, one rank at another budget,
    # and one rank everywhere when told so
    seen.clear()
    argv = ["perplexity", "--model", f"tuned:{run}", "--forms", "exact", "--windows", "1"]
    argv += ["--seq-len", "48", "--chunk", "16", "--rank-mode", "effective", "--ranks", "0.25,0.5"]
    assert main([*argv, "--json", str(tmp_path / "p.json")]) == 0
    rows = {r["rank"]: r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert rows[0.25]["layer_ranks"] == list(shares) and "layer_ranks" not in rows[0.5]
    assert main([*argv, "--layer-ranks", "one", "--json", str(tmp_path / "p.json")]) == 0
    assert not any("layer_ranks" in r for r in json.loads((tmp_path / "p.json").read_text())["rows"])
    # its own shares typed out serve its own budget, whatever their mean's rounding
    own = ["--ranks", "0.25", "--layer-ranks", format_layer_shares(shares)]
    assert main([*argv[:-2], *own, "--json", str(tmp_path / "p.json")]) == 0
    # without --ranks: the default key counts and the run's own budget, read with its shares
    assert main([*argv[:-2], "--json", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["rank"] for r in rows] == ["original dense", "dense", 16, 32, 64, 128, 0.25]
    assert rows[-1]["layer_ranks"] == list(shares)
    # the Serving page starts out the same way: the run's budget among the ranks, read with its shares
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.switch_page("pages/serving.py")
    at.query_params["model"] = f"tuned:{run}"
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="ppl_layer_split").value == "tuned" and 0.25 in at.multiselect(key="ppl_ranks").value
    for key, value in (("ppl_windows", 1), ("ppl_seq", 48), ("ppl_chunk", 16)):
        at.number_input(key=key).set_value(value).run()
    at.multiselect(key="ppl_forms").set_value(["exact"]).run()
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    labels = dict(zip(at.dataframe[0].value["rank"], at.dataframe[0].value["form"], strict=True))
    assert any(k.startswith("0.25 on average, per layer ") for k in labels), labels
    # another model starts from its own defaults, not from the tuned run's
    at.selectbox(key="model_choice").set_value("tiny-llama").run()
    assert not at.exception, at.exception
    assert at.radio(key="ppl_layer_split").value == "one" and at.multiselect(key="ppl_ranks").value == [
        16,
        32,
        64,
        128,
    ]


def test_perplexity_takes_per_layer_ranks(tmp_path, monkeypatch):
    """`perplexity --layer-ranks`: each share of the grid split over the layers (the spectra's split of
    that budget, or the shares given), listed in its row; key counts and a mismatched mean are refused."""
    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path / "cache"))
    argv = ["perplexity", "--model", "tiny-llama", "--forms", "exact", "--windows", "2", "--seq-len", "48"]
    argv += ["--chunk", "16"]
    out = tmp_path / "p.json"
    assert main([*argv, "--ranks", "0.5,0.25", "--layer-ranks", "spectrum", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["rank"] != "dense"]
    assert [r["rank"] for r in rows] == [0.5, 0.25] and all(len(r["layer_ranks"]) == 2 for r in rows)
    for r in rows:
        assert np.mean(r["layer_ranks"]) == pytest.approx(r["rank"], abs=1 / 64)
    assert main([*argv, "--ranks", "0.375", "--layer-ranks", "0.5,0.25", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][1]
    assert row["layer_ranks"] == [0.5, 0.25] and row["attended_share"] > 0
    for ranks, how in (("0.5", "0.5,0.25"), ("16", "spectrum"), ("0.5", "measured")):
        assert main([*argv, "--ranks", ranks, "--layer-ranks", how, "--json", str(out)]) == 2


def test_the_serving_page_says_generation_runs_one_rank_for_a_per_layer_run(tmp_path, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from atp_viz.hf.model_info import TUNED_PREFIX

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    cfg = TuneConfig(model="tiny-llama", rank=0.375, layer_ranks=(0.5, 0.25), layer_ranks_from="given",
                     steps=1, seq_len=48, chunk=16, eval_windows=1)  # fmt: skip
    run = training.train(cfg, texts=[" ".join(TEXTS) * 4]).out_dir
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.switch_page("pages/serving.py")
    at.query_params["model"] = f"{TUNED_PREFIX}{run}"
    at.run()
    at.button(key="serve_go").click().run()
    assert not at.exception, at.exception
    said = "own rank per layer (0.5,0.25 of L); generation runs one rank in every layer"
    assert any(said in c.value for c in at.caption)
