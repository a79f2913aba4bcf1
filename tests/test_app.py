"""The app and every page run on the bundled default model (Streamlit's AppTest, no browser)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

TIMEOUT = 180
APP = str(Path(__file__).resolve().parent.parent / "app.py")


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if page:
        at.switch_page(page)
    return at


def _charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def test_home_runs_on_default_model():
    at = _app().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "ATP Explorer"
    assert at.selectbox(key="model_choice").value == "minilm"
    assert [c.key for c in _charts(at)] == ["home_erank", "home_erank_length"]
    assert any(m.label == "Tokens L" for m in at.metric)
    (board,) = [e for e in at.expander if e.label.startswith("Does ATP hold up?")]
    text = "\n".join(m.value for m in board.markdown)
    assert "| MiniLM, r = L/2, any form | cosine >= 0.99 |" in text and "goal met?" in text
    assert "Where the open goals stand, and why" in text  # the README's account, next to the table


def test_spectra_page_charts_and_length_study():
    at = _app("pages/spectra.py").run()
    assert not at.exception, at.exception
    assert len(_charts(at)) == 5  # spectra, energy, ranks heatmap, key spectra, token norms
    at.button(key="run_length_study").click().run()
    assert not at.exception, at.exception
    assert len(_charts(at)) == 6
    assert any("fraction of components needed" in m.value for m in at.markdown)


def test_spectra_options_rerun(monkeypatch):
    """Each choice of matrix and decomposition computes every layer's SVD once; a rerun that changes
    only how they are drawn (the log scale) computes none."""
    from atp_viz.analysis import spectra

    calls = []
    real = spectra.layer_spectra
    monkeypatch.setattr(spectra, "layer_spectra", lambda *a, **k: calls.append(k) or real(*a, **k))
    at = _app("pages/spectra.py").run()
    at.checkbox(key="skip_first").check().run()
    at.radio(key="spectra_mode").set_value("PCA (centred)").run()
    assert not at.exception, at.exception
    assert len(_charts(at)) == 5
    n = len(calls)
    at.checkbox(key="log_scale").uncheck().run()
    assert not at.exception, at.exception
    assert len(calls) == n


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_typed_text_shows_message(text):
    at = _app().run()
    at.radio(key="text_source").set_value("Type").run()
    at.text_area(key="typed_text").input(text).run()
    assert not at.exception
    assert any("empty" in w.value for w in at.warning)


def test_unknown_model_shows_error():
    at = _app().run()
    at.selectbox(key="model_choice").set_value("__other__").run()
    at.text_input(key="other_model").input("nobody/no-such-model-xyz").run()
    assert not at.exception
    assert any("not a bundled model" in e.value for e in at.error)


def test_smollm2_home_and_sink_warning():
    at = _app().run()
    at.selectbox(key="model_choice").set_value("smollm2").run()
    assert not at.exception, at.exception
    assert len(_charts(at)) == 2
    assert any("attention sink" in w.value for w in at.warning)


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_explorer_minilm_slider_changes_metrics():
    at = _app("pages/explorer.py").run()
    assert not at.exception, at.exception
    first = _metric(at, "Sentence-embedding cosine to dense")
    # layer errors, 4 attention maps, one query token's attention and its principal keys
    assert [c.key for c in _charts(at)] == [
        "explorer_layer_err", "map_dense", "map_principal", "map_lifted", "map_diff",
        "token_attention", "token_keys",
    ]  # fmt: skip
    at.slider(key="rank_frac").set_value(0.2).run()
    assert not at.exception, at.exception
    assert _metric(at, "Sentence-embedding cosine to dense") != first
    at.slider(key="rank_frac").set_value(1.0).run()
    assert float(_metric(at, "Sentence-embedding cosine to dense")) == pytest.approx(1.0, abs=1e-4)
    at.radio(key="form").set_value("linear").run()
    assert not at.exception, at.exception
    at.button(key="run_sweep").click().run()
    assert not at.exception, at.exception
    assert len(_charts(at)) == 8


def test_a_heavy_job_runs_only_on_a_click_for_this_model_and_text():
    """The sweep stays shown while other widgets move, but another text (or model) needs a new click:
    nothing heavy starts unasked."""
    at = _app("pages/explorer.py")
    at.query_params.update(model="tiny-bert", sample="02_short_paragraph")
    at.run()
    sweeps = lambda: [c for c in _charts(at) if c.key == "explorer_sweep"]  # noqa: E731
    assert not sweeps()
    at.button(key="run_sweep").click().run()
    assert len(sweeps()) == 1
    at.slider(key="rank_frac").set_value(0.25).run()
    assert len(sweeps()) == 1  # the same model and text: still shown
    # (not 01_one_sentence: test_jobs needs that sweep uncached in this process, to see it refused)
    at.selectbox(key="sample").set_value("03_recipe_steps").run()
    assert not at.exception, at.exception
    assert not sweeps() and any("runs it on the new one" in c.value for c in at.caption)
    at.button(key="run_sweep").click().run()
    assert len(sweeps()) == 1


def test_explorer_closed_views_compute_nothing(monkeypatch):
    """Attention maps and the per-token view are behind toggles; closed, no map is recorded or drawn."""
    from atp_viz.analysis import compare

    recorded = []
    real = compare.forward

    def spy(loaded, tok, config=None, *, map_layers=(), **kw):
        if config is not None:
            recorded.append(tuple(map_layers))
        return real(loaded, tok, config, map_layers=map_layers, **kw)

    monkeypatch.setattr(compare, "forward", spy)
    from atp_app import runtime

    runtime.atp_forward.clear()  # the ATP runs are shared across sessions: earlier tests' are cached
    at = _app("pages/explorer.py").run()
    assert recorded[-1] == (3,)  # MiniLM: the middle layer's maps, for the open views
    at.toggle(key="show_maps").set_value(False).run()
    assert [c.key for c in _charts(at)][-2:] == ["token_attention", "token_keys"]
    at.toggle(key="show_tokens").set_value(False).run()
    assert not at.exception, at.exception
    assert recorded[-1] == () and [c.key for c in _charts(at)] == ["explorer_layer_err"]
    assert any("nothing is computed" in c.value for c in at.caption)


def _title(at: AppTest, key: str) -> str:
    chart = next(c for c in _charts(at) if c.key == key)
    return json.loads(chart.proto.spec)["layout"]["title"]["text"]


def test_explorer_maps_name_their_setting_in_titles_and_file_names():
    """A teacher saving maps of several ranks and forms gets files that do not overwrite each other, and
    figures that say what they show."""
    at = _app("pages/explorer.py")
    for k, v in {"model": "tiny-bert", "sample": "02_short_paragraph", "form": "linear", "rank": "5"}.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, at.exception
    assert "ATP (linear, r = 5) weights on 5 principal keys" in _title(at, "map_principal")
    assert _title(at, "map_diff").startswith("ATP (linear, r = 5) lifted minus dense")
    keys = {b.key for b in at.get("download_button")}
    assert {"dl_map_dense_tiny-bert_L1_H0_png", "dl_map_principal_tiny-bert_L1_H0_linear_r5_png"} <= keys


def test_explorer_token_view_follows_the_clicked_token():
    at = _app("pages/explorer.py").run()
    assert "#84" in _title(at, "token_attention")  # MiniLM: the middle token of the default sample
    at.pills(key="query_pills").set_value(5).run()
    assert not at.exception, at.exception
    assert at.query_params["query"] == "5"
    assert "#5:" in _title(at, "token_attention") and "#5 " in _title(at, "token_keys")
    at.radio(key="map_scale").set_value("rank").run()
    assert "rank of the weight within its row" in _title(at, "map_dense")
    assert at.query_params["scale"] == "rank"


def test_explorer_shares_one_budget_over_the_layers():
    """Per-layer ranks from the spectra: the same budget, each layer's share said, the metric moves, and
    a budget off the split's grid is said to be rounded rather than silently changed."""
    at = _app("pages/explorer.py").run()
    at.slider(key="rank_frac").set_value(0.25).run()
    one = _metric(at, "Sentence-embedding cosine to dense")
    assert list(at.radio(key="layer_split").options) == [
        "the same r in every layer", "one budget, from the spectra of training texts",
        "one budget, measured on training texts",
    ]  # fmt: skip
    at.radio(key="layer_split").set_value("spectrum").run()
    assert not at.exception, at.exception
    assert _metric(at, "Sentence-embedding cosine to dense") != one
    shares = next(c.value for c in at.caption if c.value.startswith("Each layer's share of L"))
    assert "(mean 0.25)" in shares and "rounded" not in shares
    rs = next(c.value for c in at.caption if c.value.startswith("Each ATP layer's r"))
    n = int(at.subheader[0].value.split("of L = ")[1].split()[0])
    per_layer = [int(r) for r in rs.removesuffix(".").split(": ")[1].split(", ")]
    assert len(per_layer) == 6 and len(set(per_layer)) > 1 and abs(np.mean(per_layer) - n / 4) <= 1
    # the heading's r is the mean of the layers' r, as the caption lists them
    assert float(at.subheader[0].value.split()[2]) == pytest.approx(np.mean(per_layer), abs=0.05)
    at.slider(key="rank_frac").set_value(0.05).run()  # 0.05 of L in 1/64 steps over 6 layers: 19 steps
    shares = next(c.value for c in at.caption if c.value.startswith("Each layer's share of L"))
    assert "the budget 0.05 became 0.0495" in shares
    at.button(key="run_sweep").click().run()
    assert not at.exception, at.exception
    assert any("same r in every layer, whatever" in c.value for c in at.caption)


