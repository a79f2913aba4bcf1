"""The view lives in the URL: a link reproduces model, sample, rank, form, layer and head; bad links
fall back to defaults with a message, never an exception."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from atp_viz import forms
from atp_viz.core import ranks
from atp_viz.core.ranks import resolve_rank
from atp_viz.deploy import urlstate
from atp_viz.hf import tuned

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 180
SHORT = "02_short_paragraph"


def _explorer(**params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in params.items():
        at.query_params[k] = v
    at.switch_page("pages/explorer.py")
    return at.run()


def _infos(at: AppTest) -> str:
    return " ".join(i.value for i in at.info)


# ---- parsing (library, no Streamlit) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.25", ("fraction", 0.25)),
        ("1.00", ("fraction", 1.0)),
        ("0.05", ("fraction", 0.05)),
        ("7", ("tokens", 7)),
        # a share the command line takes but the slider does not: this text's r, as compare --rank gives
        ("0.33", ("tokens", 7)),
        ("L/8", ("tokens", 3)),
        ("0.01", ("tokens", 1)),
    ],
)
def test_parse_rank(raw, expected):
    assert urlstate.parse_rank(raw, 20) == expected


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("1.5", "not a share of L between 0 and 1"),
        ("0", "out of range"),
        ("21", "out of range"),
        ("abc", "neither"),
        ("0.x", "neither"),
    ],
)
def test_parse_rank_rejects(raw, match):
    with pytest.raises(ValueError, match=match):
        urlstate.parse_rank(raw, 20)


def test_format_rank_round_trips():
    for unit, value in (("fraction", 0.5), ("fraction", 1.0), ("tokens", 1), ("tokens", 20)):
        assert urlstate.parse_rank(urlstate.format_rank(unit, value), 20) == (unit, value)


def test_parse_index_and_choice():
    assert urlstate.parse_index("3", 6, "layer", "the model") == 3
    with pytest.raises(ValueError, match="layer=6 does not exist"):
        urlstate.parse_index("6", 6, "layer", "the model")
    with pytest.raises(ValueError, match="not a number"):
        urlstate.parse_index("three", 6, "layer", "the model")
    assert urlstate.parse_choice("linear", forms.names(), "form") == "linear"
    with pytest.raises(ValueError, match="not one of exact, linear"):
        urlstate.parse_choice("cubic", forms.names(), "form")


def test_layers_are_read_and_written_back_in_one_form():
    assert ranks.parse_layers("all", 6) == "all"
    assert ranks.parse_layers("", 6) == "all"
    assert ranks.parse_layers("0-2, 5", 6) == (0, 1, 2, 5)
    assert ranks.parse_layers("3-1,1", 6) == (1, 2, 3)
    for spec in ("all", "0-2,5", "4", "0,2,4", "0-5"):
        assert ranks.format_layers(ranks.parse_layers(spec, 6)) == spec
    assert urlstate.parse_layers(" 5, 0-2 ,1", 6) == "0-2,5"
    with pytest.raises(ValueError, match="do not exist"):
        ranks.parse_layers("9", 6)
    with pytest.raises(ValueError, match="layers='one': Cannot read"):
        urlstate.parse_layers("one", 6)


def test_the_view_a_tuned_run_was_trained_at():
    """The explorer's one-click "setting it was tuned with": every value the run's ATP depended on, in
    the view's words; a fixed number of principal keys is no share of the text, so no view."""
    run = {"rank": 0.5, "form": "taylor2", "basis_from": "keys", "centre_basis": True, "layer_ranks": []}
    view = urlstate.tuned_view(run, 40)
    assert view == {
        "form": "taylor2", "basis": "keys", "centre": "1", "rank": "0.50", "split": "one", "layers": "all",
        "method": "exact", "lowrank": "0",
    }  # fmt: skip
    fitted, problems = urlstate.fit_view(view, replace(SHAPE, forms=("taylor2",), bases=("input", "keys")))
    assert not problems and {k: fitted[k] for k in view} == view  # in the view's own words: nothing to fit
    per_layer = urlstate.tuned_view({"rank": 0.25, "form": "exact", "layer_ranks": [0.125, 0.375]}, 40)
    assert per_layer["split"] == "tuned" and per_layer["basis"] == "input" and per_layer["centre"] == "0"
    assert urlstate.tuned_view({"rank": 1 / 3, "form": "exact"}, 40)["rank"] == "13"  # off the slider: r
    assert urlstate.tuned_view({"rank": 128, "form": "pksoftmax", "window": 512}, 40) is None
    assert urlstate.tuned_view({"rank": 128, "form": "exact"}, 40) is None


