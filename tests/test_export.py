"""Exports: the contents of every file format, the clear errors, and the app's download buttons."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from atp_viz.analysis.spectra import layer_spectra
from atp_viz.outputs import export

CHROMIUM = Path(export.SYSTEM_CHROMIUM)
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"{CHROMIUM} is missing: PNG/SVG export needs Debian's chromium (`make test` installs it as root)",
)
APP = str(Path(__file__).resolve().parent.parent / "app.py")


def _figure(width: int = 400, height: int = 300, name: str = "unique-trace-name") -> go.Figure:
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[0.125, 7.5, 3.25], name=name))
    fig.update_layout(width=width, height=height, title="An export test", showlegend=True)
    return fig


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(autouse=True)
def _system_chromium(monkeypatch):
    """Tests use the system Chromium whatever the caller's environment says."""
    monkeypatch.delenv("BROWSER_PATH", raising=False)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


@needs_chromium
def test_png_has_magic_bytes_and_the_scaled_size():
    assert _png_size(export.figure_png(_figure(400, 300))) == (800, 600)  # default scale 2
    assert _png_size(export.figure_png(_figure(400, 300), scale=1)) == (400, 300)


@needs_chromium
def test_svg_parses_with_an_svg_root_and_the_figure_in_it():
    data = export.figure_svg(_figure(400, 300))
    root = ET.fromstring(data)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(root.get("width")) == 400 and float(root.get("height")) == 300
    assert b"An export test" in data and b"unique-trace-name" in data  # title and legend
    assert b'class="scatterlayer' in data and b"<path" in data  # the line itself, as a vector path


@needs_chromium
def test_concurrent_images_each_get_their_own():
    """Two sessions exporting at once must not receive each other's image."""
    sizes = {(300, 200): None, (500, 250): None, (350, 420): None}
    errors = []

    def run(w, h):
        try:
            sizes[(w, h)] = _png_size(export.figure_png(_figure(w, h), scale=1))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=wh) for wh in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(got == wh for wh, got in sizes.items()), sizes


def test_html_is_standalone_with_the_data_and_no_cdn():
    data = export.figure_html(_figure()).decode("utf-8")
    assert data.lstrip().lower().startswith("<!doctype html>")
    assert "unique-trace-name" in data and "7.5" in data and "An export test" in data
    assert "plotly.js v" in data  # the library itself is inlined
    assert not re.search(r"<script[^>]*\bsrc=", data), "no external script may be loaded"
    assert "https://cdn" not in "".join(re.findall(r"<script[^>]*>", data))


@pytest.mark.parametrize("bad", [None, {"data": []}, "figure"])
def test_non_figures_are_refused_clearly(bad):
    with pytest.raises(export.ExportError, match="Expected a plotly Figure"):
        export.figure_html(bad)
    with pytest.raises(export.ExportError, match="Expected a plotly Figure"):
        export.figure_png(bad)


@pytest.mark.parametrize("scale", [0, -1, 11, "2", True])
def test_bad_scale_is_refused(scale):
    with pytest.raises(export.ExportError, match="scale"):
        export.figure_png(_figure(), scale=scale)


def test_missing_chromium_gives_a_clear_message_and_html_still_works(monkeypatch, tmp_path):
    missing = tmp_path / "no-chromium-here"
    monkeypatch.setenv("BROWSER_PATH", str(missing))
    problem = export.static_export_problem()
    assert problem and str(missing) in problem and "HTML" in problem
    with pytest.raises(export.ExportError, match="missing"):
        export.figure_png(_figure())
    with pytest.raises(export.ExportError, match="missing"):
        export.figure_svg(_figure())
    assert b"unique-trace-name" in export.figure_html(_figure())
    assert export.table_csv([{"a": 1}]) == b"a\n1\n"


# ------------------------------------------------------------------------------------------------
# The browser's life: no Chromium may outlive a failed start or a hung close
# ------------------------------------------------------------------------------------------------


