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

import csv
import io
import os
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from browser_kit import (
    ARTIFACTS,
    CHROMIUM,
    FIG_SIGNATURE,
    OUTSIDE,
    PROJECTOR,
    TIMEOUT,
    TITLE_OF,
    WIDTH,
    Y_OF,
    chart_title,
    download,
    plot,
    screenshot,
    shown_rank,
    streamlit_server,
    wait,
    wait_idle,
    wait_new_figure,
    wait_page,
    wait_text,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM}"),
]

# URL path, screenshot name, page title, at least this many charts, a text the finished page shows.
# Serving is decoder-only: on MiniLM it offers a switch to SmolLM2 and draws nothing. Fine-tuning draws
# charts only for finished runs (none on a fresh clone).
PAGES = [
    ("", "home", "ATP Explorer", 2, "Mean effective rank"),
    ("tour", "tour", "How ATP works", 1, "Step 1 of"),
    ("spectra", "spectra", "Low-rank spectra", 5, "Run across all samples"),
    ("explorer", "explorer", "Rank explorer: ATP vs dense", 7, "Sentence-embedding cosine to dense"),
    ("serving", "serving", "Serving: compressed KV cache", 0, "Switch to SmolLM2"),
    ("costs", "costs", "Cost: dense vs ATP attention", 2, "Counted speed-up ceiling"),
    ("finetune", "finetune", "Low-rank-aware fine-tuning", 0, "Start fine-tuning"),
]

_timings: dict[str, float] = {}


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
    with streamlit_server(ARTIFACTS / "streamlit.log") as (url, _):
        yield url, t0


@pytest.fixture
def new_page(browser):
    """``new_page()``: a page in a fresh browser context (a new Streamlit session), offline-checked.

    Requests to any host but localhost are aborted and recorded (websockets too); the test fails
    at the end if there was one. ``viewport`` picks another window size (a projector's, say).
    """
    contexts, outside = [], []

    def block(route):
        outside.append(route.request.url)
        route.abort()

    def make(viewport: dict | None = None):
        size = viewport or {"width": WIDTH, "height": 1000}
        ctx = browser.new_context(viewport=size, accept_downloads=True)
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
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "name", "title", "n_charts", "marker"), PAGES, ids=[p[1] for p in PAGES])
def test_page_renders(server, new_page, path, name, title, n_charts, marker):
    url, t0 = server
    page = new_page()
    page.goto(f"{url}/{path}")
    wait_page(page, title, n_charts, marker)
    if "cold_start" not in _timings:
        _timings["cold_start"] = time.perf_counter() - t0
        (ARTIFACTS / "cold_start_seconds.txt").write_text(f"{_timings['cold_start']:.1f}\n")
    # The sidebar's pickers (all pages but fine-tuning, which needs no model) wrote the whole view, defaults
    # included, into the link. (Fine-tuning keeps a view chosen elsewhere: test_view_survives_...)
    if name != "finetune":
        query = parse_qs(urlsplit(page.url).query)
        assert query.get("model") == ["minilm"] and query.get("rank") == ["0.50"], page.url
        assert query.get("layer") == ["3"] and query.get("scale") == ["log"], page.url
    screenshot(page, ARTIFACTS / f"{name}.png")


