"""Real-browser end-to-end tests: Debian's Chromium driven by Playwright against `streamlit run`.

One server and one browser for the whole module (the slow part is the server's first model load).
Every page is opened by URL on the default bundled model (MiniLM); the explorer's rank slider, the
shared link, a PNG and a CSV download and the guided tour are driven like a user would. Every
browser context blocks and records requests that leave localhost: the app must work offline.

Skipped, with the reason, only where Chromium is not installed (`make test` installs it as root).
Screenshots go to test-artifacts/ (the README's pictures in docs/img/ are copied from there), with
the server's log (streamlit.log), the cold-start time and this suite's wall time.
Set ATP_BROWSER_URL=http://127.0.0.1:8501 to run against a server you started yourself.
"""

from __future__ import annotations

import array
import base64
import csv
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

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
TIMEOUT = 120_000  # ms; generous: CI and this machine are 2 shared cores
WIDTH = 1400
MAX_SHOT_HEIGHT = 6000  # px; a full-page screenshot is cut there

# Requests for another host; localhost ones are not intercepted at all (no cost per request).
OUTSIDE = re.compile(r"^(https?|wss?)://(?!(127\.0\.0\.1|localhost)(:\d+)?(/|$))")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM}"),
]

# URL path, screenshot name, page title, at least this many charts, a text the finished page shows.
# Serving is decoder-only: on MiniLM it says so and draws nothing. Fine-tuning draws charts only for
# finished runs (none on a fresh clone).
PAGES = [
    ("", "home", "ATP Explorer", 2, "Mean effective rank"),
    ("tour", "tour", "How ATP works", 1, "Step 1 of"),
    ("spectra", "spectra", "Low-rank spectra", 5, "Run across all samples"),
    ("explorer", "explorer", "Rank explorer: ATP vs dense", 5, "Sentence-embedding cosine to dense"),
    ("serving", "serving", "Serving: compressed KV cache", 0, "serving applies to decoders"),
    ("costs", "costs", "Cost: dense vs ATP attention", 2, "Counted speed-up ceiling"),
    ("finetune", "finetune", "Low-rank-aware fine-tuning", 0, "Start fine-tuning"),
]

_timings: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def suite_clock(request):
    """The module's wall time (server start included), printed and written to test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    (ARTIFACTS / "browser_suite_seconds.txt").write_text(f"{elapsed:.1f}\n")
    line = f"browser suite: {elapsed:.1f} s wall time"
    if "cold_start" in _timings:
        line += f" (server start to first page drawn: {_timings['cold_start']:.1f} s)"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
    else:
        with capture.global_and_fixture_disabled():  # shown even when the tests pass
            print("\n" + line)


@pytest.fixture(scope="module")
def server():
    t0 = time.perf_counter()
    if os.environ.get("ATP_BROWSER_URL"):
        yield os.environ["ATP_BROWSER_URL"].rstrip("/"), t0
        return
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The log goes to a file, not to a pipe nobody reads (a full pipe would block the server).
    with open(ARTIFACTS / "streamlit.log", "wb") as log:
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
                "--server.fileWatcherType",
                "none",
                "--browser.gatherUsageStats",
                "false",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"streamlit did not start (see {ARTIFACTS / 'streamlit.log'}): "
                            + (ARTIFACTS / "streamlit.log").read_text(errors="replace")[-2000:]
                        ) from None
                    time.sleep(0.5)
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
def new_page(browser):
    """``new_page()``: a page in a fresh browser context (a new Streamlit session), offline-checked.

    Requests to any host but localhost are aborted and recorded (websockets too); the test fails
    at the end if there was one.
    """
    contexts, outside = [], []

    def block(route):
        outside.append(route.request.url)
        route.abort()

    def make():
        ctx = browser.new_context(viewport={"width": WIDTH, "height": 1000}, accept_downloads=True)
        ctx.set_default_timeout(TIMEOUT)
        ctx.route(OUTSIDE, block)
        ctx.on("request", lambda r: OUTSIDE.match(r.url) and outside.append(r.url))
        contexts.append(ctx)
        pg = ctx.new_page()
        pg.on("websocket", lambda ws: OUTSIDE.match(ws.url) and outside.append(ws.url))
        return pg

    yield make
    for ctx in contexts:
        ctx.close()
    assert not outside, f"the app requested resources outside localhost: {sorted(set(outside))[:5]}"


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _assert_no_exception(page) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, f"Streamlit exception on {page.url}: {boxes.first.inner_text()[:1000]}"


def _wait(page, condition: str, arg=None) -> None:
    """Until the JS function ``condition(arg)`` is true; fails at once on a Streamlit exception box."""
    page.wait_for_function(
        f"""(arg) => !!document.querySelector('[data-testid="stException"]') || ({condition})(arg)""",
        arg=arg,
        timeout=TIMEOUT,
        polling=200,
    )
    _assert_no_exception(page)


def _wait_text(page, selector: str, text: str) -> None:
    """Until an element matching ``selector`` contains ``text``."""
    _wait(
        page,
        "([sel, t]) => [...document.querySelectorAll(sel)].some((e) => e.innerText.includes(t))",
        [selector, text],
    )


def _wait_idle(page) -> None:
    """Until the script run has finished: the app says "notRunning" and no element is stale.

    Call it after a sign that the rerun has started (a changed text): right after a click the
    previous run's state is still shown.
    """
    _wait(
        page,
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            const idle = app && app.getAttribute('data-test-script-state') === 'notRunning';
            return idle && !document.querySelector('[data-stale="true"]');
        }""",
    )


