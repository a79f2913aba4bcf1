"""Server mode and deployment limits: parsed from the environment and a TOML file, enforced in the
library (a model that is refused there is refused for the CLI too) and shown in the app."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from atp_viz.deploy.settings import SERVER_MAX_TOKENS, Settings, SettingsError, load_settings
from atp_viz.hf import model_info
from atp_viz.hf.model_info import ModelLoadError
from atp_viz.hf.models import load_model
from atp_viz.text.inputs import MAX_UPLOAD_BYTES, TextError, decode_upload, tokenize

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SERVER = Settings(server_mode=True)

CONFIG = """
# A shared deployment
allowed_models = ["minilm", "tiny-bert", "HuggingFaceTB/SmolLM2-360M-Instruct"]
max_upload_bytes = 200_000
max_tokens = 256
max_map_tokens = 1024
map_display_size = 128
max_heavy_jobs = 2
"""


def _config(tmp_path: Path, text: str = CONFIG) -> dict[str, str]:
    path = tmp_path / "atp_viz.toml"
    path.write_text(text)
    return {"ATP_VIZ_CONFIG": str(path)}


# ---- reading the settings ---------------------------------------------------------------------------


def test_defaults_are_local_mode():
    s = load_settings({})
    assert s == Settings() and not s.server_mode
    assert s.token_limit is None and s.max_upload_bytes == MAX_UPLOAD_BYTES
    assert s.model_refusal("/some/folder") is None and s.model_refusal("org/name") is None


@pytest.mark.parametrize("flag", ["1", "true", "ON"])
def test_env_turns_server_mode_on(flag):
    s = load_settings({"ATP_VIZ_SERVER_MODE": flag})
    assert s.server_mode and s.allowed_models == ("minilm", "smollm2")
    assert s.token_limit == SERVER_MAX_TOKENS


def test_env_flag_must_be_a_switch():
    with pytest.raises(SettingsError, match="not a switch"):
        load_settings({"ATP_VIZ_SERVER_MODE": "maybe"})


def test_config_file_parses_and_turns_server_mode_on(tmp_path):
    s = load_settings(_config(tmp_path))
    assert s.server_mode
    assert s.allowed_models == ("minilm", "tiny-bert", "HuggingFaceTB/SmolLM2-360M-Instruct")
    assert (s.max_upload_bytes, s.max_tokens, s.token_limit) == (200_000, 256, 256)
    assert (s.max_map_tokens, s.map_display_size, s.max_heavy_jobs) == (1024, 128, 2)
    assert "atp_viz.toml" in s.source
    assert "tiny-bert" in s.describe() and "200 kB" in s.describe() and "256 tokens" in s.describe()


def test_config_file_can_keep_local_mode_and_env_wins(tmp_path):
    env = _config(tmp_path, "server_mode = false\nmax_heavy_jobs = 3\n")
    s = load_settings(env)
    assert not s.server_mode and s.max_heavy_jobs == 3
    assert load_settings({**env, "ATP_VIZ_SERVER_MODE": "1"}).server_mode
    assert not load_settings({**_config(tmp_path), "ATP_VIZ_SERVER_MODE": "0"}).server_mode


@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_env_flag_counts_as_not_given(tmp_path, empty):
    """docker-compose often passes `ATP_VIZ_SERVER_MODE=` (empty): a config file's server mode stands."""
    assert load_settings({**_config(tmp_path), "ATP_VIZ_SERVER_MODE": empty}).server_mode
    assert not load_settings({"ATP_VIZ_SERVER_MODE": empty}).server_mode
    assert load_settings({"ATP_VIZ_SERVER_MODE": empty}).source == "defaults"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_tokens = 64", "max_tokens must be a whole number >= 128"),
        ("max_upload_bytes = '1 MB'", "max_upload_bytes must be a whole number"),
        ("allowed_models = []", "non-empty list"),
        ("allowed_models = 'minilm'", "non-empty list"),
        ("server_mode = 'yes'", "server_mode must be true or false"),
        ("max_tokenz = 100", "unknown setting"),
        ("dtype = 'float8'", "dtype must be one of"),
        ("max_tokens = [", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_the_reason(tmp_path, text, match):
    with pytest.raises(SettingsError, match=match):
        load_settings(_config(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"ATP_VIZ_CONFIG": str(tmp_path / "nope.toml")})


# ---- what server mode refuses, in the library ---------------------------------------------------------


def test_refusal_messages():
    assert SERVER.model_refusal("minilm") is None and SERVER.model_refusal(" smollm2 ") is None
    assert "local paths" in SERVER.model_refusal("/srv/models/llama")
    assert "local paths" in SERVER.model_refusal("./models/x")
    assert "not one of this server's models" in SERVER.model_refusal("org/some-model")
    assert "not one of this server's models" in SERVER.model_refusal("tiny-bert")  # tests only if listed
    assert "minilm, smollm2" in SERVER.model_refusal("org/some-model")


def test_library_refuses_local_path_in_server_mode(load, tmp_path):
    # A perfectly loadable folder: refused for where it is, before anything is read.
    src = load("tiny-llama")
    src.model.save_pretrained(tmp_path, safe_serialization=True)
    src.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="local paths .* disabled on this server"):
        load_model(str(tmp_path), settings=SERVER)
    assert load_model(str(tmp_path), device="cpu").info.is_decoder  # local mode still loads it


def test_library_refuses_unlisted_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not one of this server's models"):
        load_model("nobody/no-such-model-xyz", settings=SERVER)
    # A listed hub id passes the check (and here fails only because the hub is offline).
    listed = Settings(server_mode=True, allowed_models=("nobody/no-such-model-xyz",))
    with pytest.raises(ModelLoadError, match="not a bundled model"):
        load_model("nobody/no-such-model-xyz", settings=listed)


