"""The Fine-tuning page under the heavy-job cap: a refused run says why and leaves no progress bar."""

from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from atp_viz.deploy.jobs import heavy_job
from atp_viz.hf import tuned

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_a_run_refused_by_the_heavy_job_cap_leaves_no_progress_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("ATP_VIZ_CACHE", str(tmp_path))
    original = tuned.find_runs
    monkeypatch.setattr(tuned, "find_runs", lambda roots=None: original([tmp_path / "tuned"]))
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("pages/finetune.py").run()
    assert not at.exception, at.exception
    at.selectbox(key="tune_model").set_value("tiny-bert")
    at.number_input(key="tune_steps").set_value(1)
    with heavy_job("rank sweep"):  # another session's job holds the only slot
        at.button[0].click().run()  # the form's submit button
        job = at.session_state["tune_job"]
        deadline = time.time() + 60
        while job.running and time.time() < deadline:
            time.sleep(0.1)
    assert not job.running
    at.run()
    assert not at.exception, at.exception
    assert any("Another heavy job is running (rank sweep" in w.value for w in at.warning)
    assert not at.get("progress")  # once showed a "Starting... (0 s)" bar that never went away