def test_explorer_smollm2_decoder_outputs():
    at = _app("pages/explorer.py").run()
    at.selectbox(key="model_choice").set_value("smollm2").run()
    assert not at.exception, at.exception
    assert "measured" not in at.radio(key="layer_split").options[-1]  # the measured loss is an encoder's
    first = _metric(at, "Next-token KL(dense || ATP)")
    assert len(at.dataframe) == 1  # top-10 dense vs ATP
    at.radio(key="rank_unit").set_value("tokens").run()
    at.slider(key="rank_tokens").set_value(8).run()
    assert not at.exception, at.exception
    assert _metric(at, "Next-token KL(dense || ATP)") != first


def test_serving_page_encoder_message_and_decoder_generation():
    at = _app("pages/serving.py").run()
    assert not at.exception, at.exception
    assert any("encoder" in i.value for i in at.info)
    at.selectbox(key="model_choice").set_value("smollm2").run()
    at.number_input(key="serve_new").set_value(4).run()
    at.button(key="serve_go").click().run()
    assert not at.exception, at.exception
    assert any(m.label == "KV cache, ATP" for m in at.metric)
    at.number_input(key="ppl_windows").set_value(2).run()
    at.number_input(key="ppl_seq").set_value(128).run()
    at.number_input(key="ppl_chunk").set_value(32).run()
    at.multiselect(key="ppl_ranks").set_value([]).run()
    at.button(key="ppl_go").click().run()
    assert any("at least one form and one rank" in w.value for w in at.warning)
    at.multiselect(key="ppl_ranks").set_value([8]).run()
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    assert len(_charts(at)) == 2 and len(at.dataframe) == 1
    table = at.dataframe[0].value
    ranks = list(table["rank"])  # one type for Arrow: "dense" next to "8", not 8
    assert ranks[0] == "dense" and all(isinstance(r, str) for r in ranks), ranks
    # every figure with its interval; the scored positions are the same for dense and ATP
    assert all("[" in v for v in table["top-1 [95% CI]"])
    scored = table["scored predictions"]
    assert len(set(scored)) == 1 and scored.iloc[0] == 2 * (128 - 32 - 1)
    # an exact window: the window alone gets a row and a reference line, the ATP rows say what they kept
    at.number_input(key="ppl_window").set_value(32).run()
    at.number_input(key="ppl_sinks").set_value(2).run()
    at.radio(key="ppl_basis").set_value("keys").run()
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    ranks = list(at.dataframe[0].value["rank"])
    assert ranks[1] == "middle dropped, exact window 32 + 2 sinks", ranks
    assert all("exact window 32 + 2 sinks" in r for r in ranks[1:])
    assert all("window alone" in c.proto.spec for c in _charts(at)), "no reference line for the window alone"
    assert any("basis from keys" in c.value and "2 tokens and the 32" in c.value for c in at.caption)
    assert not any("covers the whole past" in w.value for w in at.warning)
    before = list(at.dataframe[0].value["perplexity [95% CI]"])
    at.checkbox(key="ppl_centre").check().run()  # the centred basis: another grid, said in the caption
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    assert any("basis from keys (centred)" in c.value for c in at.caption)
    assert list(at.dataframe[0].value["perplexity [95% CI]"])[2:] != before[2:]  # the ATP rows moved
    at.radio(key="ppl_update").set_value("moments").run()
    at.button(key="ppl_go").click().run()  # refused at the click, before the dense row runs
    assert any("A centred basis needs the SVD per chunk" in w.value for w in at.warning)
    at.radio(key="ppl_update").set_value("recompute").run()
    at.checkbox(key="ppl_centre").uncheck().run()
    at.number_input(key="ppl_window").set_value(96).run()  # 128-token windows in chunks of 32: past <= 96
    at.button(key="ppl_go").click().run()
    assert any("covers the whole past of every chunk" in w.value for w in at.warning)
    at.checkbox(key="ppl_centre").check().run()
    at.selectbox(key="model_choice").set_value("tiny-llama").run()  # another model starts from its own
    assert not at.exception, at.exception
    assert not at.checkbox(key="ppl_centre").value


