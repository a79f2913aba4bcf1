"""The offline HTML report (``python -m atp_viz report``) on a tiny random model: every promised file."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atp_viz import forms
from atp_viz.analysis import spectra
from atp_viz.cli import main
from atp_viz.outputs import export
from atp_viz.outputs.report import ReportSettings, make_report

TEXT = (
    "Attention on top principal keys keeps the few directions that carry most of the energy. "
    "A <b>tag</b> & an ampersand must appear escaped in the report's header."
)
CHROMIUM = Path(export.SYSTEM_CHROMIUM)
FIGURES = ("spectra", "energy", "ranks_needed", "rank_sweep", "map_dense", "map_principal")
FIGURES += ("map_lifted", "map_difference")


@pytest.fixture(autouse=True)
def _system_chromium(monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)


@pytest.fixture(scope="module")
def report_dir(load, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    settings = ReportSettings(ranks=(2, 4, 0.5), form="linear", map_rank=3, map_head=1, write_capture=True)
    make_report(load("tiny-bert"), TEXT, out, settings)
    return out


def test_report_html_is_offline_and_holds_every_figure(report_dir, load):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert page.count("plotly.js v") == 1  # inlined once for all figures
    assert not re.search(r"<script[^>]*\bsrc=", page), "no external script may be loaded"
    assert page.count("Plotly.newPlot(") == len(FIGURES)
    for heading in ("Singular values of the attention input X", "Error vs rank", "Attention map: dense"):
        assert heading in page
    info = load("tiny-bert").info
    assert info.label in page and "tokens L" in page
    assert "layer 1, head 1, r = 3" in page and "linear form" in page
    assert "A &lt;b&gt;tag&lt;/b&gt; &amp; an ampersand" in page and "<b>tag</b>" not in page
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", page)


def test_report_data_files_hold_the_computed_values(report_dir, load):
    from atp_viz.analysis.capture import capture

    cap = capture(load("tiny-bert"), TEXT)
    L = cap.n_tokens
    npz = np.load(report_dir / "spectra.npz")
    for i, sp in enumerate(spectra.layer_spectra([layer.x for layer in cap.layers])):
        # The capture runs again here; float noise only moves the near-zero tail.
        s = sp.singular_values
        np.testing.assert_allclose(npz[f"sv_{i}"], s, rtol=1e-5, atol=1e-5 * s[0])
    assert npz["labels"].tolist() == [f"layer {i}" for i in range(len(cap.layers))]

    rows = json.loads((report_dir / "sweep.json").read_text())
    assert [r["rank"] for r in rows] == sorted({2, 4, round(0.5 * L)})
    back = pd.read_csv(report_dir / "sweep.csv").to_dict("records")
    assert back == rows
    assert all({f"{name}_form_error" for name in forms.names()} <= set(r) for r in rows)

    cnpz = np.load(report_dir / "capture.npz")
    np.testing.assert_allclose(cnpz["blocks.0.x"], cap.layers[0].x, rtol=1e-5, atol=1e-6)
    assert cnpz["tokens"].tolist() == list(cap.tokens)
    assert cnpz["attn_layers"].tolist() == [1]  # the map's layer (the middle one of two)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: no PNG files to check")
def test_report_writes_a_png_per_figure(report_dir):
    for name in FIGURES:
        data = (report_dir / "figures" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "No PNG files" not in (report_dir / "report.html").read_text()


def test_report_without_chromium_says_so(load, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium-here"))
    make_report(load("tiny-bert"), TEXT, tmp_path / "out", ReportSettings(ranks=(2,)))
    page = (tmp_path / "out" / "report.html").read_text()
    assert "No PNG files: PNG and SVG export need Chromium" in page
    assert not (tmp_path / "out" / "figures").exists()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "report.html",
        "spectra.npz",
        "sweep.csv",
        "sweep.json",
    }


def test_a_report_into_a_used_folder_leaves_nothing_of_the_earlier_one(load, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium-here"))  # this report writes no PNG
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    for name in ("capture.npz", "figures/map_dense.png", "figures/my_plot.png", "my_notes.txt"):
        (out / name).write_text("from an earlier report, or the user's")
    make_report(load("tiny-bert"), TEXT, out, ReportSettings(ranks=(2,)))
    assert (out / "capture.npz").exists()  # no report.html: not a report's folder, nothing removed
    # ... but the files with a report's names that it did not write are named, not passed off as its own
    said = "also holds capture.npz, figures/map_dense.png, not written by this report (left as they were)"
    assert said in (out / "report.html").read_text()
    make_report(load("tiny-bert"), TEXT, out, ReportSettings(ranks=(2,)))  # now it is one
    assert not (out / "capture.npz").exists() and not (out / "figures" / "map_dense.png").exists()
    assert (out / "my_notes.txt").exists() and (out / "figures" / "my_plot.png").exists()  # not a report's
    page = (out / "report.html").read_text()
    assert (
        "removed first (report.html, spectra.npz, sweep.csv, sweep.json, capture.npz, figures/map_dense.png)"
        in page
    )


def test_report_cli(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    rc = main(
        ["report", "--model", "tiny-llama", "--text-file", str(text), "--out", str(out), "--ranks", "1,3"]
        + ["--no-png", "--map-rank", "5000"]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "note: " in err and "5000" in err  # the clamped map rank is said on the terminal as well
    assert "report: loading tiny-llama" in err and "report: done" in err and "sweep r = 3" in err
    assert "PNG files were not asked for" in (out / "report.html").read_text()
    assert [r["rank"] for r in json.loads((out / "sweep.json").read_text())] == [1, 3]
    assert not (out / "capture.npz").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ranks", "2,5000"], "exceeds the text's L"),
        (["--map-layer", "7"], "Map layer 7 does not exist"),
        (["--map-head", "9"], "Map head 9 does not exist"),
    ],
)
def test_report_cli_bad_settings_are_explained(tmp_path, capsys, extra, message):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    argv = ["report", "--model", "tiny-bert", "--text-file", str(text), "--out", str(tmp_path / "o")]
    assert main(argv + extra + ["--no-png"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_report_cli_refuses_a_rank_below_one_while_parsing(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "report",
                "--model",
                "tiny-bert",
                "--text-file",
                str(text),
                "--out",
                str(tmp_path / "o"),
                "--ranks",
                "0,2",
            ]
        )
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_cli_missing_text_file(tmp_path, capsys):
    rc = main(["report", "--model", "tiny-bert", "--text-file", str(tmp_path / "nope.txt"), "--out", "x"])
    assert rc == 2 and "No such text file" in capsys.readouterr().err


def test_report_files_are_readable_without_pickle(report_dir):
    for name in ("spectra.npz", "capture.npz"):
        with np.load(io.BytesIO((report_dir / name).read_bytes()), allow_pickle=False) as npz:
            assert npz.files


def test_a_report_on_a_tuned_model_does_not_call_it_untuned(tmp_path, capsys, monkeypatch):
    """The report reads any model with the paper's basis and one rank; on a tuned run it says so (page and
    terminal) instead of calling the model untuned."""
    from atp_viz.analysis.finetune import training
    from atp_viz.analysis.finetune.config import TuneConfig

    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path / "cache"))
    run = training.train(
        TuneConfig(model="tiny-bert", steps=1, batch=4, eval_texts=4), texts=[TEXT] * 8
    ).out_dir
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    argv = ["report", "--text-file", str(text), "--ranks", "2", "--no-png"]
    assert main([*argv, "--model", f"tuned:{run}", "--out", str(tmp_path / "tuned")]) == 0
    page = (tmp_path / "tuned" / "report.html").read_text()
    assert "Untuned model" not in page and "A fine-tuned model, read here with the paper's basis" in page
    assert "note: a tuned model is read here" in capsys.readouterr().err
    assert main([*argv, "--model", "tiny-bert", "--out", str(tmp_path / "plain")]) == 0
    assert "Untuned model" in (tmp_path / "plain" / "report.html").read_text()
    assert "note: a tuned model" not in capsys.readouterr().err
