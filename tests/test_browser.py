"""Real-browser end-to-end tests: Debian's Chromium driven by Playwright against `streamlit run`.

Skipped, with the reason, only where Chromium is not installed (`make test` installs it as root).
Screenshots go to test-artifacts/ (the README's pictures are copied from there).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not start in 60 s")
        yield url, t0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    outside: list[str] = []

    def check(request):
        host = request.url.split("/")[2] if "://" in request.url else ""
        if request.url.startswith(("http://", "https://", "ws://", "wss://")) and not host.startswith(
            ("127.0.0.1", "localhost")
        ):
            outside.append(request.url)

    pg.on("request", check)
    yield pg
    ctx.close()
    assert not outside, f"the app requested resources outside localhost: {outside[:5]}"


def _wait_charts(page, n: int, timeout: float = 120_000) -> None:
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {n}", timeout=timeout)
    page.wait_for_timeout(500)  # let the last chart finish drawing before a screenshot


def test_spectra_page_cold_start(server, page):
    url, t0 = server
    page.goto(url + "/spectra")
    _wait_charts(page, 5)
    elapsed = time.perf_counter() - t0
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "cold_start_seconds.txt").write_text(f"{elapsed:.1f}\n")
    page.screenshot(path=str(ARTIFACTS / "spectra.png"), full_page=True)
    assert page.get_by_text("Low-rank spectra").first.is_visible()


def test_home_page(server, page):
    url, _ = server
    page.goto(url)
    _wait_charts(page, 1)
    page.screenshot(path=str(ARTIFACTS / "home.png"), full_page=True)
    assert page.get_by_text("Mean effective rank").first.is_visible()


def _metric_value(page, label: str) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return metric.locator('[data-testid="stMetricValue"]').inner_text()


def test_explorer_slider_rerenders(server, page):
    url, _ = server
    page.goto(url + "/explorer")
    _wait_charts(page, 5)
    label = "Sentence-embedding cosine to dense"
    before = _metric_value(page, label)
    # Streamlit's slider is a react-aria range input, visually hidden behind the drawn thumb.
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    slider.focus()
    for _ in range(3):
        slider.press("ArrowLeft")
    page.wait_for_function(
        """([label, before]) => {
            const metrics = [...document.querySelectorAll('[data-testid="stMetric"]')];
            const m = metrics.find((e) => e.innerText.includes(label));
            return m && !m.innerText.includes(before);
        }""",
        arg=[label, before],
        timeout=60_000,
    )
    # Wait until the shown rank matches the slider (the last key press's rerun has finished).
    page.wait_for_function(
        """() => {
            const input = document.querySelector('[data-testid="stSlider"] input[type="range"]');
            const v = parseFloat(input.value);
            const h = [...document.querySelectorAll('h3')].find((e) => /r = \\d+ of L/.test(e.innerText));
            if (!h) return false;
            const [, r, L] = h.innerText.match(/r = (\\d+) of L = (\\d+)/).map(Number);
            return r === Math.max(1, Math.floor(v * L + 0.5));
        }""",
        timeout=60_000,
    )
    page.wait_for_timeout(1000)  # let the charts below the metric redraw
    after = _metric_value(page, label)
    assert after != before
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