def _wait_page(page, title: str, n_charts: int, marker: str) -> None:
    """Until a page shows its title, ``marker`` and ``n_charts`` charts with data, and is idle."""
    _wait_text(page, "h1", title)
    _wait_text(page, '[data-testid="stMain"]', marker)
    _wait(
        page,
        """(n) => {
            const plots = [...document.querySelectorAll('.js-plotly-plot')];
            return plots.length >= n && plots.every((p) => p.data && p.data.length > 0);
        }""",
        n_charts,
    )
    # Widgets and tables are lazy-loaded components: a grey skeleton until their code has arrived.
    _wait(page, "() => document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0")
    _wait_idle(page)


def _screenshot(page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main element, so the viewport is made that tall."""
    height = page.evaluate(
        "() => (document.querySelector('[data-testid=\"stMain\"]') || document.body).scrollHeight"
    )
    size = page.viewport_size
    tall = min(max(height, size["height"]), MAX_SHOT_HEIGHT)
    page.set_viewport_size({"width": size["width"], "height": tall})
    page.wait_for_timeout(300)  # one relayout
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path


def _shown_rank(page) -> tuple[int, int]:
    """(r, L) from the explorer's "r = 85 of L = 169 tokens" subheader."""
    text = page.locator("h3").filter(has_text=re.compile(r"r = \d+ of L = \d+")).first.inner_text()
    r, n = re.search(r"r = (\d+) of L = (\d+)", text).groups()
    return int(r), int(n)


# Plotly 6+ sends numpy arrays as typed-array specs {dtype, bdata (base64), shape}.
_DTYPES = {"f8": "d", "f4": "f", "i4": "i", "i2": "h", "i1": "b", "u4": "I", "u2": "H", "u1": "B"}
# JS: the first trace's y of the chart with this widget key, as a string that changes when y does.
_Y_OF = """(key) => {
    const el = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    const y = el && el.data[0].y;
    return y ? y.bdata || JSON.stringify(Array.from(y)) : null;
}"""
# JS: what the tour's figure shows (title, trace types and sizes), to see it change between steps.
_FIG_SIGNATURE = """() => {
    const el = document.querySelector('.st-key-tour_fig .js-plotly-plot');
    if (!el || !el.data) return null;
    const size = (v) => (v ? (v.bdata ? v.bdata.length : v.length) : 0);
    const traces = el.data.map((t) => `${t.type}:${size(t.x)}:${size(t.y)}:${size(t.z)}`);
    return [(el.layout.title || {}).text || '', ...traces].join('|');
}"""


def _values(v) -> list:
    """A trace's x or y as a flat list, whether plotly got a list or a typed-array spec."""
    if isinstance(v, dict) and "bdata" in v:
        out = array.array(_DTYPES[v["dtype"]], base64.b64decode(v["bdata"]))
        if sys.byteorder != "little":
            out.byteswap()
        return out.tolist()
    return list(v or [])


def _plot(page, key: str) -> dict:
    """A chart's traces (x and y) and title, read from plotly's div (``el.data`` / ``el.layout``)."""
    fig = page.evaluate(
        """(key) => {
            const el = document.querySelector(`.st-key-${key} .js-plotly-plot`);
            const plain = (v) => (v && v.bdata ? {dtype: v.dtype, bdata: v.bdata} : v && Array.from(v));
            if (!el) return null;
            const data = el.data.map((t) => ({x: plain(t.x), y: plain(t.y)}));
            return {data, title: (el.layout.title || {}).text};
        }""",
        key,
    )
    assert fig is not None, f"no chart with key {key} on {page.url}"
    return {"title": fig["title"], "data": [{k: _values(t[k]) for k in ("x", "y")} for t in fig["data"]]}


def _wait_new_figure(page, before: str | None) -> None:
    _wait(page, f"(before) => ({_FIG_SIGNATURE})() !== before", before)


def _download(page, popover: str, button: str) -> tuple[str, bytes]:
    """Open a download popover (``ui.figure_downloads`` / ``table_downloads``) and click a button."""
    page.locator(f".st-key-{popover} button").first.click()
    btn = page.locator(f".st-key-{button} button")
    btn.wait_for(state="visible", timeout=TIMEOUT)
    with page.expect_download(timeout=TIMEOUT) as info:
        btn.click()
    dl = info.value
    assert dl.failure() is None, dl.failure()
    data = Path(dl.path()).read_bytes()
    page.keyboard.press("Escape")  # close the popover
    return dl.suggested_filename, data


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "name", "title", "n_charts", "marker"), PAGES, ids=[p[1] for p in PAGES])
def test_page_renders(server, new_page, path, name, title, n_charts, marker):
    url, t0 = server
    page = new_page()
    page.goto(f"{url}/{path}")
    _wait_page(page, title, n_charts, marker)
    if "cold_start" not in _timings:
        _timings["cold_start"] = time.perf_counter() - t0
        (ARTIFACTS / "cold_start_seconds.txt").write_text(f"{_timings['cold_start']:.1f}\n")
    if name != "finetune":  # the sidebar's pickers (all pages but this one) wrote the view into the link
        query = parse_qs(urlsplit(page.url).query)
        assert query.get("model") == ["minilm"], page.url
    _screenshot(page, name)