def test_model_id_shapes():
    assert urlstate.looks_like_model_id("HuggingFaceTB/SmolLM2-135M")
    assert urlstate.looks_like_model_id("/srv/models/x") and urlstate.looks_like_model_id("./m")
    assert not urlstate.looks_like_model_id("gpt5") and not urlstate.looks_like_model_id("a b/c")


# ---- the app ---------------------------------------------------------------------------------------


def test_link_reproduces_the_explorer_view():
    at = _explorer(model="tiny-llama", sample=SHORT, rank="0.25", form="linear", layer="1", head="3")
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == "tiny-llama"
    assert at.selectbox(key="sample").value == SHORT
    assert at.radio(key="rank_unit").value == "fraction of L"
    assert at.slider(key="rank_frac").value == 0.25
    assert at.radio(key="form").value == "linear"
    assert at.selectbox(key="map_layer").value == 1
    assert at.selectbox(key="map_head").value == 3
    assert not at.info or "defaults used" not in _infos(at)
    assert "linear form" in at.subheader[0].value


def test_a_link_names_the_basis_and_the_ranks_per_layer():
    """The basis (source and method) and the ranks per layer change every figure, so a link carries them;
    one chosen on a model that offers it and not on this one is replaced, saying why."""
    at = _explorer(model="tiny-bert", sample=SHORT, basis="keys", method="randomized", split="spectrum")
    assert not at.exception, at.exception
    assert (
        at.radio(key="basis_source").value == "keys"
        and at.selectbox(key="basis_method").value == "randomized"
    )
    assert at.radio(key="layer_split").value == "spectrum"
    assert any(c.value.startswith("Each layer's share of L") for c in at.caption)
    at.radio(key="basis_source").set_value("input").run()
    at.radio(key="layer_split").set_value("one").run()
    assert (at.query_params["basis"], at.query_params["split"]) == ("input", "one")
    assert at.query_params["method"] == "randomized"
    at = _explorer(model="tiny-llama", sample=SHORT, split="measured", method="magic")
    assert not at.exception, at.exception
    assert at.radio(key="layer_split").value == "one" and at.query_params["split"] == "one"
    assert "method='magic'" in _infos(at) and "for encoders" in _infos(at)


def test_a_link_names_the_layers_that_run_atp_and_the_low_rank_inputs():
    """Both change every number on the page, so a link carries them, in one written form; a bad value,
    from a link or typed, falls back to the default, saying why."""
    at = _explorer(model="tiny-llama", sample=SHORT, layers="1, 0", lowrank="1")
    assert not at.exception, at.exception
    assert at.text_input(key="atp_layers").value == "0-1" and at.checkbox(key="lowrank_linear").value
    assert (at.query_params["layers"], at.query_params["lowrank"]) == ("0-1", "1")
    assert "defaults used" not in _infos(at)
    first = _metric_values(at)
    at.text_input(key="atp_layers").input("1").run()
    at.checkbox(key="lowrank_linear").uncheck().run()
    assert not at.exception, at.exception
    assert (at.query_params["layers"], at.query_params["lowrank"]) == ("1", "0")
    assert _metric_values(at) != first
    # A copied link opens the same numbers in a new session.
    again = _explorer(**{k: at.query_params[k] for k in VIEW_KEYS})
    assert again.text_input(key="atp_layers").value == "1" and not again.checkbox(key="lowrank_linear").value
    assert _metric_values(again) == _metric_values(at)
    at.checkbox(key="lowrank_linear").check().run()
    assert at.query_params["lowrank"] == "1" and _metric_values(at) != _metric_values(again)
    plain = _metric_values(at)
    at.checkbox(key="centre_basis").check().run()  # the centred basis: another number, in the link
    assert at.query_params["centre"] == "1" and not at.exception, at.exception
    assert _metric_values(at) != plain
    centred = _explorer(**{k: at.query_params[k] for k in VIEW_KEYS})
    assert centred.checkbox(key="centre_basis").value and _metric_values(centred) == _metric_values(at)
    at.text_input(key="atp_layers").input("0-99").run()
    assert not at.exception, at.exception
    assert "layers='0-99': Layers 2-99 do not exist" in _infos(at)  # a range, not 98 numbers
    assert at.text_input(key="atp_layers").value == "all" and at.query_params["layers"] == "all"
    bad = _explorer(model="tiny-llama", sample=SHORT, layers="two", lowrank="yes")
    assert not bad.exception, bad.exception
    assert "layers='two': Cannot read" in _infos(bad) and "lowrank='yes'" in _infos(bad)
    assert bad.query_params["layers"] == "all" and bad.query_params["lowrank"] == "0"


