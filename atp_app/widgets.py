"""Widgets every page uses: a progress bar fed by the library's progress callbacks, a button for heavy
jobs, download buttons for figures and tables (the files are made by :mod:`atp_viz.outputs.export`),
highlighted text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st

from atp_app import state
from atp_viz.core.progress import ProgressFn
from atp_viz.figures.tour.layout import presenter_layout
from atp_viz.hf.model_info import TUNED_PREFIX
from atp_viz.outputs import export

_RAN_FOR = "_ran_for"  # button key -> the inputs (model, text) its heavy job last ran on, this session


def run_button(label: str, key: str, inputs: tuple, **kwargs) -> bool:
    """A button that starts a heavy job and keeps its result shown while the user moves other widgets:
    True when clicked now, or when it was clicked earlier in this session for the same ``inputs`` (the
    model and text the job reads). Another model or text needs a new click, so nothing heavy starts
    unasked. A job refused or failed calls :func:`forget_run`, so reruns do not retry it."""
    ran = st.session_state.setdefault(_RAN_FOR, {})
    if st.button(label, key=key, **kwargs):
        ran[key] = inputs
        return True
    if key in ran and ran[key] != inputs:
        st.caption(f"The model or text changed: *{label}* runs it on the new one.")
    return ran.get(key) == inputs


def forget_run(key: str) -> None:
    st.session_state.setdefault(_RAN_FOR, {}).pop(key, None)


@contextmanager
def progress(text: str, *, container=None) -> Iterator[ProgressFn]:
    """A progress bar for the block, as a :data:`~atp_viz.core.progress.ProgressFn`; removed when the
    block ends, by return or by exception (so no stale bar stays on the page)."""
    bar = (container or st).progress(0.0, text=text)

    def update(fraction: float, message: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=message)

    try:
        yield update
    finally:
        bar.empty()


def highlight_divergence(pieces: list[str], first: int | None) -> str:
    """Markdown of decoded tokens with the first diverging one highlighted; markdown characters in
    the tokens are escaped so generated text cannot break the formatting."""
    esc = [re.sub(r"([\\`*_{}\[\]()#+\-.!|$<>~:])", r"\\\1", t) for t in pieces]
    if first is None or first >= len(esc):
        return "".join(esc)
    return "".join(esc[:first]) + f":red-background[{esc[first]}]" + "".join(esc[first + 1 :])


def _file_stem(name: str) -> str:
    """A safe file name stem (and widget key part) from a figure or table name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    if not stem:
        raise ValueError(f"A download needs a name with letters or digits, got {name!r}.")
    return stem


def model_file_part(model_key: str) -> str:
    """A model as a file name names it: its key, or a folder's (or tuned run's) last part."""
    return model_key.rstrip("/").rsplit("/", 1)[-1].removeprefix(TUNED_PREFIX)


def figure_downloads(fig, name: str) -> None:
    """PNG / SVG / HTML download buttons for one figure, in a compact "Download figure" popover.

    ``name`` is the file name stem and must be unique on the page (it keys the widgets; the popover
    gets the CSS class ``st-key-dl_<name>``). The files are made only when a button is clicked
    (Streamlit runs the ``data`` callable then, on its own thread), so reruns never pay for kaleido
    (about 0.3 s per image, 2-3 s for the first one while Chromium starts) or for the 4.8 MB HTML.
    Without Chromium the popover says why instead of offering PNG and SVG; HTML always works.
    In presenter mode the files have the large fonts the page shows (ready for a slide).
    """
    stem = _file_stem(name)
    if presenting():
        fig = presenter_layout(fig)
    with st.popover("Download figure", icon=":material/download:", key=f"dl_{stem}"):
        problem = export.static_export_problem()
        if problem:
            st.caption(problem)
        else:
            st.download_button(
                "PNG (2x)",
                lambda: export.figure_png(fig),
                file_name=f"{stem}.png",
                mime="image/png",
                key=f"dl_{stem}_png",
                on_click="ignore",
            )
            st.download_button(
                "SVG",
                lambda: export.figure_svg(fig),
                file_name=f"{stem}.svg",
                mime="image/svg+xml",
                key=f"dl_{stem}_svg",
                on_click="ignore",
            )
        st.download_button(
            "HTML (interactive, works offline)",
            lambda: export.figure_html(fig),
            file_name=f"{stem}.html",
            mime="text/html",
            key=f"dl_{stem}_html",
            on_click="ignore",
        )


def table_downloads(rows: list[dict], name: str) -> None:
    """CSV and JSON download buttons for a table or a set of metrics (a list of flat dicts).

    Tables are small, so both files are made right away; a table that cannot be exported shows why.
    ``name`` is the file name stem and must be unique on the page (popover class ``st-key-dl_<name>``).
    """
    stem = _file_stem(name)
    with st.popover("Download table", icon=":material/download:", key=f"dl_{stem}"):
        for label, make, ext, mime in (
            ("CSV", export.table_csv, "csv", "text/csv"),
            ("JSON", export.table_json, "json", "application/json"),
        ):
            try:
                data = make(rows)
            except export.ExportError as err:
                st.caption(f"{label}: {err}")
                continue
            st.download_button(
                label, data, file_name=f"{stem}.{ext}", mime=mime, key=f"dl_{stem}_{ext}", on_click="ignore"
            )


# Large type for a lecture hall; local CSS only (no web fonts: the app stays offline).
PRESENTER_CSS = """
<style>
[data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li { font-size: 1.5rem;
  line-height: 1.55; }
[data-testid="stHeading"] h1 { font-size: 3.2rem; }
[data-testid="stHeading"] h3 { font-size: 2.4rem; }
.katex { font-size: 1.7em !important; }
[data-testid="stCaptionContainer"] { font-size: 1.2rem; }
[data-testid="stMetricValue"] { font-size: 3rem; }
[data-testid="stWidgetLabel"] p { font-size: 1.25rem; }
</style>
"""


def presenter_css() -> None:
    """Presenter mode's large type on this page (see :func:`atp_app.state` ``present``)."""
    st.markdown(PRESENTER_CSS, unsafe_allow_html=True)


def presenting() -> bool:
    return state.get("present") == "1"


def chart(fig, key: str, **kwargs) -> None:
    """``st.plotly_chart`` with presenter mode's large fonts when it is on (a new figure: a cached one
    is never modified)."""
    if presenting():
        fig = presenter_layout(fig)
    st.plotly_chart(fig, key=key, **kwargs)


def unique_labels(tokens: list[str]) -> list[str]:
    """One label per token for st.pills, all different: the widget sends the clicked option as its label
    and maps it back through a label -> option dict, so a repeated token ("the") would always select
    the same one. The n-th repeat gets n written in binary with two zero-width characters: invisible,
    unique, and log2(n) long (one more space per repeat made a frequent token's labels grow quadratically)."""
    seen: dict[str, int] = {}
    out = []
    for t in tokens:
        label = t.strip() or repr(t)
        n = seen[label] = seen.get(label, -1) + 1
        out.append(label + (format(n, "b").translate(_INVISIBLE) if n else ""))
    return out


_INVISIBLE = str.maketrans("01", "\u200b\u200c")