def _live_processes_with(marker: str) -> list[int]:
    """Pids of live (not zombie) processes with ``marker`` in their command line (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if marker.encode() in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _wait_gone(marker: str, timeout: float = 10.0) -> list[int]:
    """The processes with ``marker`` still alive after up to ``timeout`` s (a killed one takes a moment)."""
    deadline = time.monotonic() + timeout
    while (alive := _live_processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_browser_that_never_answers_is_killed_after_the_start_timeout(monkeypatch, tmp_path):
    """A browser that starts but never speaks: ExportError after START_TIMEOUT_S, and nothing left
    running (kaleido's wrapper and the 'browser' it started are both killed)."""
    pytest.importorskip("kaleido")
    marker = f"fake-chromium-{uuid.uuid4().hex}"
    fake = tmp_path / marker
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")  # ignores the DevTools pipe
    fake.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    monkeypatch.setattr(export, "START_TIMEOUT_S", 3.0)
    started = time.monotonic()
    with pytest.raises(export.ExportError, match="Could not start Chromium within 3 s"):
        export.figure_png(_figure())
    assert time.monotonic() - started < 30
    try:
        assert not _wait_gone(marker), "the fake browser (or kaleido's wrapper around it) is still running"
    finally:
        for pid in _live_processes_with(marker):  # never leave one behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
    assert export._renderer is None
    assert not [t for t in threading.enumerate() if t.name == "kaleido"]  # the loop thread ended too


class _FakeKaleido:
    """Stands in for kaleido.Kaleido: one tab (an asyncio lock), renders of ``RENDER_S`` seconds."""

    RENDER_S = 0.6

    def __init__(self, **kwargs):
        self.active = self.peak = 0

    async def open(self):
        import asyncio

        self.tab = asyncio.Lock()

    async def calc_fig(self, fig, opts=None):
        import asyncio

        async with self.tab:
            self.active += 1
            self.peak = max(self.peak, self.active)
            await asyncio.sleep(self.RENDER_S)
            self.active -= 1
        return json.dumps(fig).encode()

    async def close(self):
        pass


def test_renders_take_turns_and_only_the_render_is_timed(monkeypatch):
    """Three sessions at once: each waits for its turn untimed, and its own 0.6 s render fits its 1 s
    limit (timing the wait in kaleido's tab queue too, the third would time out)."""
    kaleido = pytest.importorskip("kaleido")
    monkeypatch.setattr(kaleido, "Kaleido", _FakeKaleido)
    monkeypatch.setattr(export, "RENDER_TIMEOUT_S", -4.0)  # the wait is RENDER_TIMEOUT_S + 5 = 1 s
    renderer = export._Renderer(Path("/fake/chromium"))
    results, errors = {}, []

    def run(i):
        try:
            results[i] = renderer.render({"i": i}, {})
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        renderer.close()
    assert not errors, errors
    assert results == {i: json.dumps({"i": i}).encode() for i in range(3)}
    assert renderer.kaleido.peak == 1
    assert renderer.loop.is_closed() and not renderer.thread.is_alive()
    with pytest.raises(export._RendererClosed):  # a call that waited while it closed goes elsewhere
        renderer.render({}, {})


def test_a_hanging_close_still_kills_the_browser(monkeypatch):
    """choreographer's close has no time limit: after CLOSE_TIMEOUT_S the process group is killed."""
    kaleido = pytest.importorskip("kaleido")
    marker = f"hung-browser-{uuid.uuid4().hex}"

    class Hangs(_FakeKaleido):
        async def open(self):
            await super().open()
            self.subprocess = proc

        async def close(self):
            import asyncio

            await asyncio.sleep(600)

    monkeypatch.setattr(kaleido, "Kaleido", Hangs)
    monkeypatch.setattr(export, "CLOSE_TIMEOUT_S", 0.5)
    # A 'browser' in its own session with a child, as choreographer starts Chromium.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', sys.argv[1]]); "
         "time.sleep(600)", marker],
        start_new_session=True,
    )  # fmt: skip
    try:
        renderer = export._Renderer(Path("/fake/chromium"))
        deadline = time.monotonic() + 10
        while len(_live_processes_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_live_processes_with(marker)) == 2  # the 'browser' and its child run
        started = time.monotonic()
        renderer.close()
        assert time.monotonic() - started < 15
        assert proc.poll() is not None
        assert not _wait_gone(marker)
        assert renderer.loop.is_closed() and not renderer.thread.is_alive()
    finally:
        for pid in _live_processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

ROWS = [
    {"name": "dense", "rank": 12, "error": 0.1 + 0.2, "note": 'has, a comma and "quotes"'},
    {"name": "ATP exact", "rank": 3, "error": 1e-17, "note": "two\nlines"},
    {"name": "ATP linear", "rank": 1, "error": -2.5, "note": ""},
]


def test_csv_round_trips_to_the_same_rows():
    import pandas as pd

    data = export.table_csv(ROWS)
    back = pd.read_csv(io.BytesIO(data), keep_default_na=False).to_dict("records")
    assert back == ROWS  # floats keep every digit (0.30000000000000004), quoting survives
    header = next(csv.reader(io.StringIO(data.decode())))
    assert header == ["name", "rank", "error", "note"]


def test_json_equals_the_rows():
    assert json.loads(export.table_json(ROWS)) == ROWS


def test_numpy_values_nan_and_missing_cells():
    rows = [{"a": np.int64(3), "b": np.float32(0.5), "c": np.nan}, {"a": 4, "b": np.inf, "d": "x"}]
    assert json.loads(export.table_json(rows)) == [
        {"a": 3, "b": 0.5, "c": None},
        {"a": 4, "b": None, "d": "x"},
    ]
    text = export.table_csv(rows).decode()
    assert text.splitlines() == ["a,b,c,d", "3,0.5,,", "4,inf,,x"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no rows"),
        ({"a": 1}, "list of rows"),
        ("a,b", "list of rows"),
        ([{"a": 1}, [1, 2]], "Row 1 is a list"),
    ],
)
def test_bad_tables_are_refused_clearly(rows, message):
    for make in (export.table_csv, export.table_json):
        with pytest.raises(export.ExportError, match=message):
            make(rows)


