"""The process-wide cap on heavy jobs: refuses at once, releases on exceptions, never blocks light work."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from atp_viz.deploy import jobs
from atp_viz.deploy.jobs import BusyError, heavy_job

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_second_job_is_refused_with_a_clear_message():
    with heavy_job("rank sweep"):
        assert jobs.running() == ("rank sweep",)
        with pytest.raises(BusyError) as err, heavy_job("perplexity grid"):
            pytest.fail("must not run")
        msg = str(err.value)
        assert "Another heavy job is running (rank sweep; 1 allowed at a time)" in msg
        assert "perplexity grid was not started" in msg and "Try again in a moment" in msg
    assert jobs.running() == ()
    with heavy_job("perplexity grid"):  # free again
        pass


def test_slot_is_released_on_exception():
    with pytest.raises(ZeroDivisionError), heavy_job("sweep"):
        1 / 0  # noqa: B018
    assert jobs.running() == ()
    with heavy_job("sweep"):
        pass


def test_limit_allows_that_many():
    with heavy_job("a", limit=2), heavy_job("b", limit=2):
        assert jobs.running() == ("a", "b")
        with pytest.raises(BusyError, match="2 allowed"), heavy_job("c", limit=2):
            pass
    with pytest.raises(ValueError), heavy_job("x", limit=0):
        pass


def test_refusal_is_immediate_across_threads_and_light_work_runs(load):
    """Another session (thread) holds the slot for a long job: a second heavy job is refused at
    once, and light work (a forward pass) is not blocked by it."""
    started, release = threading.Event(), threading.Event()

    def long_job():
        with heavy_job("long sweep"):
            started.set()
            release.wait(30)

    t = threading.Thread(target=long_job)
    t.start()
    try:
        assert started.wait(10)
        outcome = []

        def second():
            try:
                with heavy_job("second sweep"):
                    outcome.append("ran")
            except BusyError as err:
                outcome.append(err)

        other = threading.Thread(target=second)
        other.start()
        other.join(10)  # the first job holds the slot until release: a queued call would still be waiting
        assert not other.is_alive() and isinstance(outcome[0], BusyError)  # refused, not queued
        from atp_viz.analysis.capture import capture

        cap = capture(load("tiny-bert"), "Light work goes on while a heavy job runs elsewhere.")
        assert cap.n_tokens > 2
    finally:
        release.set()
        t.join(10)
    assert jobs.running() == ()


def test_explorer_sweep_says_busy_while_another_job_runs():
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["model"] = "tiny-bert"
    at.query_params["sample"] = "01_one_sentence"
    at.switch_page("pages/explorer.py")
    at.run()
    assert not at.exception, at.exception
    with heavy_job("someone else's perplexity grid"):
        at.button(key="run_sweep").click().run()
    assert not at.exception, at.exception
    assert any("Another heavy job is running" in w.value for w in at.warning)
    assert "explorer_sweep" not in [c.key for c in at.get("plotly_chart")]
    at.button(key="run_sweep").click().run()  # free again: the sweep runs
    assert not at.exception, at.exception
    assert "explorer_sweep" in [c.key for c in at.get("plotly_chart")]
