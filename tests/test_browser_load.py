"""A class at once, and latency a class does not notice (real browser, a server of this module's own).

- Several sessions open the explorer at the same moment on a *freshly started* server: none may show an
  exception (the shared app code was once imported by several sessions at once, half-initialised:
  `ImportError: cannot import name 'current_settings'`), and each shows its own rank.
- The explorer's update time, from slider release to the updated metric on screen, median of several
  moves: MiniLM at 128 tokens, SmolLM2 at 256. Measured and written to
  test-artifacts/latency.json, never asserted (the machine is shared and noisy).

The tests run in file order: the first one needs the server fresh. `make loadtest` (tests/loadtest.py)
is the heavier version: 12 sessions in server mode, each at its own rank and form.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import time

import pytest
from browser_kit import (
    ARTIFACTS,
    CHROMIUM,
    OUTSIDE,
    ROOT,
    TIMEOUT,
    WIDTH,
    assert_no_exception,
    shown_rank,
    streamlit_server,
    text_of_tokens,
    timed_slider_moves,
    wait_idle,
    wait_page,
    wait_text,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM}"),
]

N_AT_ONCE = 5
MOVES = 6  # slider moves per latency figure (the median is reported)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder of this module's own (fine-tuning runs appear there), sharing the converted SmolLM2
    of the user's cache when there is one (converting it again would take about 20 s)."""
    from atp_viz.hf.model_info import cache_dir

    folder = tmp_path_factory.mktemp("atp_cache")
    (folder / "tuned").mkdir()
    converted = cache_dir() / "smollm2-135m-instruct"
    if converted.is_dir():
        (folder / converted.name).symlink_to(converted)
    return folder


@pytest.fixture(scope="module")
def fresh_server(cache):
    with streamlit_server(ARTIFACTS / "streamlit_fresh.log", {"ATP_VIZ_CACHE": str(cache)}) as (url, proc):
        yield url, proc


def _page(browser):
    ctx = browser.new_context(viewport={"width": WIDTH, "height": 1000})
    ctx.set_default_timeout(TIMEOUT)
    ctx.route(OUTSIDE, lambda route: route.abort())  # offline, as every browser test
    return ctx, ctx.new_page()


def test_sessions_opening_at_once_on_a_fresh_server(fresh_server, browser):
    """Right after the server starts, several sessions open the explorer at the same moment (a class
    opening a shared link), each at its own rank: every one draws its page, with its own rank, and
    none shows an exception."""
    url, _ = fresh_server
    ranks = [0.2, 0.3, 0.4, 0.6, 0.7][:N_AT_ONCE]
    sessions = [_page(browser) for _ in ranks]
    for (_, page), r in zip(sessions, ranks, strict=True):  # back to back: no session waits for another
        page.goto(f"{url}/explorer?rank={r:.2f}", wait_until="commit")
    try:
        for (_, page), r in zip(sessions, ranks, strict=True):
            wait_page(page, "Rank explorer", 1, "Sentence-embedding cosine to dense")
            assert_no_exception(page)
            shown, L = shown_rank(page)
            assert shown == max(1, int(r * L + 0.5)), (r, shown, L)
    finally:
        for ctx, _ in sessions:
            ctx.close()


def _type_text(page, text: str, n_tokens: int) -> None:
    page.locator(".st-key-text_source").get_by_text("Type").click()
    area = page.locator(".st-key-typed_text textarea")
    area.wait_for()
    area.fill(text)
    area.press("Control+Enter")  # a text area sends its text on Ctrl+Enter (or on leaving it)
    wait_text(page, "h3", f"of L = {n_tokens} tokens")
    wait_idle(page)


def test_explorer_update_time(fresh_server, browser):
    """Seconds from slider release to the updated metric on screen (the explorer's first metric), for
    MiniLM at 128 tokens and SmolLM2 at 256 tokens, written to test-artifacts/latency.json."""
    url, _ = fresh_server
    cases = [
        ("minilm", 128, "Sentence-embedding cosine to dense"),
        ("smollm2", 256, "Next-token KL(dense || ATP)"),
    ]
    report = {"load_average_before": os.getloadavg(), "moves": MOVES, "cases": {}}
    for model, n_tokens, metric_label in cases:
        ctx, page = _page(browser)
        try:
            page.goto(f"{url}/explorer?model={model}")
            wait_page(page, "Rank explorer", 1, metric_label)
            _type_text(page, text_of_tokens(model, n_tokens), n_tokens)
            seconds = timed_slider_moves(page, metric_label, MOVES)
            assert_no_exception(page)
            assert re.search(rf"of L = {n_tokens} tokens", page.locator("h3").all_inner_texts().__str__())
        finally:
            ctx.close()
        report["cases"][f"{model}@{n_tokens}"] = {
            "median_s": statistics.median(seconds),
            "max_s": max(seconds),
            "all_s": seconds,
        }
    report["load_average_after"] = os.getloadavg()
    report["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (ARTIFACTS / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{k}: median {v['median_s']:.2f} s" for k, v in report["cases"].items())
    print(f"\nexplorer update time (slider release to metric): {summary}")


def test_a_run_finished_by_another_session_is_listed_without_a_reload(fresh_server, browser, cache):
    """The Fine-tuning page lists a run that appears while it is open (finished by another session or
    the command line) within seconds, without a reload (it once needed one)."""
    url, _ = fresh_server
    ctx, page = _page(browser)
    try:
        page.goto(f"{url}/finetune")
        wait_page(page, "fine-tuning", 0, "Start fine-tuning")
        before = page.locator('[data-testid="stExpander"]').count()
        run = sorted((ROOT / "data" / "tuned").iterdir())[0]
        shutil.copytree(run, cache / "tuned" / f"{run.name}-elsewhere")
        page.wait_for_function(
            "(n) => document.querySelectorAll('[data-testid=\"stExpander\"]').length > n", arg=before
        )
        assert_no_exception(page)
        assert f"{run.name}-elsewhere" in page.locator('[data-testid="stMain"]').inner_text()
    finally:
        ctx.close()
