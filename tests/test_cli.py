"""The command line writes the same metrics the app shows; bad input exits 2 with a message."""

from __future__ import annotations

import json

import pytest

from atp_viz import forms
from atp_viz.cli import main


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Principal keys keep the directions that matter. " * 4)
    return p


def test_compare_encoder_json(tmp_path, text_file):
    out = tmp_path / "c.json"
    rc = main(
        [
            "compare",
            "--model",
            "tiny-bert",
            "--text-file",
            str(text_file),
            "--rank",
            "1.0",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["rank"] == d["n_tokens"]
    assert d["embedding_cosine_to_dense"] == pytest.approx(1.0, abs=1e-5)
    assert len(d["layer_relative_error"]) == 2


def test_compare_decoder_json_with_continuation_and_sweep(tmp_path, text_file):
    out = tmp_path / "c.json"
    argv = [
        "compare",
        "--model",
        "tiny-llama",
        "--text-file",
        str(text_file),
        "--rank",
        "4",
        "--form",
        "linear",
    ]
    rc = main([*argv, "--new-tokens", "3", "--sweep", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["rank"] == 4 and d["config"]["form"] == "linear"
    assert len(d["top10_dense"]) == 10 and d["next_token_kl_dense_to_atp"] >= 0
    assert set(d["continuation"]) >= {"dense", "atp", "first_divergence", "agreement"}
    assert set(d["sweep"]["errors"]) == set(forms.names())
    assert all(len(e) == len(d["sweep"]["ranks"]) for e in d["sweep"]["errors"].values())


def test_spectra_json(tmp_path, text_file):
    out = tmp_path / "s.json"
    assert main(["spectra", "--model", "tiny-bert", "--text-file", str(text_file), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["layers"]) == 2 and d["layers"][0]["rank_for"]["0.9"] >= 1


def test_bad_inputs_exit_2(tmp_path, text_file, capsys):
    assert main(["compare", "--model", "tiny-bert", "--text-file", str(tmp_path / "none.txt")]) == 2
    assert "No such text file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_rank:  # refused while parsing, with the reason
        main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--rank", "0"])
    assert bad_rank.value.code == 2 and "at least 1" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--layers", "5"]) == 2
    assert "do not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--rank", "half"])
