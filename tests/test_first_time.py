"""A first-time path that works: the home page's start-here links, a page that needs a decoder offering a
one-click switch, and presenter mode laying multi-panel figures out for a projector."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SENTENCE
from streamlit.testing.v1 import AppTest

from atp_viz.analysis.capture import capture
from atp_viz.figures.tour import data as tdata
from atp_viz.figures.tour import figures as tfig
from atp_viz.figures.tour import layout

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_home_page_starts_with_three_links():
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception, at.exception
    links = at.get("page_link")
    assert [link.proto.label for link in links] == [
        "1. Low-rank spectra",
        "2. Rank explorer",
        "3. How ATP works (guided tour)",
    ]
    assert sum("Start here" in m.value for m in at.markdown) == 1


@pytest.mark.bundled
def test_serving_on_an_encoder_switches_to_the_decoder_in_one_click():
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page("pages/serving.py").run()
    assert not at.exception, at.exception
    assert any("needs a decoder" in i.value for i in at.info)
    assert any("takes about" in c.value or "already" in c.value for c in at.caption)
    at.button(key="switch_to_decoder").click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == "smollm2"
    assert at.query_params["model"] == "smollm2"
    assert at.button(key="serve_go")  # the page itself now: generation


def _boxes(fig) -> list[tuple[float, float, float, float]]:
    """(x0, x1, y0, y1) of every heatmap panel, in paper coordinates."""
    out = []
    for t in fig.data:
        if t.type == "heatmap":
            xa = fig.layout["xaxis" + (t.xaxis or "x")[1:]].domain
            ya = fig.layout["yaxis" + (t.yaxis or "y")[1:]].domain
            out.append((*xa, *ya))
    return out


def test_presenter_mode_puts_panels_in_rows_with_their_colour_bars_under_them(load):
    """Step 7 (every registered form next to dense) at a projector's width: at most three panels a row,
    no two panels overlap, every colour bar lies flat under a panel, titles wrapped to the width."""
    data = tdata.tour_data(capture(load("tiny-llama"), SENTENCE, attentions="all"), 1, 0, 4)
    fig = tfig.attention_figure(data)
    big = layout.presenter_layout(fig)
    boxes = _boxes(big)
    assert len(boxes) == len(_boxes(fig)) >= 3
    rows = {round(b[3], 6) for b in boxes}
    assert len(rows) == -(-len(boxes) // layout.PRESENTER_COLS)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2], (a, b)
    axes = {t.coloraxis for t in big.data if t.type == "heatmap"}
    assert all(big.layout[name].colorbar.orientation == "h" for name in axes), axes
    main_lines = [line for line in big.layout.title.text.split("<br>") if not line.startswith("<sup>")]
    assert max(len(line) for line in main_lines) * 0.55 * big.layout.title.font.size <= layout.PRESENTER_WIDTH