def test_csv_refuses_nested_cells_but_json_keeps_them():
    rows = [{"layer": 0, "rank_for": {"0.9": 3}}]
    with pytest.raises(export.ExportError, match="'rank_for'.*JSON instead"):
        export.table_csv(rows)
    assert json.loads(export.table_json(rows)) == rows


def test_metric_rows_flatten_nested_metrics():
    rows = export.metric_rows({"rank": 4, "config": {"form": "exact"}, "err": [0.5, 0.25], "none": []})
    assert rows == [
        {"metric": "rank", "value": 4},
        {"metric": "config.form", "value": "exact"},
        {"metric": "err.0", "value": 0.5},
        {"metric": "err.1", "value": 0.25},
        {"metric": "none", "value": None},
    ]
    assert export.table_csv(rows)  # flat, so CSV takes it


# ------------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_capture(load):
    from atp_viz.analysis.capture import capture

    return capture(load("tiny-llama"), "Principal keys carry most of the energy of the attention input.")


def test_capture_npz_holds_the_captures_arrays(tiny_capture):
    cap = tiny_capture
    npz = np.load(io.BytesIO(export.capture_npz(cap)))  # no allow_pickle: plain arrays only
    for layer in cap.layers:
        for name in ("x", "q", "k", "v", "output", "resid", "attn"):
            np.testing.assert_array_equal(npz[f"blocks.{layer.index}.{name}"], getattr(layer, name))
    assert npz["attn_layers"].tolist() == [layer.index for layer in cap.layers]
    assert npz["tokens"].tolist() == list(cap.tokens)
    np.testing.assert_array_equal(npz["input_ids"], cap.input_ids)
    np.testing.assert_array_equal(npz["final_hidden"], cap.final_hidden)
    np.testing.assert_array_equal(npz["next_token_logits"], cap.next_token_logits)
    assert "embedding" not in npz.files  # a decoder has none
    assert str(npz["text"]) == cap.text
    assert json.loads(str(npz["model_info"])) == dataclasses.asdict(cap.info)
    assert export.capture_nbytes(cap) > 0


def test_capture_npz_without_attention_maps(tiny_capture):
    npz = np.load(io.BytesIO(export.capture_npz(tiny_capture, attentions=False)))
    assert not [k for k in npz.files if k.endswith(".attn")]
    assert npz["attn_layers"].tolist() == []


def test_capture_npz_refuses_other_objects():
    with pytest.raises(export.ExportError, match="Expected a Capture"):
        export.capture_npz({"layers": []})


def test_spectra_npz_round_trips(tiny_capture):
    sps = layer_spectra([layer.x for layer in tiny_capture.layers], skip_first=True)
    labels = [f"layer {i}" for i in range(len(sps))]
    npz = np.load(io.BytesIO(export.spectra_npz(sps, labels)))
    for i, sp in enumerate(sps):
        np.testing.assert_array_equal(npz[f"sv_{i}"], sp.singular_values)
    assert npz["labels"].tolist() == labels
    assert npz["n_rows"].tolist() == [sp.n_rows for sp in sps]
    assert npz["rank_for"].tolist() == [[sp.rank_for(t) for t in npz["thresholds"]] for sp in sps]
    np.testing.assert_allclose(npz["effective_rank"], [sp.effective_rank for sp in sps])
    rows = export.spectra_rows(sps, labels)
    assert [r["matrix"] for r in rows] == labels and rows[0]["tokens"] == sps[0].n_rows


def test_spectra_npz_bad_input():
    with pytest.raises(export.ExportError, match="no spectra"):
        export.spectra_npz([])
    sps = layer_spectra([np.eye(3)])
    with pytest.raises(export.ExportError, match="2 labels for 1 spectra"):
        export.spectra_npz(sps, ["a", "b"])


# ------------------------------------------------------------------------------------------------
# The app's buttons (Streamlit AppTest, no browser)
# ------------------------------------------------------------------------------------------------


def _spectra_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["model"] = "tiny-bert"
    at.switch_page("pages/spectra.py")
    return at


def _keys(at) -> set[str]:
    return {b.key for b in at.get("download_button")}


@needs_chromium
def test_spectra_page_offers_every_download():
    at = _spectra_page().run()
    assert not at.exception, at.exception
    keys = _keys(at)
    for name in ("spectra_singular_values", "spectra_cumulative_energy", "spectra_ranks_needed"):
        assert {f"dl_{name}_png", f"dl_{name}_svg", f"dl_{name}_html"} <= keys
    assert {"dl_spectra_ranks_table_csv", "dl_spectra_ranks_table_json"} <= keys
    assert {"dl_spectra_npz", "dl_capture_npz"} <= keys


def test_spectra_page_without_chromium_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium-here"))
    at = _spectra_page().run()
    assert not at.exception, at.exception
    keys = _keys(at)
    assert not [k for k in keys if k.endswith(("_png", "_svg"))]
    assert "dl_spectra_singular_values_html" in keys
    assert any("PNG and SVG export need Chromium" in c.value for c in at.caption)
