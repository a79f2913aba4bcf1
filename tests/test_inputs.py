"""Bad input gets a clear message (the app shows these messages as they are)."""

from __future__ import annotations

import json

import pytest

from atp_viz.hf.model_info import ModelLoadError
from atp_viz.hf.models import load_model
from atp_viz.text.inputs import MAX_UPLOAD_BYTES, TextError, decode_upload, readable_tokens, samples, tokenize


@pytest.mark.parametrize("text", ["", "   \n\t  ", None])
def test_empty_text(load, text):
    with pytest.raises(TextError, match="empty"):
        tokenize(load("tiny-bert").tokenizer, text, 512)


def test_one_token(load):
    tok = load("smollm2").tokenizer  # adds no special tokens: "Hello" is one token
    with pytest.raises(TextError, match="1 token"):
        tokenize(tok, "Hello", 8192)


def test_too_long_is_truncated_with_notice(load):
    t = tokenize(load("tiny-bert").tokenizer, "token " * 600, 512)
    assert t.n_tokens == 512 and t.truncated
    assert "602" in t.notice and "512" in t.notice


def test_upload_non_utf8():
    with pytest.raises(TextError, match="not valid UTF-8"):
        decode_upload("caf\u00e9".encode("latin-1"), "notes.txt")


def test_upload_binary():
    with pytest.raises(TextError, match="binary"):
        decode_upload(b"\x89PNG\r\n\x1a\n\x00\x00\x00", "image.txt")


def test_upload_too_big():
    with pytest.raises(TextError, match="limited to 1 MB"):
        decode_upload(b"a" * (MAX_UPLOAD_BYTES + 1), "big.txt")


def test_upload_ok_with_bom():
    assert decode_upload("\ufeffhello world".encode()) == "hello world"


def test_samples_exist_and_span_lengths(load):
    ss = samples()
    assert len(ss) >= 5
    tok = load("tiny-bert").tokenizer
    lengths = [len(tok(s.read())["input_ids"]) for s in ss]
    assert min(lengths) < 40 and max(lengths) >= 1500


def test_unknown_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a bundled model"):
        load_model("nobody/no-such-model-xyz")


def test_a_mistyped_shipped_model_is_named_at_once(monkeypatch):
    import atp_viz.hf.checkpoints as checkpoints

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub for a name one typo from a shipped model")

    monkeypatch.setattr(checkpoints, "_load_config", no_hub)
    for typo, meant in (("smolm2", "smollm2"), ("SmolLM2", "smollm2"), ("minlm", "minilm")):
        with pytest.raises(ModelLoadError, match=f"Did you mean '{meant}'"):
            load_model(typo)
    with pytest.raises(AssertionError, match="asked the hub"):  # other names still go to the hub
        load_model("gpt2")


def test_missing_folder():
    with pytest.raises(ModelLoadError, match="No such folder"):
        load_model("./no/such/folder")


def test_empty_model_name():
    with pytest.raises(ModelLoadError, match="No model given"):
        load_model("  ")


def test_pickled_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="only has pickled weights"):
        load_model(str(tmp_path))


def test_remote_code_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "custom-thing", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}})
    )
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="custom code"):
        load_model(str(tmp_path))


def test_local_folder_roundtrip(load, tmp_path):
    """Any model saved as safetensors loads from its folder (the 'other model' path)."""
    src = load("tiny-llama")
    src.model.save_pretrained(tmp_path, safe_serialization=True)
    src.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.info.is_decoder and loaded.info.n_kv_heads == 2
    assert loaded.info.source.startswith("local folder")


def test_byte_level_tokens_show_as_text_not_as_their_byte_stand_ins(load):
    tok = tokenize(load("smollm2").tokenizer, "Café — über\nx", 100)
    shown = readable_tokens(tok.tokens)
    assert "é" in shown and " —" in shown and "\\n" in shown  # not 'Ã©', 'ĠâĢĶ', 'Ċ'
    assert not any(ch in "".join(shown) for ch in "ÃâĠĊ")
    assert " \\xc3" in shown and "\\xbc" in shown  # ü split over two tokens: its bytes, escaped
    assert readable_tokens(["Ġesù", "a\tb"]) == ["Ġesù", "a\\tb"]  # a real letter stays; a tab shows
    bert = tokenize(load("minilm").tokenizer, "Café — über", 100).tokens  # WordPiece: as it has it
    assert bert[0] == "[CLS]" and "cafe" in bert