def test_library_refuses_unlisted_tiny_model():
    with pytest.raises(ModelLoadError, match="not one of this server's models"):
        load_model("tiny-bert", settings=SERVER)


def test_bundled_model_loads_in_server_mode():
    loaded = load_model("minilm", device="cpu", settings=SERVER)
    assert loaded.info.key == "minilm" and loaded.info.max_tokens == 512  # below the server cap


def test_token_limit_caps_the_model_and_says_so():
    s = Settings(server_mode=True, allowed_models=("tiny-llama",), max_tokens=128)
    loaded = load_model("tiny-llama", device="cpu", settings=s)
    assert loaded.info.max_tokens == 128  # the model itself accepts 1024
    tok = tokenize(loaded.tokenizer, "token " * 300, loaded.info.max_tokens)
    assert tok.n_tokens == 128 and tok.truncated
    assert "128" in tok.notice and "server's token limit" in tok.notice


def test_upload_limit_is_configurable():
    with pytest.raises(TextError, match="limited to 1 kB here"):
        decode_upload(b"a" * 1001, "notes.txt", max_bytes=1000)
    assert decode_upload(b"a" * 1000, max_bytes=1000) == "a" * 1000
    with pytest.raises(TextError, match="limited to 1 MB"):
        decode_upload(b"a" * (MAX_UPLOAD_BYTES + 1))


def test_map_guard():
    s = Settings(max_map_tokens=1000)
    assert s.map_refusal(1000) is None
    msg = s.map_refusal(1001)
    assert "1,001 tokens" in msg and "limited to 1,000" in msg and "Pick a shorter text" in msg


# ---- the app in server mode ------------------------------------------------------------------------------


def test_app_in_server_mode_has_no_other_option(monkeypatch):
    monkeypatch.setenv("ATP_VIZ_SERVER_MODE", "1")
    monkeypatch.delenv("ATP_VIZ_CONFIG", raising=False)
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["sample"] = "01_one_sentence"
    at.run()
    assert not at.exception, at.exception
    options = at.selectbox(key="model_choice").options  # as shown: labels
    assert options == [c.label for c in model_info.BUNDLED]
    assert not any(o.startswith("Other") for o in options)
    assert any(c.value.startswith("Server mode:") for c in at.sidebar.caption)


def test_app_in_server_mode_refuses_unlisted_model_from_link(monkeypatch, tmp_path):
    monkeypatch.setenv("ATP_VIZ_CONFIG", _config(tmp_path)["ATP_VIZ_CONFIG"])
    monkeypatch.delenv("ATP_VIZ_SERVER_MODE", raising=False)
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["model"] = str(tmp_path)  # a local folder
    at.query_params["sample"] = "01_one_sentence"
    at.switch_page("pages/explorer.py")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").options == [
        model_info.BUNDLED[0].label,
        model_info.TINY[0].label,
        "HuggingFaceTB/SmolLM2-360M-Instruct",
    ]
    assert at.selectbox(key="model_choice").value == "minilm"
    assert any("local paths" in w.value and "Showing minilm" in w.value for w in at.warning)
    assert at.query_params["model"] == "minilm"


def test_app_with_invalid_config_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("ATP_VIZ_CONFIG", _config(tmp_path, "max_heavy_jobs = 0")["ATP_VIZ_CONFIG"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("configuration is invalid" in e.value and "max_heavy_jobs" in e.value for e in at.error)


def test_explorer_refuses_maps_above_the_limit(monkeypatch, tmp_path):
    cfg = "server_mode = false\nmax_map_tokens = 16\n"
    monkeypatch.setenv("ATP_VIZ_CONFIG", _config(tmp_path, cfg)["ATP_VIZ_CONFIG"])
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["model"] = "tiny-bert"
    at.query_params["sample"] = "02_short_paragraph"  # more than 16 tokens
    at.switch_page("pages/explorer.py")
    at.run()
    assert not at.exception, at.exception
    assert any("Attention maps are not drawn" in i.value and "limited to 16" in i.value for i in at.info)
    assert [c.key for c in at.get("plotly_chart")] == ["explorer_layer_err"]  # the other views still work


def test_explorer_aggregates_maps_above_the_display_size(monkeypatch, tmp_path):
    cfg = "server_mode = false\nmap_display_size = 16\n"
    monkeypatch.setenv("ATP_VIZ_CONFIG", _config(tmp_path, cfg)["ATP_VIZ_CONFIG"])
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["model"] = "tiny-bert"
    at.query_params["sample"] = "02_short_paragraph"
    at.switch_page("pages/explorer.py")
    at.run()
    assert not at.exception, at.exception
    charts = {c.key: c for c in at.get("plotly_chart")}
    assert "map_dense" in charts
    assert "averaged over blocks of" in charts["map_dense"].proto.spec


def test_bundled_list_matches_models():
    from atp_viz.deploy.settings import BUNDLED_KEYS

    assert tuple(c.key for c in model_info.BUNDLED) == BUNDLED_KEYS


def test_typed_text_above_the_limit_is_refused_not_cut(monkeypatch, tmp_path):
    monkeypatch.setenv("ATP_VIZ_CONFIG", _config(tmp_path, "max_upload_bytes = 50\n")["ATP_VIZ_CONFIG"])
    monkeypatch.delenv("ATP_VIZ_SERVER_MODE", raising=False)
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.radio(key="text_source").set_value("Type").run()
    at.text_area(key="typed_text").input("word " * 20).run()  # 100 bytes
    assert not at.exception, at.exception
    assert at.text_area(key="typed_text").value == "word " * 20  # kept whole
    assert any("at most 50 bytes" in w.value for w in at.warning)