def test_serving_perplexity_grid_shares_each_budget_over_the_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    at = _app("pages/serving.py").run()
    at.selectbox(key="model_choice").set_value("smollm2").run()
    for key, value in (("ppl_windows", 2), ("ppl_seq", 128), ("ppl_chunk", 32)):
        at.number_input(key=key).set_value(value).run()
    at.multiselect(key="ppl_forms").set_value(["exact"]).run()
    at.multiselect(key="ppl_ranks").set_value([8, 0.25]).run()
    at.radio(key="ppl_layer_split").set_value("spectrum").run()
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    ranks = list(at.dataframe[0].value["rank"])
    # the key count keeps one rank; the share of L is split, and its row lists every layer's share
    assert ranks[2] == "8" and ranks[1].startswith("0.25 on average, per layer "), ranks
    assert len(ranks[1].split("per layer ")[1].split(", ")) == 30
    assert not at.warning
    at.multiselect(key="ppl_ranks").set_value([8]).run()
    at.button(key="ppl_go").click().run()
    assert not at.exception, at.exception
    assert any("every row keeps one rank" in w.value for w in at.warning)


def test_cost_page_counts_follow_inputs():
    at = _app("pages/costs.py").run()
    assert not at.exception, at.exception
    assert _charts(at)[0].key == "cost_counted"
    at.number_input(key="cost_L").set_value(8192).run()
    at.number_input(key="cost_r").set_value(128).run()
    assert not at.exception, at.exception
    ceiling = next(m.value for m in at.metric if m.label.startswith("Counted speed-up ceiling, linear"))
    from atp_viz import forms
    from atp_viz.core import costs

    # MiniLM (the default): 12 heads, 12 kv heads, head size 32, d = 384; the randomised basis.
    geom = costs.Geometry(12, 12, 32, 384)
    expected = (
        costs.dense_cost(8192, geom).macs / forms.get("linear").cost(8192, 128, geom, "randomized").macs
    )
    assert ceiling == f"{expected:.2f}x"


