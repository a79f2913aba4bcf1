"""What the browser tests and the load test share: starting a `streamlit run` server, and waiting on,
reading and measuring a page in Chromium (Playwright) the way a user sees it.

Not a test module (pytest collects ``test_*.py`` only); imported by ``test_browser.py``,
``test_browser_load.py`` and ``loadtest.py``.
"""

from __future__ import annotations

import array
import base64
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
PROJECTOR = {"width": 1280, "height": 720}

# Requests for another host; localhost ones are not intercepted at all (no cost per request).
OUTSIDE = re.compile(r"^(https?|wss?)://(?!(127\.0\.0\.1|localhost)(:\d+)?(/|$))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(log: Path, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A fresh `streamlit run app.py` on a free port: yields (its URL, the process) once it answers its
    health check; the log goes to ``log`` (a file, not a pipe nobody reads: a full pipe would block)."""
    log.parent.mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    args = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)]
    args += ["--server.address", "127.0.0.1", "--server.headless", "true"]
    args += ["--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
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
                            f"streamlit did not start (see {log}): " + log.read_text(errors="replace")[-2000:]
                        ) from None
                    time.sleep(0.5)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM from /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------
# Waiting for and reading a page
# ------------------------------------------------------------------------------------------------


def assert_no_exception(page) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, f"Streamlit exception on {page.url}: {boxes.first.inner_text()[:1000]}"


def wait(page, condition: str, arg=None, polling="raf") -> None:
    """Until the JS function ``condition(arg)`` is true; fails at once on a Streamlit exception box."""
    page.wait_for_function(
        f"""(arg) => !!document.querySelector('[data-testid="stException"]') || ({condition})(arg)""",
        arg=arg,
        timeout=TIMEOUT,
        polling=polling,
    )
    assert_no_exception(page)


def wait_text(page, selector: str, text: str) -> None:
    """Until an element matching ``selector`` contains ``text``."""
    wait(
        page,
        "([sel, t]) => [...document.querySelectorAll(sel)].some((e) => e.innerText.includes(t))",
        [selector, text],
        polling=200,
    )


IDLE = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    const idle = app && app.getAttribute('data-test-script-state') === 'notRunning';
    return idle && !document.querySelector('[data-stale="true"]');
}"""


def wait_idle(page) -> None:
    """Until the script run has finished: the app says "notRunning" and no element is stale.

    Call it after a sign that the rerun has started (a changed text): right after a click the
    previous run's state is still shown.
    """
    wait(page, IDLE, polling=200)


def wait_page(page, title: str, n_charts: int, marker: str) -> None:
    """Until a page shows its title, ``marker`` and ``n_charts`` charts with data, and is idle."""
    wait_text(page, "h1", title)
    wait_text(page, '[data-testid="stMain"]', marker)
    wait(
        page,
        """(n) => {
            const plots = [...document.querySelectorAll('.js-plotly-plot')];
            return plots.length >= n && plots.every((p) => p.data && p.data.length > 0);
        }""",
        n_charts,
        polling=200,
    )
    # Widgets and tables are lazy-loaded components: a grey skeleton until their code has arrived.
    wait(page, "() => document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0", polling=200)
    wait_idle(page)


def screenshot(page, path: Path) -> Path:
    """The whole page: Streamlit scrolls inside its main element, so the viewport is made that tall."""
    height = page.evaluate(
        "() => (document.querySelector('[data-testid=\"stMain\"]') || document.body).scrollHeight"
    )
    size = page.viewport_size
    tall = min(max(height, size["height"]), MAX_SHOT_HEIGHT)
    page.set_viewport_size({"width": size["width"], "height": tall})
    page.wait_for_timeout(300)  # one relayout
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path


def shown_rank(page) -> tuple[int, int]:
    """(r, L) from the explorer's "r = 85 of L = 169 tokens" subheader."""
    text = page.locator("h3").filter(has_text=re.compile(r"r = \d+ of L = \d+")).first.inner_text()
    r, n = re.search(r"r = (\d+) of L = (\d+)", text).groups()
    return int(r), int(n)


def metric(page, label: str) -> str:
    """The shown value of the st.metric whose label contains ``label``."""
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text().strip()


# Plotly 6+ sends numpy arrays as typed-array specs {dtype, bdata (base64), shape}.
_DTYPES = {"f8": "d", "f4": "f", "i4": "i", "i2": "h", "i1": "b", "u4": "I", "u2": "H", "u1": "B"}
# JS: the first trace's y of the chart with this widget key, as a string that changes when y does.
Y_OF = """(key) => {
    const el = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    const y = el && el.data[0].y;
    return y ? y.bdata || JSON.stringify(Array.from(y)) : null;
}"""
# JS: what the tour's figure shows (title, trace types and sizes), to see it change between steps.
FIG_SIGNATURE = """() => {
    const el = document.querySelector('.st-key-tour_fig .js-plotly-plot');
    if (!el || !el.data) return null;
    const size = (v) => (v ? (v.bdata ? v.bdata.length : v.length) : 0);
    const traces = el.data.map((t) => `${t.type}:${size(t.x)}:${size(t.y)}:${size(t.z)}`);
    return [(el.layout.title || {}).text || '', ...traces].join('\\n');  // titles hold '|', never a newline
}"""
# JS: a chart's title (by widget key), or null while it is not drawn.
TITLE_OF = """(key) => {
    const el = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    return el && el.layout ? (el.layout.title || {}).text || '' : null;
}"""


def values(v) -> list:
    """A trace's x or y as a flat list, whether plotly got a list or a typed-array spec."""
    if isinstance(v, dict) and "bdata" in v:
        out = array.array(_DTYPES[v["dtype"]], base64.b64decode(v["bdata"]))
        if sys.byteorder != "little":
            out.byteswap()
        return out.tolist()
    return list(v or [])


def plot(page, key: str) -> dict:
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
    return {"title": fig["title"], "data": [{k: values(t[k]) for k in ("x", "y")} for t in fig["data"]]}


def chart_title(page, key: str) -> str | None:
    return page.evaluate(TITLE_OF, key)


def wait_new_figure(page, before: str | None) -> None:
    wait(page, f"(before) => ({FIG_SIGNATURE})() !== before", before, polling=200)


def download(page, popover: str, button: str) -> tuple[str, bytes]:
    """Open a download popover (``widgets.figure_downloads`` / ``table_downloads``) and click a button."""
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
# Measuring: from slider release to the updated metric on screen
# ------------------------------------------------------------------------------------------------

# JS: arm a one-shot clock. t0 = the next keyup (the slider's release), t1 = the first moment after it at
# which the subheader above the metrics names another rank and the metric labelled ``label`` is drawn
# anew (no longer marked stale): the update is on screen. A MutationObserver, so the time is when the
# browser changed the page, not when a poll happened to look.
ARM_CLOCK = """(label) => {
    const heading = () => [...document.querySelectorAll('h3')].map((h) => h.innerText)
        .find((t) => /r = \\d+ of L = \\d+/.test(t)) || null;
    const fresh = () => {
        const box = [...document.querySelectorAll('[data-testid="stMetric"]')]
            .find((m) => m.innerText.includes(label));
        return !!box && !box.closest('[data-stale="true"]');
    };
    const before = heading();
    const clock = {t0: null, t1: null, before, after: null};
    window.__clock = clock;
    document.addEventListener('keyup', () => { if (clock.t0 === null) clock.t0 = performance.now(); },
                              {capture: true, once: true});
    const obs = new MutationObserver(() => {
        const now = heading();
        if (clock.t0 !== null && clock.t1 === null && now !== null && now !== before && fresh()) {
            clock.t1 = performance.now();
            clock.after = now;
            obs.disconnect();
        }
    });
    obs.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true,
                                attributeFilter: ['data-stale']});
    return before;
}"""


def timed_slider_moves(
    page, label: str, moves: int, key: str = "ArrowLeft", slider_index: int = 0
) -> list[float]:
    """Seconds from each slider release (one arrow key) to the updated metric ``label`` on screen (the
    subheader above it names the new rank and the metric is drawn anew); each move waits for the rerun
    to finish before the next."""
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').nth(slider_index)
    out = []
    for _ in range(moves):
        page.evaluate(ARM_CLOCK, label)
        slider.focus()
        slider.press(key)
        wait(page, "() => window.__clock.t1 !== null", polling="raf")
        wait_idle(page)
        clock = page.evaluate("() => window.__clock")
        out.append((clock["t1"] - clock["t0"]) / 1000)
    return out


def text_of_tokens(model_key: str, n_tokens: int, source: Path | None = None) -> str:
    """A prefix of a bundled sample (the long essay) that the model's tokenizer makes exactly
    ``n_tokens`` tokens of (special tokens included, as the app counts them)."""
    from transformers import AutoTokenizer

    from atp_viz.hf import checkpoints
    from atp_viz.text.inputs import tokenize

    folder = checkpoints.minilm_dir() if model_key == "minilm" else checkpoints.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    text = (source or ROOT / "data" / "08_long_essay_history_of_computing.txt").read_text()

    def count(n_chars: int) -> int:
        return tokenize(tok, text[:n_chars], 10**6).n_tokens

    lo, hi = 1, len(text)
    while lo < hi:  # the longest prefix with at most n_tokens tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= n_tokens else (lo, mid - 1)
    for n in range(lo, 0, -1):
        if count(n) == n_tokens:
            return text[:n]
    raise ValueError(f"no prefix of {n_tokens} tokens")