def test_explorer_slider_shared_link_and_downloads(server, new_page):
    from playwright.sync_api import expect

    url, _ = server
    page = new_page()
    page.goto(f"{url}/explorer")
    wait_page(page, "Rank explorer", 7, "Sentence-embedding cosine to dense")
    r0, L = shown_rank(page)
    err0 = plot(page, "explorer_layer_err")["data"][0]["y"]
    y0 = page.evaluate(Y_OF, "explorer_layer_err")
    assert parse_qs(urlsplit(page.url).query)["rank"] == ["0.50"]

    # Streamlit's slider is a react-aria range input, visually hidden behind the drawn thumb.
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    slider.focus()
    for _ in range(3):
        slider.press("ArrowLeft")
    # The last key press's rerun has finished when the shown rank matches the slider: 0.35 of L.
    r1 = max(1, int(0.35 * L + 0.5))
    wait_text(page, "h3", f"r = {r1} of L = {L} tokens")
    expect(page).to_have_url(re.compile(r"[?&]rank=0\.35(&|$)"), timeout=TIMEOUT)
    wait(  # the charts were redrawn with the new rank's values
        page,
        """([before, r]) => {
            const y = (Y_OF)('explorer_layer_err');
            const maps = document.querySelector('.st-key-map_principal .js-plotly-plot');
            return y && y !== before && maps
                && ((maps.layout.title || {}).text || '').includes(`on ${r} principal keys`);
        }""".replace("Y_OF", Y_OF),
        [y0, r1],
    )
    wait_idle(page)
    err1 = plot(page, "explorer_layer_err")["data"][0]["y"]
    assert r1 < r0 and err1 != err0
    # Fewer principal keys, larger error: the final layer's relative error grows.
    assert err1[-1] > err0[-1], (err0, err1)
    query = parse_qs(urlsplit(page.url).query)
    assert query == {
        "model": ["minilm"],
        "sample": ["04_attention_explainer"],
        "rank": ["0.35"],
        "form": ["exact"],
        "basis": ["input"],
        "method": ["exact"],
        "centre": ["0"],
        "split": ["one"],
        "layers": ["all"],
        "lowrank": ["0"],
        "layer": ["3"],
        "head": ["0"],
        "query": ["84"],
        "scale": ["log"],
        "sinks": ["show"],
    }, page.url

    # The link, opened in a new session, shows the same view; its downloads hold the same numbers.
    shared = new_page()
    shared.goto(page.url)
    wait_page(shared, "Rank explorer", 7, "Sentence-embedding cosine to dense")
    assert shown_rank(shared) == (r1, L)
    slider_value = shared.locator('[data-testid="stSlider"] input[type="range"]').first.input_value()
    assert float(slider_value) == pytest.approx(0.35)
    assert plot(shared, "explorer_layer_err")["data"][0]["y"] == pytest.approx(err1, rel=1e-6)

    name, png = download(shared, "dl_explorer_layer_error", "dl_explorer_layer_error_png")
    assert name == "explorer_layer_error.png"
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 10_000 < len(png) < 5_000_000 and width >= 600 and height >= 300, (len(png), width, height)
    (ARTIFACTS / name).write_bytes(png)

    name, raw = download(shared, "dl_explorer_metrics", "dl_explorer_metrics_csv")
    assert name == "explorer_metrics.csv"
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    assert rows and list(rows[0]) == ["metric", "value"]
    values = {row["metric"]: row["value"] for row in rows}
    assert int(values["rank"]) == r1 and int(values["n_tokens"]) == L
    assert values["config.rank"] == "0.35" and values["config.form"] == "exact"
    assert values["model"] and values["text"] and values["setting"].startswith("ATP exact")  # what it is of
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
    wait_page(page, "How ATP works", 1, "Step 1 of")
    step = page.locator("h3").filter(has_text=re.compile(r"^Step \d+ of \d+: ")).first
    n = int(re.match(r"Step 1 of (\d+): ", step.inner_text()).group(1))
    assert n >= 5
    titles, figures = [step.inner_text()], [page.evaluate(FIG_SIGNATURE)]
    # A button with help text is drawn twice (one copy hidden, for measuring): take the visible one.
    next_btn = page.locator(".st-key-tour_next button >> visible=true")
    for k in range(2, n + 1):
        next_btn.click()
        wait_text(page, "h3", f"Step {k} of {n}: ")
        wait_new_figure(page, figures[-1])
        wait_idle(page)
        titles.append(step.inner_text())
        figures.append(page.evaluate(FIG_SIGNATURE))
    assert len(set(titles)) == n, titles
    assert len(set(figures)) == n, figures  # every step drew its own figure
    expect(next_btn).to_be_disabled()

    # Presenter mode: the controls go, the type grows, the step stays; Page Up goes back one step.
    heading_px = step.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
    page.locator(".st-key-tour_presenter").get_by_text("Presenter mode").click()
    wait(page, "() => !document.querySelector('.st-key-tour_rank')")
    wait_idle(page)
    expect(step).to_have_text(titles[-1])
    wait(  # presenter CSS: the step heading's type is larger
        page,
        """(px) => [...document.querySelectorAll('h3')].some(
            (h) => h.innerText.startsWith('Step ') && parseFloat(getComputedStyle(h).fontSize) > px)""",
        heading_px,
    )
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # keys to the page
    page.keyboard.press("PageUp")  # what a presentation clicker sends
    wait_text(page, "h3", titles[-2])
    wait_new_figure(page, figures[-1])
    wait_idle(page)
    assert page.evaluate(FIG_SIGNATURE).split("\n")[1:] == figures[-2].split("\n")[1:]  # same traces
    screenshot(page, ARTIFACTS / "tour_presenter.png")


