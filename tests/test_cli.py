"""The command line writes the same metrics the app shows; bad input exits 2 with a message."""

from __future__ import annotations

import json

import pytest
import torch

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
    assert len(d["top10_dense"]) == 10
    # the KL printed is that of the two distributions, computed here independently of the command
    from atp_viz.analysis import compare
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model
    from atp_viz.text.inputs import tokenize

    loaded = load_model("tiny-llama")
    tok = tokenize(loaded.tokenizer, text_file.read_text(), loaded.info.max_tokens)
    p = torch.log_softmax(torch.tensor(compare.forward(loaded, tok).next_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(
        torch.tensor(compare.forward(loaded, tok, ATPConfig(4, "linear")).next_logits, dtype=torch.float64),
        -1,
    )
    assert d["next_token_kl_dense_to_atp"] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-6)
    top = [t["p"] for t in d["top10_dense"]]
    assert top == sorted(top, reverse=True) and top[0] == pytest.approx(float(p.exp().max()), rel=1e-6)
    assert set(d["continuation"]) >= {"dense", "atp", "first_divergence", "agreement"}
    assert set(d["sweep"]["errors"]) == set(forms.names())
    assert all(len(e) == len(d["sweep"]["ranks"]) for e in d["sweep"]["errors"].values())


def test_spectra_json(tmp_path, text_file):
    out = tmp_path / "s.json"
    assert main(["spectra", "--model", "tiny-bert", "--text-file", str(text_file), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["layers"]) == 2 and d["layers"][0]["rank_for"]["0.9"] >= 1
    assert d["n_tokens_analysed"] == d["n_tokens"]
    skip = ["spectra", "--model", "tiny-bert", "--text-file", str(text_file), "--skip-first"]
    assert main([*skip, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_tokens_analysed"] == d["n_tokens"] - 1


def test_spectra_refuses_to_leave_out_the_first_of_two_tokens(tmp_path, capsys):
    two = tmp_path / "two.txt"
    two.write_text("Hi there")  # two SmolLM2 tokens: one left, a rank-1 matrix by definition
    assert main(["spectra", "--model", "smollm2", "--text-file", str(two), "--skip-first"]) == 2
    assert "needs at least 3 tokens; the text has 2" in capsys.readouterr().err


def test_verbose_is_read_before_or_after_the_command():
    from atp_viz.cli import build_parser

    cmd = ["spectra", "--text-file", "t.txt"]
    for argv in (["-v", *cmd], [*cmd, "-v"], [*cmd, "--verbose"]):
        assert build_parser().parse_args(argv).verbose is True, argv
    assert build_parser().parse_args(cmd).verbose is False


def test_bad_inputs_exit_2(tmp_path, text_file, capsys):
    assert main(["compare", "--model", "tiny-bert", "--text-file", str(tmp_path / "none.txt")]) == 2
    assert "No such text file" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-bert", "--text-file", str(tmp_path)]) == 2
    assert "is a folder: give a text file" in capsys.readouterr().err
    runs = (
        ("tuned:", "No run folder given after 'tuned:'"),
        (f"tuned:{tmp_path / 'nope'}", "No such run folder"),
        (f"tuned:{tmp_path}", "is not an ATP fine-tuning run"),
    )
    for model, said in runs:
        assert main(["compare", "--model", model, "--text-file", str(text_file)]) == 2
        assert said in capsys.readouterr().err, model
    with pytest.raises(SystemExit) as bad_rank:  # refused while parsing, with the reason
        main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--rank", "0"])
    assert bad_rank.value.code == 2 and "at least 1" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--layers", "5"]) == 2
    assert "do not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--rank", "half"])
    assert main(["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--new-tokens", "5"]) == 0
    assert "--new-tokens is for decoders" in capsys.readouterr().err  # read, and said to do nothing


def test_a_bad_continuation_length_is_refused_before_the_model_loads(text_file, capsys, monkeypatch):
    from atp_viz.hf import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --new-tokens was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    assert main(["compare", "--model", "smollm2", "--text-file", str(text_file), "--new-tokens", "-1"]) == 2
    assert "--new-tokens must be 0 (no continuation) or more, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_a_tuned_model_is_also_compared_with_its_original(tmp_path, text_file, model):
    """compare and perplexity on ``tuned:DIR`` also report the figures against the untouched base model.
    A run of 0 steps is the base model, so those equal the figures against its own dense forward; a
    trained run's differ."""
    from atp_viz.analysis.finetune import training
    from atp_viz.analysis.finetune.config import TuneConfig

    decoder = model == "tiny-llama"
    texts = [text_file.read_text() * 6] if decoder else [text_file.read_text()] * 4
    extra = dict(seq_len=48, chunk=16, eval_windows=1) if decoder else dict(eval_texts=2, batch=4)
    runs = {}
    for steps in (0, 3):
        cfg = TuneConfig(model=model, steps=steps, lr=3e-2, **extra)
        runs[steps] = training.train(cfg, tmp_path / f"run{steps}", texts=texts).out_dir
    got = {}
    for steps, folder in runs.items():
        out = tmp_path / f"c{steps}.json"
        argv = ["compare", "--model", f"tuned:{folder}", "--text-file", str(text_file), "--rank", "0.5",
                "--new-tokens", "0", "--json", str(out)]  # fmt: skip
        assert main(argv) == 0
        got[steps] = json.loads(out.read_text())
        assert got[steps]["original_model"] == model
        assert "not_as_tuned" not in got[steps]  # its own form and basis
    assert main([*argv[:-2], "--basis", "keys", "--json", str(out)]) == 0  # not the basis it was tuned with
    assert "--basis input" in json.loads(out.read_text())["not_as_tuned"]
    if decoder:
        assert got[0]["kl_to_original_dense"] == pytest.approx(got[0]["next_token_kl_dense_to_atp"], abs=1e-7)
        assert got[0]["top1_agrees_with_original_dense"] == got[0]["next_token_top1_agree"]
        assert got[3]["kl_to_original_dense"] != pytest.approx(got[3]["next_token_kl_dense_to_atp"], abs=1e-7)
        out, long_text = tmp_path / "p.json", tmp_path / "long.txt"
        long_text.write_text(texts[0])
        argv = ["perplexity", "--model", f"tuned:{runs[3]}", "--text-file", str(long_text), "--seq-len", "40",
                "--chunk", "16", "--ranks", "4", "--forms", "exact", "--json", str(out)]  # fmt: skip
        assert main(argv) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [r["rank"] for r in rows] == ["original dense", "dense", 4]
        assert all("top1_minus_original_dense_ci" in r for r in rows[1:])
    else:
        assert got[0]["embedding_cosine_to_original_dense"] == pytest.approx(
            got[0]["embedding_cosine_to_dense"]
        )
        assert got[3]["embedding_cosine_to_original_dense"] != pytest.approx(
            got[3]["embedding_cosine_to_dense"], abs=1e-6
        )


def test_finetune_command_runs_both_stages_and_copies_its_record(tmp_path, text_file):
    out, copy = tmp_path / "run", tmp_path / "docs" / "run.json"
    argv = ["finetune", "--model", "tiny-bert", "--form", "taylor2", "--rank", "0.5", "--transfer-steps", "2",
            "--steps", "1", "--batch", "4", "--eval-texts", "4", "--out", str(out),
            "--json-copy", str(copy)]  # fmt: skip
    assert main(argv) == 0
    meta = json.loads(copy.read_text())
    assert meta == json.loads((out / "atp_tuning.json").read_text())
    assert len(meta["transfer_losses"]) == 2 and len(meta["losses"]) == 1
    assert meta["command"][:3] == ["python", "-m", "atp_viz"] and "--transfer-steps" in meta["command"]
    assert meta["settings"]["form"] == "taylor2" and meta["settings"]["transfer_steps"] == 2


def test_perplexity_and_compare_read_a_tuned_decoder_as_tuned_and_say_when_not(tmp_path, text_file):
    """A run's window length, chunk, rank mode and rank are the defaults; each one given otherwise is
    named in a note and in the JSON."""
    from atp_viz.analysis.finetune import training
    from atp_viz.analysis.finetune.config import TuneConfig

    cfg = TuneConfig(model="tiny-llama", steps=1, seq_len=48, chunk=16, rank_mode="effective", eval_windows=1)
    run = training.train(cfg, tmp_path / "run", texts=[text_file.read_text() * 6]).out_dir
    long_text, out = tmp_path / "long.txt", tmp_path / "p.json"
    long_text.write_text(text_file.read_text() * 6)
    argv = ["perplexity", "--model", f"tuned:{run}", "--text-file", str(long_text), "--ranks", "0.5",
            "--forms", "exact", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert (got["seq_len"], got["chunk"], got["rank_mode"]) == (48, 16, "effective")
    assert "not_as_tuned" not in got
    assert main([*argv, "--rank-mode", "past", "--seq-len", "40"]) == 0
    note = json.loads(out.read_text())["not_as_tuned"]
    assert "--rank-mode past (tuned: effective)" in note and "--seq-len 40 (tuned: 48)" in note
    argv = ["compare", "--model", f"tuned:{run}", "--text-file", str(text_file), "--new-tokens", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "not_as_tuned" not in json.loads(out.read_text())
    assert main([*argv, "--rank", "0.25", "--json", str(out)]) == 0
    assert "tuned at r = 0.5 L (pass --rank 0.5)" in json.loads(out.read_text())["not_as_tuned"]


def test_a_run_tuned_with_a_centred_basis_is_read_with_it(tmp_path, text_file, capsys):
    """The centred basis is part of how a run was tuned: compare and perplexity read it so by default, say
    so when told otherwise, and the label names it."""
    from atp_viz.analysis.finetune import training
    from atp_viz.analysis.finetune.config import TuneConfig
    from atp_viz.hf.tuned import read_settings, tuned_label

    enc = TuneConfig(model="tiny-bert", steps=1, centre_basis=True, eval_texts=2, batch=4)
    run = training.train(enc, tmp_path / "enc", texts=[text_file.read_text()] * 4).out_dir
    assert "centred" in tuned_label(read_settings(str(run)))
    out = tmp_path / "c.json"
    argv = ["compare", "--model", f"tuned:{run}", "--text-file", str(text_file), "--json", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert got["config"]["centre_basis"] is True and "not_as_tuned" not in got
    assert main([*argv, "--no-centre-basis"]) == 0
    assert "tuned with a centred basis (pass --centre-basis)" in json.loads(out.read_text())["not_as_tuned"]
    dec = TuneConfig(model="tiny-llama", steps=1, seq_len=48, chunk=16, eval_windows=1, centre_basis=True)
    run = training.train(dec, tmp_path / "dec", texts=[text_file.read_text() * 6]).out_dir
    long_text = tmp_path / "long.txt"
    long_text.write_text(text_file.read_text() * 6)
    argv = ["perplexity", "--model", f"tuned:{run}", "--text-file", str(long_text), "--ranks", "4",
            "--forms", "exact", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0 and json.loads(out.read_text())["centre_basis"] is True
    gen = ["generate", "--model", f"tuned:{run}", "--prompt-file", str(text_file), "--max-new-tokens", "2"]
    assert main([*gen, "--json", str(out)]) == 0 and json.loads(out.read_text())["centre_basis"] is True
    assert main([*argv[:-4], "--forms", "linear", "--basis-update", "moments"]) == 2
    assert "--centre-basis needs --basis-update recompute" in capsys.readouterr().err
    per_layer = TuneConfig(model="tiny-llama", rank=0.375, layer_ranks=(0.5, 0.25), layer_ranks_from="given",
                           steps=1, seq_len=48, chunk=16, eval_windows=1)  # fmt: skip
    run = training.train(per_layer, tmp_path / "per-layer", texts=[text_file.read_text() * 6]).out_dir
    gen[2] = f"tuned:{run}"
    assert main([*gen, "--json", str(out)]) == 0  # generation has one rank: said, not hidden
    assert "tuned with its own rank per layer (0.5,0.25 of L); generation runs one rank, r = 0.375" in (
        capsys.readouterr().err
    )


def test_impossible_outputs_and_lengths_are_refused_before_any_work(tmp_path, text_file, capsys):
    spectra = ["spectra", "--model", "tiny-bert", "--text-file", str(text_file)]
    assert main([*spectra, "--json", str(tmp_path)]) == 2
    assert "is a folder: give a file" in capsys.readouterr().err
    assert main([*spectra, "--json", str(text_file / "x.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    ppl = ["perplexity", "--model", "tiny-gpt2", "--ranks", "4", "--forms", "exact", "--windows", "1"]
    assert main([*ppl, "--seq-len", "4096", "--chunk", "1024"]) == 2
    assert "reads at most" in capsys.readouterr().err
    assert main(["finetune", "--model", "tiny-bert", "--steps", "0", "--out", str(tmp_path / "run")]) == 2
    assert "nothing would be trained" in capsys.readouterr().err and not (tmp_path / "run").exists()
    compare = ["compare", "--model", "tiny-bert", "--text-file", str(text_file), "--layer-ranks", "0.5,0.25"]
    assert main([*compare, "--rank", "0.5"]) == 2
    assert "serve r = 0.375 L, not --rank 0.5" in capsys.readouterr().err
    out = tmp_path / "c.json"
    assert main([*compare, "--json", str(out)]) == 0  # no --rank: the shares' mean is the budget
    got = json.loads(out.read_text())
    assert got["config"]["rank"] == 0.375
    ranks = got["layer_ranks"]  # the summary's mean is the layers' mean, not the budget's r
    assert (
        f"per layer {', '.join(map(str, ranks))} (mean {sum(ranks) / len(ranks):g})"
        in capsys.readouterr().err
    )
    split = [
        "perplexity",
        "--model",
        "tiny-llama",
        "--forms",
        "exact",
        "--windows",
        "1",
        "--layer-ranks",
        "0.5,0.25",
    ]
    assert main(split) == 2  # no --ranks: the default ranks are key counts, and the message says so
    err = capsys.readouterr().err
    assert "give --ranks as shares" in err and "without --ranks, the default ranks do" in err


def test_generate_compares_caches_and_reads_a_tuned_run_as_tuned(tmp_path, text_file, capsys):
    from atp_viz.analysis.finetune import training
    from atp_viz.analysis.finetune.config import TuneConfig
    from atp_viz.core.ranks import resolve_rank

    out = tmp_path / "g.json"
    argv = ["generate", "--prompt-file", str(text_file), "--max-new-tokens", "3", "--json", str(out)]
    assert main([*argv, "--model", "tiny-llama"]) == 0
    got = json.loads(out.read_text())
    assert (got["form"], got["basis_from"]) == (forms.DEFAULT, "input") and got["token_agreement"] is not None
    assert {got["stop_reason_dense"], got["stop_reason_atp"]} <= {"max_new_tokens", "eos"}
    cfg = TuneConfig(model="tiny-llama", form="pksoftmax", rank=0.25, basis_from="keys", steps=1, seq_len=48,
                     chunk=16, eval_windows=1)  # fmt: skip
    run = training.train(cfg, tmp_path / "run", texts=[text_file.read_text() * 6]).out_dir
    assert main([*argv, "--model", f"tuned:{run}"]) == 0
    got = json.loads(out.read_text())
    assert (got["form"], got["basis_from"]) == ("pksoftmax", "keys")
    assert got["rank"] == resolve_rank(0.25, got["prompt_tokens"])[0]
    assert main([*argv, "--model", "tiny-llama", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
