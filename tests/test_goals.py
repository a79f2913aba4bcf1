"""The README's scoreboard of the paper's claims: met only when the whole interval is inside the goal,
no step was skipped, and (long context) speed, share of the ceiling and perplexity all hold."""

from __future__ import annotations

import pytest

from atp_viz.outputs.result_goals import render_goals


def _run(model, form, rank, tuned, lo, hi, *, skipped=0, ratio=(1.02, 1.01, 1.04), mode="effective"):
    """A fine-tuning run's JSON, as training writes it (only the fields the scoreboard reads)."""
    if model == "minilm":
        row = {"cosine_mean": tuned, "cosine_mean_ci": [lo, hi]}
        untuned = {"cosine_mean": 0.5, "cosine_mean_ci": [0.4, 0.6]}
    else:
        row = {
            "top1_minus_reference": tuned,
            "top1_minus_reference_ci": [lo, hi],
            "perplexity_ratio_to_reference": ratio[0],
            "perplexity_ratio_to_reference_ci": list(ratio[1:]),
        }
        untuned = {"top1_minus_reference": -0.08, "top1_minus_reference_ci": [-0.09, -0.07]}
    settings = {
        "model": model,
        "form": form,
        "rank": rank,
        "rank_mode": mode,
        "transfer_steps": 1,
        "steps": 2,
    }
    rows = {"atp_tuned": row, "atp_untuned": untuned}
    return {"settings": settings, "skipped_steps": skipped, "metrics": {"rows": rows}}


def _prefill(speedup, ceiling, ratio_hi, *, tokens=8192, middle=None):
    run = {"model": "smollm2", "form": "pksoftmax", "rank": 128, "tokens": tokens, "middle": middle}
    run.update(speedup=speedup, ceiling=ceiling, perplexity_ratio=ratio_hi - 0.01)
    run["perplexity_ratio_ci"] = [ratio_hi - 0.02, ratio_hi]
    return {"runs": [run]}


def _row(table: str, start: str) -> str:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {start}")]
    return line


@pytest.mark.parametrize(("lo", "skipped", "met"), [(0.991, 0, True), (0.989, 0, False), (0.991, 3, False)])
def test_minilm_is_met_only_with_the_whole_interval_above_the_goal_and_no_skipped_step(lo, skipped, met):
    table = render_goals([_run("minilm", "exact", 0.5, 0.995, lo, 0.999, skipped=skipped)])
    assert _row(table, "MiniLM, r = L/2, any form").endswith("| **met** |" if met else "| not met |")


@pytest.mark.parametrize(
    ("ci", "ratio", "met"),
    [((-0.009, -0.002), (1.05, 1.02, 1.09), True), ((-0.011, -0.002), (1.05, 1.02, 1.09), False),
     ((-0.009, -0.002), (1.08, 1.05, 1.12), False)],
)  # fmt: skip
def test_smollm2_needs_the_top1_interval_and_the_perplexity_interval_inside(ci, ratio, met):
    table = render_goals([_run("smollm2", "exact", 0.5, -0.005, *ci, ratio=ratio)])
    assert _row(table, "SmolLM2, r = L/2, any form").endswith("| **met** |" if met else "| not met |")


def test_the_best_run_is_the_one_closest_to_the_goal_and_past_rank_mode_runs_do_not_count():
    runs = [
        _run("smollm2", "exact", 0.5, -0.005, -0.012, 0.0),  # higher mean, lower end outside
        _run("smollm2", "exact", 0.5, -0.006, -0.009, -0.003),  # inside
        _run("smollm2", "exact", 0.5, 0.01, 0.005, 0.02, mode="past"),  # not the paper's rank
    ]
    row = _row(render_goals(runs), "SmolLM2, r = L/2, any form")
    assert "-0.6 [-0.9, -0.3] pt" in row and row.endswith("| **met** |")


def test_positive_below_quadratic_rows_take_only_such_forms():
    """The exact form is quadratic and linear is not positive: neither can meet that row."""
    runs = [_run("minilm", f, 0.25, 0.999, 0.998, 1.0) for f in ("exact", "linear")]
    table = render_goals(runs)
    assert _row(table, "MiniLM, r = L/4, any form").endswith("| **met** |")
    assert "no run" in _row(table, "MiniLM, r = L/4, positive, below quadratic")
    table = render_goals(runs + [_run("minilm", "taylor2", 0.25, 0.9, 0.89, 0.91)])
    row = _row(table, "MiniLM, r = L/4, positive, below quadratic")
    assert "taylor2" in row and row.endswith("| not met |")


@pytest.mark.parametrize(
    ("speedup", "ceiling", "ratio_hi", "met"),
    [(1.6, 1.8, 1.08, True), (1.4, 1.5, 1.08, False), (1.6, 2.2, 1.08, False), (1.6, 1.8, 1.12, False)],
)
def test_long_context_needs_speed_share_of_ceiling_and_perplexity(speedup, ceiling, ratio_hi, met):
    table = render_goals([_prefill(speedup, ceiling, ratio_hi)])
    assert _row(table, "SmolLM2 prefill at 8192").endswith("| **met** |" if met else "| not met |")


def test_shorter_inputs_and_the_window_alone_are_not_long_context_atp():
    table = render_goals([_prefill(1.6, 1.8, 1.0, tokens=4096), _prefill(1.7, 1.8, 1.0, middle="dropped")])
    assert "no run" in _row(table, "SmolLM2 prefill at 8192")