# ------------------------------------------------------------------------------------------------
# One view state, per-token views, maps, the first-time path, presenter mode
# ------------------------------------------------------------------------------------------------


def _open(page, widget_key: str):
    """Open the selectbox with this widget key (a combobox: focus it, then arrow down); its options."""
    box = page.locator(f".st-key-{widget_key} input")
    box.click()
    box.press("ArrowDown")
    options = page.get_by_role("option")
    options.first.wait_for()
    return options


def _pick(page, widget_key: str, option: str) -> None:
    """Choose ``option`` in the selectbox with this widget key."""
    _open(page, widget_key).filter(has_text=re.compile(rf"^\s*{re.escape(option)}\s*$")).first.click()


def _nav(page, link: str, heading: str) -> None:
    """Go to another page through the sidebar's navigation (a page switch: the query string is dropped)."""
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=link).first.click()
    wait_text(page, "h1", heading)


def _wait_title(page, key: str, text: str) -> None:
    """Until the chart with widget key ``key`` has a title containing ``text``."""
    wait(page, f"(t) => ({TITLE_OF})('{key}')?.includes(t)", text)


def _query(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}


def test_view_survives_page_switches_and_links(server, new_page):
    """Form, head, query token and colour scale chosen on the explorer stay in the session and in every
    page's link; the link opened in a fresh session shows the same view."""
    from playwright.sync_api import expect

    url, _ = server
    page = new_page()
    page.goto(f"{url}/explorer")
    wait_page(page, "Rank explorer", 7, "Sentence-embedding cosine to dense")
    page.locator(".st-key-form").get_by_text("linear", exact=True).click()
    wait_text(page, "h3", "linear form")
    wait_idle(page)
    _pick(page, "map_head", "5")
    wait(page, "() => location.search.includes('head=5')")
    wait_idle(page)
    # Click a token in the text: the 9th token (the pills are the text's tokens, in order).
    page.locator(".st-key-query_pills button").nth(9).click()
    wait(page, "() => location.search.includes('query=9')")
    _wait_title(page, "token_attention", "#9:")
    page.locator(".st-key-map_scale").get_by_text("rank within each row").click()
    _wait_title(page, "map_dense", "rank of the weight within its row")
    wait_idle(page)
    view = _query(page)
    assert (view["form"], view["head"], view["query"], view["scale"]) == ("linear", "5", "9", "rank")

    for title, heading in (
        ("How ATP works", "How ATP works"),
        ("Fine-tuning", "fine-tuning"),
        ("Home", "ATP"),
    ):
        _nav(page, title, heading)
        wait(page, "(q) => location.search.includes(q)", "scale=rank")
        wait_idle(page)
        assert _query(page) == view, (title, page.url)
        if title == "How ATP works":  # the tour shows the same head
            expect(page.locator(".st-key-tour_head input")).to_have_value("5")
    _nav(page, "Rank explorer", "Rank explorer")
    wait_text(page, "h3", "linear form")
    _wait_title(page, "token_attention", "#9:")
    wait_idle(page)
    assert _query(page) == view

    shared = new_page()
    shared.goto(page.url)
    wait_page(shared, "Rank explorer", 7, "Sentence-embedding cosine")
    assert _query(shared) == view
    assert "#9:" in chart_title(shared, "token_attention")
    assert "rank of the weight within its row" in chart_title(shared, "map_dense")
    expect(shared.locator(".st-key-map_head input")).to_have_value("5")


