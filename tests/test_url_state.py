"""The view lives in the URL: a link reproduces model, sample, rank, form, layer and head; bad links
fall back to defaults with a message, never an exception."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from atp_viz import forms
from atp_viz.deploy import urlstate

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
    ],
)
def test_parse_rank(raw, expected):
    assert urlstate.parse_rank(raw, 20) == expected


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("0.33", "steps of 0.05"),
        ("1.5", "between 0.05 and 1"),
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
    assert not at.info or "Defaults used" not in _infos(at)
    assert "linear form" in at.subheader[0].value


def test_rank_in_tokens_from_link():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="5")
    assert not at.exception, at.exception
    assert at.radio(key="rank_unit").value == "tokens"
    assert at.slider(key="rank_tokens").value == 5
    assert at.subheader[0].value.startswith("r = 5 of L")


def test_changing_widgets_writes_the_url():
    at = _explorer(model="tiny-bert", sample=SHORT)
    assert not at.exception, at.exception
    # The first run already writes the whole view, defaults included, so the link is complete.
    assert at.query_params["model"] == "tiny-bert" and at.query_params["sample"] == SHORT
    assert at.query_params["rank"] == "0.50" and at.query_params["form"] == "exact"
    assert at.query_params["layer"] == "0" and at.query_params["head"] == "0"
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


def test_invalid_link_values_fall_back_with_a_message():
    at = _explorer(model="tiny-bert", sample=SHORT, rank="0.33", form="cubic", layer="9", head="-1")
    assert not at.exception, at.exception
    info = _infos(at)
    for part in ("rank=0.33", "form='cubic'", "layer=9 does not exist", "head=-1 does not exist"):
        assert part in info, info
    assert at.slider(key="rank_frac").value == 0.5
    assert at.radio(key="form").value == "exact"
    assert at.selectbox(key="map_layer").value == 0 and at.selectbox(key="map_head").value == 0
    # ... and the URL is corrected to what is shown.
    assert at.query_params["rank"] == "0.50" and at.query_params["layer"] == "0"


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
    assert at.query_params["head"] == "0" and at.query_params["model"] == "tiny-bert"