def test_minilm_runs_on_longer_texts_get_rows_of_their_own():
    """A run trained and evaluated on longer held-out texts is not compared with the protocol's runs."""
    long = _run("minilm", "exact", 0.5, 0.995, 0.993, 0.997)
    long["settings"]["max_tokens"] = 256
    table = render_goals([_run("minilm", "exact", 0.5, 0.98, 0.97, 0.985), long])
    assert _row(table, "MiniLM, r = L/2, any form").endswith("| not met |")
    assert _row(table, "MiniLM (held-out texts up to 256 tokens), r = L/2, any form").endswith("| **met** |")
    assert "up to 256 tokens), r = L/4" not in table  # no such run: no row


def test_the_best_run_is_one_that_meets_the_goal_when_one_does():
    """A run with a higher interval but a perplexity (or skipped steps) outside the goal does not hide a
    run that meets it."""
    high = _run("smollm2", "exact", 0.5, -0.003, -0.006, 0.0, ratio=(1.15, 1.12, 1.18))
    meets = _run("smollm2", "exact", 0.5, -0.006, -0.009, -0.003)
    assert _row(render_goals([high, meets]), "SmolLM2, r = L/2, any form").endswith("| **met** |")
    skipped = _run("minilm", "exact", 0.5, 0.998, 0.997, 0.999, skipped=2)
    fine = _run("minilm", "exact", 0.5, 0.993, 0.991, 0.995)
    assert _row(render_goals([skipped, fine]), "MiniLM, r = L/2, any form").endswith("| **met** |")


def test_a_run_file_without_the_fields_is_left_out_not_a_crash():
    old = _run("minilm", "exact", 0.5, 0.995, 0.993, 0.997)
    del old["metrics"]["rows"]["atp_tuned"]["cosine_mean_ci"]
    assert "no run" in _row(render_goals([old]), "MiniLM, r = L/2, any form")
    bare = {"runs": [{"model": "smollm2", "form": "exact", "rank": 128, "tokens": 8192}]}
    assert "no run" in _row(render_goals([bare]), "SmolLM2 prefill at 8192")


def test_a_dense_tuned_control_is_quoted_for_its_own_run_only():
    """The control file (control-smollm2) is not a prefill file, and each of its paired figures goes to the
    run it was measured for (one control serves the L/2 and the L/4 run), not to another run."""
    runs = [
        _run("smollm2", "exact", 0.5, -0.001, -0.004, 0.001),
        _run("smollm2", "exact", 0.25, -0.03, -0.04, -0.02),
    ]
    for run in runs:
        run["metrics"]["rows"]["atp_tuned"].update(
            top1_minus_dense_tuned_weights=-0.013, top1_minus_dense_tuned_weights_ci=[-0.016, -0.011]
        )
    half = {"top1_minus_reference": -0.021, "top1_minus_reference_ci": [-0.025, -0.017]}
    quarter = {"top1_minus_reference": -0.049, "top1_minus_reference_ci": [-0.055, -0.043]}
    control = {
        "atp_runs": [{"folder": "a", "settings": dict(runs[0]["settings"])},
                     {"folder": "b", "settings": dict(runs[1]["settings"])}],
        "control_run": {},
        "rows": [{"setting": "original, dense"},
                 {"setting": "ATP-tuned L/4, ATP", "run": "b", "vs_control": quarter},
                 {"setting": "ATP-tuned L/2, ATP", "run": "a", "vs_control": half}],
    }  # fmt: skip
    table = render_goals([*runs, control])
    half_row, quarter_row = (
        _row(table, "SmolLM2, r = L/2, any form"),
        _row(table, "SmolLM2, r = L/4, any form"),
    )
    assert "-2.1 [-2.5, -1.7] pt against a model tuned the same way" in half_row
    assert "-4.9 [-5.5, -4.3] pt against a model tuned the same way" in quarter_row
    assert "prefill at 8192 tokens" in table and "no run" in _row(table, "SmolLM2 prefill")
    control["atp_runs"][0]["settings"]["steps"] = 3  # measured for another run
    table = render_goals([*runs, control])
    assert "tuned the same way" not in _row(table, "SmolLM2, r = L/2, any form")
    assert "-4.9 [-5.5, -4.3] pt against" in _row(table, "SmolLM2, r = L/4, any form")


@pytest.mark.parametrize(("original_hi", "met"), [(1.09, True), (1.12, False)])
def test_a_tuned_long_context_run_must_also_hold_against_the_original_dense_model(original_hi, met):
    """A tuned model's prefill is within the perplexity bound of its own dense prefill and of the original
    model's (tuning on docstrings moves the dense model too); the row says both, and its exact window."""
    d = _prefill(1.6, 1.8, 1.05)
    run = d["runs"][0]
    run.update(model="tuned:data/tuned/x", exact_window=512, exact_sinks=4, middle="principal keys")
    run["perplexity_ratio_to_original_dense"] = original_hi - 0.01
    run["perplexity_ratio_to_original_dense_ci"] = [original_hi - 0.02, original_hi]
    row = _row(render_goals([d]), "SmolLM2 prefill at 8192 tokens (tuned)")
    assert row.endswith("| **met** |" if met else "| not met |")
    assert "exact window 512 + 4 sinks" in row and f"(original dense: x{original_hi - 0.01:.2f}" in row