def _metric_values(at: AppTest) -> list[str]:
    return [m.value for m in at.metric]


def test_rank_in_tokens_from_link():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="5")
    assert not at.exception, at.exception
    assert at.radio(key="rank_unit").value == "tokens"
    assert at.slider(key="rank_tokens").value == 5
    assert at.subheader[0].value.startswith("r = 5 of L")


def test_changing_widgets_writes_the_url():
    at = _explorer(model="tiny-bert", sample=SHORT)
    assert not at.exception, at.exception
    # The first run already writes the whole view, defaults included, so the link is complete (the map's
    # layer starts at the middle one: tiny-bert has 2).
    assert at.query_params["model"] == "tiny-bert" and at.query_params["sample"] == SHORT
    assert at.query_params["rank"] == "0.50" and at.query_params["form"] == "exact"
    assert at.query_params["layer"] == "1" and at.query_params["head"] == "0"
    assert at.query_params["scale"] == "log" and at.query_params["sinks"] == "show"
    at.slider(key="rank_frac").set_value(0.75).run()
    assert at.query_params["rank"] == "0.75"
    at.radio(key="form").set_value("linear").run()
    at.selectbox(key="map_head").set_value(2).run()
    assert at.query_params["form"] == "linear" and at.query_params["head"] == "2"
    at.radio(key="rank_unit").set_value("tokens").run()
    at.slider(key="rank_tokens").set_value(3).run()
    assert not at.exception, at.exception
    assert at.query_params["rank"] == "3"
    at.selectbox(key="sample").set_value("01_one_sentence").run()
    assert at.query_params["sample"] == "01_one_sentence"
    # A link copied now opens the same view in a new session.
    again = _explorer(**{k: at.query_params[k] for k in ("model", "sample", "rank", "form", "layer", "head")})
    assert not again.exception, again.exception
    assert again.slider(key="rank_tokens").value == 3 and again.radio(key="form").value == "linear"
    assert again.selectbox(key="map_head").value == 2


def test_a_link_with_a_share_off_the_sliders_steps_opens_that_rank_in_tokens():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="L/8")
    assert not at.exception, at.exception
    assert "defaults used" not in _infos(at)
    assert at.radio(key="rank_unit").value == "tokens" and at.query_params["rank"].isdigit()
    n_tokens = int(at.slider(key="rank_tokens").max)
    assert at.slider(key="rank_tokens").value == resolve_rank(0.125, n_tokens)[0]


def test_invalid_link_values_fall_back_with_a_message():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="1.5", form="cubic", layer="9", head="-1")
    assert not at.exception, at.exception
    info = _infos(at)
    for part in ("rank=1.5", "form='cubic'", "layer=9 does not exist", "head=-1 does not exist"):
        assert part in info, info
    assert info.startswith("The link's values that do not fit: defaults used instead of")
    assert at.slider(key="rank_frac").value == 0.5
    assert at.radio(key="form").value == "exact"
    assert at.selectbox(key="map_layer").value == 1 and at.selectbox(key="map_head").value == 0
    # ... and the URL is corrected to what is shown.
    assert at.query_params["rank"] == "0.50" and at.query_params["layer"] == "1"


def test_rank_above_text_length_falls_back():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="100000")
    assert not at.exception, at.exception
    assert "rank=100000 is out of range" in _infos(at)
    assert at.radio(key="rank_unit").value == "fraction of L"


def test_unknown_sample_and_model_fall_back():
    at = _explorer(model="gpt5", sample="no_such_sample", rank="0.5")
    assert not at.exception, at.exception
    info = _infos(at)
    assert "gpt5" in info and "no_such_sample" in info
    assert at.selectbox(key="model_choice").value == "minilm"
    assert at.selectbox(key="sample").value == "04_attention_explainer"


def test_an_empty_model_in_a_link_is_the_default():
    at = _explorer(model="", sample=SHORT)
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == "minilm" and at.query_params["model"] == "minilm"


def test_a_shipped_tuned_run_is_linked_the_same_on_every_checkout():
    """A shipped run's link names it from the repository's root, never by this server's path; a link that
    names its folder another way opens the same entry, and a run not on this machine is said to be
    missing."""
    name = "minilm-exact-r0.5-two-stage"
    key = f"tuned:data/tuned/{name}"
    at = _explorer(model=key, sample=SHORT)
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == key and at.query_params["model"] == key
    assert "defaults used" not in _infos(at) and "cannot be shown" not in _infos(at)
    again = _explorer(model=f"tuned:{tuned.SHIPPED_DIR / name}", sample=SHORT)
    assert again.selectbox(key="model_choice").value == key and again.query_params["model"] == key
    gone = _explorer(model="tuned:data/tuned/no-such-run", sample=SHORT)
    assert not gone.exception, gone.exception
    assert "no-such-run is not on this machine" in _infos(gone)
    assert gone.selectbox(key="model_choice").value == "minilm"