def test_cost_page_length_follows_the_text_until_set():
    at = _app("pages/costs.py").run()
    L0 = at.number_input(key="cost_L").value
    assert L0 > 128 and at.number_input(key="cost_r").value == 128  # the default sample
    at.selectbox(key="sample").set_value("01_one_sentence").run()
    assert not at.exception, at.exception
    L1 = at.number_input(key="cost_L").value
    assert L1 < L0 and at.number_input(key="cost_r").value == L1  # r = 128 or L, whichever is smaller
    at.number_input(key="cost_L").set_value(4096).run()
    at.selectbox(key="sample").set_value("02_short_paragraph").run()
    assert at.number_input(key="cost_L").value == 4096  # set by the user: kept
    assert at.number_input(key="cost_r").value == 128


def test_cost_page_shows_measured_reference_curves():
    at = _app("pages/costs.py").run()
    assert not at.exception, at.exception
    # The reference benchmark in docs/ (or a local `make bench`) gives the measured chart.
    assert len(_charts(at)) == 2
    assert any("Source:" in c.value for c in at.caption)


def test_changing_only_the_view_does_not_run_the_model_again(monkeypatch):
    """The ATP run of a setting is shared: a new colour scale redraws the maps from it."""
    from atp_app import runtime
    from atp_viz.analysis import compare

    calls = []
    real = compare.forward

    def spy(loaded, tok, config=None, *, map_layers=(), **kw):
        calls.append(config)
        return real(loaded, tok, config, map_layers=map_layers, **kw)

    monkeypatch.setattr(compare, "forward", spy)
    runtime.atp_forward.clear()
    at = _app("pages/explorer.py").run()
    n = len(calls)
    assert n >= 1
    at.radio(key="map_scale").set_value(at.radio(key="map_scale").options[-1]).run()
    assert not at.exception, at.exception
    assert len(calls) == n


def test_token_pill_labels_are_unique_invisible_and_short():
    """st.pills maps a clicked label back to its option, so every token's label must differ; repeats
    differ only by zero-width characters, and a token repeated n times costs O(log n) of them each."""
    from atp_app.widgets import unique_labels

    tokens = [" the", " cat", " the", "\n"] + [","] * 1000
    labels = unique_labels(tokens)
    assert len(set(labels)) == len(labels)
    assert labels[:2] == ["the", "cat"] and labels[2].startswith("the") and labels[3] == repr("\n")
    visible = {lab.replace("\u200b", "").replace("\u200c", "") for lab in labels[4:]}
    assert visible == {","} and max(len(lab) for lab in labels) <= 1 + 10