def test_explorer_slider_shared_link_and_downloads(server, new_page):
    from playwright.sync_api import expect

    url, _ = server
    page = new_page()
    page.goto(f"{url}/explorer")
    _wait_page(page, "Rank explorer", 5, "Sentence-embedding cosine to dense")
    r0, L = _shown_rank(page)
    err0 = _plot(page, "explorer_layer_err")["data"][0]["y"]
    y0 = page.evaluate(_Y_OF, "explorer_layer_err")
    assert parse_qs(urlsplit(page.url).query)["rank"] == ["0.50"]

    # Streamlit's slider is a react-aria range input, visually hidden behind the drawn thumb.
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    slider.focus()
    for _ in range(3):
        slider.press("ArrowLeft")
    # The last key press's rerun has finished when the shown rank matches the slider: 0.35 of L.
    r1 = max(1, int(0.35 * L + 0.5))
    _wait_text(page, "h3", f"r = {r1} of L = {L} tokens")
    expect(page).to_have_url(re.compile(r"[?&]rank=0\.35(&|$)"), timeout=TIMEOUT)
    _wait(  # the charts were redrawn with the new rank's values
        page,
        """([before, r]) => {
            const y = (Y_OF)('explorer_layer_err');
            const maps = document.querySelector('.st-key-map_principal .js-plotly-plot');
            return y && y !== before && maps
                && ((maps.layout.title || {}).text || '').includes(`on ${r} principal keys`);
        }""".replace("Y_OF", _Y_OF),
        [y0, r1],
    )
    _wait_idle(page)
    err1 = _plot(page, "explorer_layer_err")["data"][0]["y"]
    assert r1 < r0 and err1 != err0
    # Fewer principal keys, larger error: the final layer's relative error grows.
    assert err1[-1] > err0[-1], (err0, err1)
    query = parse_qs(urlsplit(page.url).query)
    assert query == {
        "model": ["minilm"],
        "sample": ["04_attention_explainer"],
        "rank": ["0.35"],
        "form": ["exact"],
        "layer": ["0"],
        "head": ["0"],
    }, page.url

    # The link, opened in a new session, shows the same view; its downloads hold the same numbers.
    shared = new_page()
    shared.goto(page.url)
    _wait_page(shared, "Rank explorer", 5, "Sentence-embedding cosine to dense")
    assert _shown_rank(shared) == (r1, L)
    slider_value = shared.locator('[data-testid="stSlider"] input[type="range"]').first.input_value()
    assert float(slider_value) == pytest.approx(0.35)
    assert _plot(shared, "explorer_layer_err")["data"][0]["y"] == pytest.approx(err1, rel=1e-6)

    name, png = _download(shared, "dl_explorer_layer_error", "dl_explorer_layer_error_png")
    assert name == "explorer_layer_error.png"
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 10_000 < len(png) < 5_000_000 and width >= 600 and height >= 300, (len(png), width, height)
    (ARTIFACTS / name).write_bytes(png)

    name, raw = _download(shared, "dl_explorer_metrics", "dl_explorer_metrics_csv")
    assert name == "explorer_metrics.csv"
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    assert rows and list(rows[0]) == ["metric", "value"]
    values = {row["metric"]: row["value"] for row in rows}
    assert int(values["rank"]) == r1 and int(values["n_tokens"]) == L
    assert values["config.rank"] == "0.35" and values["config.form"] == "exact"
    csv_err = [float(values[f"layer_relative_error.{i}"]) for i in range(len(err1))]
    assert csv_err == pytest.approx(err1, rel=1e-6)  # the file holds what the chart plots
    shown_cos = shared.locator('[data-testid="stMetric"]').filter(has_text="Sentence-embedding cosine")
    shown_cos = shown_cos.locator('[data-testid="stMetricValue"]').inner_text()
    assert f"{float(values['embedding_cosine_to_dense']):.4f}" == shown_cos.strip()