def test_hub_id_in_link_goes_to_other(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = _explorer(model="nobody/no-such-model-xyz")
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == "__other__"
    assert at.text_input(key="other_model").value == "nobody/no-such-model-xyz"
    assert any("not a bundled model" in e.value for e in at.error)


def test_switching_to_a_model_with_fewer_heads_resets_the_map_head():
    at = _explorer(model="minilm", sample=SHORT, head="10")  # MiniLM: 12 heads
    assert at.selectbox(key="map_head").value == 10
    at.selectbox(key="model_choice").set_value("tiny-bert").run()  # 4 heads
    assert not at.exception, at.exception
    assert at.selectbox(key="map_head").value == 0
    assert _infos(at).startswith("Reset to fit: ") and "head=10 does not exist" in _infos(at)
    assert at.query_params["head"] == "0" and at.query_params["model"] == "tiny-bert"


def test_a_default_nobody_chose_follows_the_model_and_text_silently():
    """The map layer and query token start at the model's and text's defaults; until someone picks them
    they follow a new model or text without a "Reset to fit" notice (and come back with the model). A
    value the user picked that no longer fits is still named."""
    at = _explorer(model="minilm", sample=SHORT)  # MiniLM: 6 layers, default 3
    assert at.selectbox(key="map_layer").value == 3
    at.selectbox(key="model_choice").set_value("tiny-bert").run()  # 2 layers, default 1
    assert not at.exception, at.exception
    assert at.selectbox(key="map_layer").value == 1 and "Reset to fit" not in _infos(at)
    at.selectbox(key="sample").set_value("01_one_sentence").run()  # another text: another default query
    assert "Reset to fit" not in _infos(at)
    at.selectbox(key="model_choice").set_value("minilm").run()
    assert at.selectbox(key="map_layer").value == 3 and "Reset to fit" not in _infos(at)
    at.selectbox(key="map_layer").set_value(4).run()  # chosen: checked from now on
    at.selectbox(key="model_choice").set_value("tiny-bert").run()
    assert at.selectbox(key="map_layer").value == 1 and "layer=4 does not exist" in _infos(at)
    # A reload (or a link) names the defaults too: one that is still this view's default stays one.
    reloaded = _explorer(**{k: at.query_params[k] for k in VIEW_KEYS})  # tiny-bert, layer 1 (its default)
    query = reloaded.query_params["query"]
    reloaded.pills(key="query_pills").set_value(None).run()  # clicking the selected token again
    assert reloaded.query_params["query"] == query
    reloaded.selectbox(key="model_choice").set_value("minilm").run()
    assert reloaded.selectbox(key="map_layer").value == 3 and "Reset to fit" not in _infos(reloaded)
    reloaded.selectbox(key="sample").set_value(SHORT).run()
    assert "Reset to fit" not in _infos(reloaded) and reloaded.query_params["query"] != query


# ---- one view across pages --------------------------------------------------------------------------

VIEW_KEYS = (
    "model", "sample", "rank", "form", "basis", "method", "centre", "split", "layers", "lowrank", "layer",
    "head", "query", "scale", "sinks",
)  # fmt: skip
SHAPE = urlstate.ViewShape(
    n_tokens=20,
    n_layers=6,
    n_heads=4,
    forms=("exact", "linear"),
    scales=("log", "linear"),
    default_layer=3,
    default_query=10,
    default_form="exact",
    default_scale="log",
    bases=("input", "keys"),
    methods=("exact", "randomized"),
)


def test_fit_view_fills_defaults_and_names_bad_values():
    view, problems = urlstate.fit_view({"model": "m", "rank": "1.5", "query": "25", "scale": "cubic"}, SHAPE)
    assert view == {
        "model": "m",
        "rank": "0.50",
        "form": "exact",
        "basis": "input",
        "method": "exact",
        "split": "one",
        "layers": "all",
        "lowrank": "0",
        "centre": "0",
        "layer": "3",
        "head": "0",
        "query": "10",
        "scale": "log",
        "sinks": "show",
    }
    text = " ".join(problems)
    assert "rank=1.5" in text and "query=25 does not exist" in text and "scale='cubic'" in text
    good = {"rank": "7", "form": "linear", "layer": "5", "head": "3", "query": "19", "scale": "linear"}
    good.update(basis="keys", method="randomized", split="spectrum", layers="0-2,5", lowrank="1", centre="1")
    view, problems = urlstate.fit_view({**good, "sinks": "hide"}, SHAPE)
    assert view == {**good, "sinks": "hide"} and not problems
    view, _ = urlstate.fit_view({"rank": "0.3"}, SHAPE)
    assert view["rank"] == "0.30"  # written as the slider shows it


def _clear_url(at: AppTest) -> None:
    """What the browser does on a page switch: the query string is dropped."""
    for k in list(at.query_params):
        del at.query_params[k]


def test_view_persists_across_pages_and_sits_in_every_link():
    at = _explorer(model="tiny-llama", sample=SHORT, rank="0.25", form="linear", layer="1", head="3")
    assert not at.exception, at.exception
    expected = {k: at.query_params[k] for k in VIEW_KEYS}
    assert expected["rank"] == "0.25" and expected["head"] == "3"
    # The fine-tuning page draws no sidebar: Streamlit forgets those widgets, the view does not. (Its
    # link is written by app.py, which AppTest does not run after its first run, see
    # atp_app.navigation: the browser test checks that link.)
    for page in ("pages/home.py", "pages/finetune.py", "pages/spectra.py", "pages/tour.py"):
        _clear_url(at)
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        if page != "pages/finetune.py":
            assert {k: at.query_params.get(k) for k in VIEW_KEYS} == expected, page
    L = int(at.slider(key="tour_rank").max)
    assert at.selectbox(key="tour_layer").value == 1 and at.selectbox(key="tour_head").value == 3
    assert at.slider(key="tour_rank").value == resolve_rank(0.25, L)[0]
    at.selectbox(key="tour_head").set_value(2).run()  # the tour moves the same view
    _clear_url(at)
    at.switch_page("pages/explorer.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == "tiny-llama"
    assert at.radio(key="form").value == "linear" and at.selectbox(key="map_head").value == 2
    assert at.slider(key="rank_frac").value == 0.25 and at.query_params["head"] == "2"
    _clear_url(at)
    at.switch_page("pages/tour.py").run()
    at.slider(key="tour_rank").set_value(5).run()  # the tour's rank is in tokens
    _clear_url(at)
    at.switch_page("pages/explorer.py").run()
    assert at.radio(key="rank_unit").value == "tokens" and at.slider(key="rank_tokens").value == 5
    assert at.query_params["rank"] == "5"


def test_typed_text_stays_out_of_links_and_survives_a_page_switch():
    at = _explorer(model="tiny-bert", sample=SHORT)
    at.radio(key="text_source").set_value("Type").run()
    at.text_area(key="typed_text").input("A short typed text about principal keys and values.").run()
    assert not at.exception, at.exception
    assert "sample" not in at.query_params and at.query_params["model"] == "tiny-bert"
    _clear_url(at)
    at.switch_page("pages/finetune.py").run()
    _clear_url(at)
    at.switch_page("pages/home.py").run()
    assert not at.exception, at.exception
    assert at.radio(key="text_source").value == "Type"
    assert at.text_area(key="typed_text").value.startswith("A short typed text")
    assert "sample" not in at.query_params
    at.radio(key="text_source").set_value("Sample").run()
    assert at.query_params["sample"] == SHORT  # the sample chosen before comes back


def test_switching_the_rank_unit_keeps_the_rank():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="0.30")
    at.radio(key="rank_unit").set_value("tokens").run()
    assert not at.exception, at.exception
    L = int(at.slider(key="rank_tokens").max)
    assert at.slider(key="rank_tokens").value == resolve_rank(0.3, L)[0]
    assert at.query_params["rank"] == str(resolve_rank(0.3, L)[0])
    at.radio(key="rank_unit").set_value("fraction of L").run()
    assert at.slider(key="rank_frac").value == pytest.approx(0.3)


def test_a_typed_hub_id_without_a_slash_stays_in_the_other_field():
    """ "gpt2" is a hub id with no organisation: typed in the "Other" field it is kept (and its load
    explained, offline), not replaced by the default model with a note about a link."""
    from atp_app.state import OTHER

    at = _explorer(model="tiny-bert")
    at.selectbox(key="model_choice").set_value(OTHER).run()
    at.text_input(key="other_model").input("gpt2").run()
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == OTHER
    assert at.text_input(key="other_model").value == "gpt2"
    assert "The link's model" not in _infos(at)
