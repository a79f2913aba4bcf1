"""Every table of figures in the README is rendered from a file, and the check fails when they differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from atp_viz.cli import main
from atp_viz.outputs import results

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_says_what_the_result_files_say(capsys):
    assert main(["results", "--check"]) == 0, capsys.readouterr().err
    for result in results.RESULTS:
        assert all((ROOT / f).is_file() for f in result.files), result.name
        assert f"<!-- results:{result.name} -->" in results.README.read_text()


def test_a_changed_figure_or_a_missing_table_is_caught(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(results.README, readme)
    text = readme.read_text()
    block = text.index("<!-- results:untuned-minilm -->")
    digit = next(i for i in range(block, len(text)) if text[i].isdigit() and text[i - 1] == ".")
    readme.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])
    assert any("untuned-minilm" in p for p in results.check(readme))
    readme.write_text(
        text.replace("<!-- results:bench-layer -->", "").replace("<!-- /results:bench-layer -->", "")
    )
    assert any("bench-layer" in p for p in results.check(readme))
    readme.write_text(text + "\n<!-- results:nothing-here -->\n<!-- /results:nothing-here -->\n")
    assert any("nothing-here" in p for p in results.check(readme))


def test_a_missing_result_file_says_what_to_run(tmp_path, monkeypatch):
    res = results.RESULTS[0]
    ghost = results.Result(res.name, ("docs/results/not-there.json",), res.render, res.command, res.minutes)
    with pytest.raises(ValueError, match="missing: run the command"):
        results.rendered(ghost)


def test_fields_a_run_lacks_are_unknown_not_zero():
    """Runs made before skipped steps were counted have no such field: shown as unknown, never as 0."""
    from atp_viz.analysis.finetune.evaluation import summary_rows

    meta = {
        "settings": {"model": "minilm", "rank": 0.5, "form": "exact", "steps": 200},
        "metrics": {
            "rows": {
                n: {"cosine_mean": 0.9} for n in ("dense", "dense_tuned_weights", "atp_untuned", "atp_tuned")
            }
        },
        "train_seconds": 60.0,
    }
    (row,) = summary_rows([(Path("run"), meta)])
    assert row["skipped steps"] == "unknown"
    assert "no interval" in row["tuned ATP"]


def test_one_table_by_name_for_the_app():
    assert "| claim | goal |" in results.table("goals")
    with pytest.raises(ValueError, match="No table called 'nope'"):
        results.table("nope")


def test_length_table_says_when_a_length_has_no_text():
    from atp_viz.outputs.result_tuning import render_length_minilm

    c = {"cosine_mean": 0.99, "cosine_mean_ci": [0.98, 0.995], "n_texts": 7}
    buckets = [{"tokens": [24, 64], "cosine": c}, {"tokens": [64, 128], "cosine": None},
               {"tokens": [128, 257], "cosine": c}]  # fmt: skip
    row = {"rank": 0.25, "basis_from": "keys", "model": "data/tuned/run", "buckets": buckets}
    table = render_length_minilm([{"n_texts": 14, "longest": 256, "rows": [row]}])
    assert "| tuned (`data/tuned/run`), basis from keys | L/4 | 0.990 [0.980, 0.995] (7) | no text |" in table


def test_runs_table_marks_an_encoder_run_on_longer_texts():
    from atp_viz.outputs.result_tuning import render_runs

    def run(max_tokens):
        rows = {n: {"cosine_mean": 0.9, "cosine_mean_ci": [0.89, 0.91]}
                for n in ("dense", "dense_tuned_weights", "atp_untuned", "atp_tuned")}  # fmt: skip
        settings = {"model": "minilm", "rank": 0.5, "form": "exact", "steps": 2, "transfer_steps": 1}
        settings["max_tokens"] = max_tokens
        return {"settings": settings, "train_seconds": 60.0, "skipped_steps": 0,
                "metrics": {"rows": rows, "what": f"texts up to {max_tokens}"}}  # fmt: skip

    table = render_runs([run(256), run(128)])
    assert "| L/2, texts <= 256 tokens |" in table and "| L/2 |" in table
    assert "texts up to 128" in table and "another set" in table
    assert "another set" not in render_runs([run(128)])


def test_runs_table_names_a_changed_recipe_setting():
    """Two runs of one form, rank and steps that differ in the adapter rank or the hidden-state weight
    get different labels in the runs table and on the scoreboard; a default recipe gets none."""
    from atp_viz.outputs.result_goals import render_goals
    from atp_viz.outputs.result_tuning import render_runs

    def run(cosine, **recipe):
        rows = {n: {"cosine_mean": cosine, "cosine_mean_ci": [cosine - 0.01, cosine + 0.01]}
                for n in ("dense", "dense_tuned_weights", "atp_untuned", "atp_tuned")}  # fmt: skip
        settings = {"model": "minilm", "rank": 0.5, "form": "exact", "steps": 2, "transfer_steps": 1,
                    "lora_r": 8, "lora_alpha": 16, "hidden_weight": 1.0, **recipe}  # fmt: skip
        metrics = {"rows": rows, "what": "texts"}
        return {"settings": settings, "train_seconds": 60.0, "skipped_steps": 0, "metrics": metrics}

    table = render_runs([run(0.9), run(0.95, lora_r=32, lora_alpha=64), run(0.96, hidden_weight=4.0)])
    labels = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| exact")]
    assert sorted(labels) == ["| exact", "| exact, LoRA r = 32", "| exact, hidden-state weight 4.0"]
    assert "| exact, hidden-state weight 4.0, 1 + 2 steps |" in render_goals(
        [run(0.9), run(0.96, hidden_weight=4.0)]
    )


def test_a_table_without_files_says_so(monkeypatch):
    """An installed copy without docs/ finds no run file: the app says so instead of showing an empty
    scoreboard."""
    empty = results.Result("goals", (), lambda data: "| claim |", "x", 0)
    monkeypatch.setattr(results, "RESULTS", (empty,))
    with pytest.raises(ValueError, match="no file behind"):
        results.table("goals")


def test_gate_table_picks_the_shift_on_the_training_split_and_marks_it():
    from atp_viz.outputs import result_gate

    def row(setting, ppl):
        return {"setting": setting, "perplexity": ppl, "perplexity_ci": (ppl - 1, ppl + 1), "top1": 0.5,
                "n_scored": 10, "ratio_to_dense": 1.2, "ratio_to_dense_ci": (1.1, 1.3),
                "ratio_to_dropped": 0.99, "ratio_to_dropped_ci": (0.98, 1.0)}  # fmt: skip

    train = [row("dense", 8.0), row("dropped", 9.0), row("b-2", 8.9), row("b+0", 9.4), row("b+1", 8.95)]
    assert result_gate.best_shift(train) == -2.0  # dense is lowest but is not a way to read the middle
    short = [row("dense", 8.0), row("dropped", 9.0), row("b-2", 8.9), row("b+0", 8.7)]
    data = {"run": "RUN", "form": "pksoftmax", "rank": 128, "chunk": 256, "sinks": 4, "window": 512,
            "trained_b_mean": -4.0, "shift_chosen_on_training_split": -2.0,
            "parts": [{"text": "training split", "tokens": 2048, "windows": 6, "rows": short},
                      {"text": "training split", "tokens": 8192, "windows": 2, "rows": train},
                      {"text": "held-out", "tokens": 8192, "windows": 1, "rows": train[:4]}]}  # fmt: skip
    text = result_gate.render_gate([data])
    lines = [line for line in text.splitlines() if line.startswith("| held-out")]
    assert any("b -2 (chosen on the training split)" in line for line in lines)
    assert any("b +0 (trained) |" in line for line in lines)
    short_lines = [line for line in text.splitlines() if "6 x 2048" in line]
    assert any("b +0 (trained) (lowest here)" in line for line in short_lines)  # each length its own best
    assert not any("b -2 (" in line for line in short_lines)
    dense = next(line for line in lines if "dense" in line)
    assert dense.endswith("|  |  |")  # dense has no ratio to itself or to the window
    assert "0.018 of its n / r tokens" in text  # exp(-4)


def test_a_readme_part_is_read_between_its_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "README", tmp_path / "README.md")
    with pytest.raises(ValueError, match="not in this copy"):
        results.readme_part("why-open")
    (tmp_path / "README.md").write_text("a\n<!-- part:why-open -->\nwhy\n\n<!-- /part:why-open -->\nb\n")
    assert results.readme_part("why-open") == "why"
    with pytest.raises(ValueError, match="no part 'other'"):
        results.readme_part("other")


def test_a_measurement_says_how_far_it_is(monkeypatch, capsys, tmp_path):
    """`results --measure` reports progress on stderr, and a real measurement (MiniLM's untuned grid, a
    few seconds) reports every step in order and its end."""
    import inspect

    from atp_viz.outputs import result_tables

    for res in results.RESULTS:  # every measurement is handed the progress callback
        if res.measure is not None:
            assert list(inspect.signature(res.measure).parameters) == ["out", "progress"], res.name
    heard = []
    data = result_tables.measure_untuned_minilm(Path("unused.json"), lambda f, m: heard.append((f, m)))
    fractions = [f for f, _ in heard]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(heard) == 2 * len(data["rows"]) + 1 and "(1 of 8)" in heard[0][1]

    def fake(out, progress):
        progress(0.5, "half way")
        return {"rows": []}

    monkeypatch.setattr(results, "ROOT", tmp_path)
    monkeypatch.setattr(results, "RESULTS", (results.Result("fake", ("fake.json",), str, "x", 1, fake),))
    monkeypatch.setattr(results, "write", lambda: None)
    assert main(["results", "--measure", "fake"]) == 0
    err = capsys.readouterr().err
    assert "50% half way" in err and "wrote" in err