def test_tour_steps_and_presenter_mode(server, new_page):
    from playwright.sync_api import expect

    url, _ = server
    page = new_page()
    page.goto(f"{url}/tour")
    _wait_page(page, "How ATP works", 1, "Step 1 of")
    step = page.locator("h3").filter(has_text=re.compile(r"^Step \d+ of \d+: ")).first
    n = int(re.match(r"Step 1 of (\d+): ", step.inner_text()).group(1))
    assert n >= 5
    titles, figures = [step.inner_text()], [page.evaluate(_FIG_SIGNATURE)]
    # A button with help text is drawn twice (one copy hidden, for measuring): take the visible one.
    next_btn = page.locator(".st-key-tour_next button >> visible=true")
    for k in range(2, n + 1):
        next_btn.click()
        _wait_text(page, "h3", f"Step {k} of {n}: ")
        _wait_new_figure(page, figures[-1])
        _wait_idle(page)
        titles.append(step.inner_text())
        figures.append(page.evaluate(_FIG_SIGNATURE))
    assert len(set(titles)) == n, titles
    assert len(set(figures)) == n, figures  # every step drew its own figure
    expect(next_btn).to_be_disabled()

    # Presenter mode: the controls go, the type grows, the step stays; Page Up goes back one step.
    heading_px = step.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
    page.locator(".st-key-tour_presenter").get_by_text("Presenter mode").click()
    _wait(page, "() => !document.querySelector('.st-key-tour_rank')")
    _wait_idle(page)
    expect(step).to_have_text(titles[-1])
    _wait(  # presenter CSS: the step heading's type is larger
        page,
        """(px) => [...document.querySelectorAll('h3')].some(
            (h) => h.innerText.startsWith('Step ') && parseFloat(getComputedStyle(h).fontSize) > px)""",
        heading_px,
    )
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # keys to the page
    page.keyboard.press("PageUp")  # what a presentation clicker sends
    _wait_text(page, "h3", titles[-2])
    _wait_new_figure(page, figures[-1])
    _wait_idle(page)
    assert page.evaluate(_FIG_SIGNATURE).split("|")[1:] == figures[-2].split("|")[1:]  # same traces
    _screenshot(page, "tour_presenter")