def test_serving_offers_a_one_click_switch_to_the_decoder(server, new_page):
    url, _ = server
    page = new_page()
    page.goto(f"{url}/serving")
    wait_page(page, "Serving", 0, "Switch to SmolLM2")
    said = page.locator('[data-testid="stMain"]').inner_text()
    assert re.search(r"Loading it takes about \d+ s|loaded on this server already", said), said
    page.locator(".st-key-switch_to_decoder button").click()
    wait_text(page, "h3", "Generation: dense cache vs ATP-compressed prompt cache")
    wait_idle(page)
    assert _query(page)["model"] == "smollm2"
    assert "SmolLM2" in page.locator(".st-key-model_choice input").input_value()


def test_decoder_maps_outline_the_causal_triangle_and_leave_out_sinks(server, new_page):
    url, _ = server
    page = new_page()
    page.goto(f"{url}/explorer?model=smollm2")
    wait_page(page, "Rank explorer", 7, "Next-token KL")
    shapes = page.evaluate(
        "() => document.querySelector('.st-key-map_dense .js-plotly-plot').layout.shapes.map((s) => s.type)"
    )
    assert "path" in shapes  # the causal triangle
    page.locator(".st-key-map_sinks").get_by_text("Leave out attention-sink columns").click()
    _wait_title(page, "map_dense", "attention-sink columns left out: In #0")
    wait_idle(page)
    assert _query(page)["sinks"] == "hide"


# JS: scroll a figure to the top of the window, just under Streamlit's header.
_FIGURE_AT_TOP = """(e) => {
    e.scrollIntoView({block: 'start'});
    e.closest('[data-testid="stMain"]').scrollBy(0, -70);
}"""
_OVERLAPS = """() => {
    // Boxes of the tour figure's subplot titles, colour bars and main title: none may overlap another.
    const el = document.querySelector('.st-key-tour_fig .js-plotly-plot');
    const box = (e, what) => { const r = e.getBoundingClientRect(); return {what, l: r.left, r: r.right,
                                                                          t: r.top, b: r.bottom}; };
    const items = [...el.querySelectorAll('g.annotation')].map((e) => box(e, 'title: ' + e.textContent))
        .concat([...el.querySelectorAll('g.colorbar')].map((e) => box(e, 'colour bar')))
        .concat([...el.querySelectorAll('.gtitle')].map((e) => box(e, 'figure title')));
    const hits = [];
    for (let i = 0; i < items.length; i++) for (let j = i + 1; j < items.length; j++) {
        const a = items[i], b = items[j];
        const meet = a.l < b.r - 1 && b.l < a.r - 1 && a.t < b.b - 1 && b.t < a.b - 1;
        if (meet) hits.push(a.what + ' x ' + b.what);
    }
    return {n: items.length, hits};
}"""


def test_presenter_mode_on_every_page_at_projector_size(server, new_page):
    """Every page in presenter mode at 1280 x 720 (a projector), screenshotted as it fills the screen;
    the tour's attention step (7) with no title over a colour bar."""
    url, _ = server
    for path, name, title, n_charts, marker in PAGES:
        page = new_page(viewport=PROJECTOR)
        page.goto(f"{url}/{path}?present=1&model=minilm")
        wait_page(page, title, n_charts, marker)
        assert _query(page).get("present") == "1"
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / f"presenter_{name}.png"))
        if name != "tour":
            continue
        _pick(page, "tour_step", next(o for o in _step_names(page) if o.startswith("7.")))
        wait_text(page, "h3", "Step 7 of")
        wait_idle(page)
        page.locator(".st-key-tour_fig").evaluate(_FIGURE_AT_TOP)
        page.wait_for_timeout(300)
        result = page.evaluate(_OVERLAPS)
        assert result["n"] >= 5 and not result["hits"], result
        page.screenshot(path=str(ARTIFACTS / "presenter_tour_step7.png"))


def _step_names(page) -> list[str]:
    names = [n.strip() for n in _open(page, "tour_step").all_inner_texts()]
    page.keyboard.press("Escape")
    return names
