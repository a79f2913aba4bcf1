"""The Fine-tuning page under the heavy-job cap: a refused run says why and leaves no progress bar."""

from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from atp_viz.deploy.jobs import heavy_job
from atp_viz.hf import tuned

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def _page(tmp_path, monkeypatch) -> AppTest:
    """The Fine-tuning page with its own cache folder and no runs but the ones written there."""
    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    original = tuned.find_runs
    monkeypatch.setattr(tuned, "find_runs", lambda roots=None: original([tmp_path / "tuned"]))
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("pages/finetune.py").run()
    return at


def _finished(at: AppTest):
    """The page's job, once it has ended (here: refused at once by the heavy-job cap)."""
    job = at.session_state["tune_job"]
    deadline = time.time() + 60
    while job.running and time.time() < deadline:
        time.sleep(0.1)
    return job


def test_a_run_refused_by_the_heavy_job_cap_leaves_no_progress_bar(tmp_path, monkeypatch):
    at = _page(tmp_path, monkeypatch)
    assert not at.exception, at.exception
    at.selectbox(key="tune_model").set_value("tiny-bert")
    at.number_input(key="tune_steps").set_value(1)
    with heavy_job("rank sweep"):  # another session's job holds the only slot
        at.button[0].click().run()  # the form's submit button
        job = _finished(at)
    assert not job.running
    at.run()
    assert not at.exception, at.exception
    assert any("Another heavy job is running (rank sweep" in w.value for w in at.warning)
    assert not any("BusyError" in w.value for w in at.warning)  # a refusal, not a crash with a class name
    assert not at.get("progress")  # once showed a "Starting... (0 s)" bar that never went away


def test_the_page_passes_the_dense_control_on_without_stage_1(tmp_path, monkeypatch):
    """'Train with dense attention' reaches the run's settings. Stage 1 (on by default) has no meaning for a
    control: the page says its steps are not run and starts the control without them (it once refused
    every control started from the defaults)."""
    at = _page(tmp_path, monkeypatch)
    at.selectbox(key="tune_model").set_value("tiny-llama")
    at.radio(key="tune_attention").set_value("dense")
    at.number_input(key="tune_steps").set_value(1)
    with heavy_job("rank sweep"):  # the job starts and is refused at once: nothing is trained here
        at.button[0].click().run()  # stage 1 left at its default of 200 steps
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        assert any("200 stage-1 steps are not run" in i.value for i in at.info)
        job = _finished(at)
    assert job.cfg.attention == "dense" and job.cfg.transfer_steps == 0
    assert "dense-tuned control" in job.cfg.label()


def test_the_page_passes_per_layer_ranks_on(tmp_path, monkeypatch):
    """'Ranks per layer: measured' reaches the run's settings, to be chosen when the run starts."""
    at = _page(tmp_path, monkeypatch)
    at.selectbox(key="tune_model").set_value("tiny-bert")
    at.radio(key="tune_layer_ranks").set_value("measured")
    with heavy_job("rank sweep"):  # the job starts and is refused at once: nothing is trained here
        at.button[0].click().run()
        assert not at.exception, at.exception
        job = _finished(at)
    assert job.cfg.layer_ranks_from == "measured" and job.cfg.layer_ranks_pending
    assert "per layer (measured)" in job.cfg.label()


def test_the_page_passes_the_centred_basis_on(tmp_path, monkeypatch):
    at = _page(tmp_path, monkeypatch)
    at.selectbox(key="tune_model").set_value("tiny-bert")
    at.radio(key="tune_basis_from").set_value("keys")
    at.checkbox(key="tune_centre_basis").check()
    with heavy_job("rank sweep"):  # the job starts and is refused at once: nothing is trained here
        at.button[0].click().run()
        assert not at.exception, at.exception
        job = _finished(at)
    assert job.cfg.centre_basis and job.cfg.basis_from == "keys" and "centred" in job.cfg.label()


def test_a_run_the_model_cannot_take_is_refused_before_it_starts(tmp_path, monkeypatch):
    """Nothing to train (0 + 0 steps), or measured per-layer ranks on a decoder: an error at Start and no
    job, not a job that fails (or saves an untrained run) after it started."""
    at = _page(tmp_path, monkeypatch)
    at.selectbox(key="tune_model").set_value("tiny-bert")
    at.number_input(key="tune_transfer_steps").set_value(0)
    at.number_input(key="tune_steps").set_value(0)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("nothing would be trained" in e.value for e in at.error)
    assert "tune_job" not in at.session_state
    at.selectbox(key="tune_model").set_value("tiny-llama")
    at.number_input(key="tune_steps").set_value(1)
    at.radio(key="tune_layer_ranks").set_value("measured")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("Measured per-layer ranks are for encoders" in e.value for e in at.error)
    assert "tune_job" not in at.session_state
    # A dense control on an encoder is refused, and the page does not also say its stage 1 is dropped
    # (as if the run went ahead).
    at.selectbox(key="tune_model").set_value("tiny-bert")
    at.radio(key="tune_layer_ranks").set_value("")
    at.radio(key="tune_attention").set_value("dense")
    at.number_input(key="tune_transfer_steps").set_value(200)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("A dense control is for decoders" in e.value for e in at.error)
    assert not any("stage-1 steps are not run" in i.value for i in at.info)
    assert "tune_job" not in at.session_state
