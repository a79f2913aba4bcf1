"""An offline HTML report of one model on one text: ``python -m atp_viz report``.

``DIR/report.html`` is one self-contained page (plotly.js inlined once, no CDN, no network) with a
header (model, text, token count, settings, date), the singular-value spectra of every layer's
attention input X, the error-vs-rank sweep of every ATP form, and the attention maps of one layer and
head (dense, ATP on principal keys, ATP lifted to tokens, and the difference). Beside it, the data:

- ``spectra.npz`` (see :func:`atp_viz.outputs.export.spectra_npz`);
- ``sweep.csv`` and ``sweep.json`` (one row per rank, see :func:`atp_viz.outputs.export.sweep_rows`);
- ``capture.npz`` with ``--capture`` (every layer's X, Q, K, V, block outputs, the map's layer);
- ``figures/<name>.png`` for every figure when Chromium is available (the report says when not).
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from atp_viz import __version__, forms
from atp_viz.analysis import compare, spectra
from atp_viz.analysis.capture import Capture, capture
from atp_viz.core.progress import ProgressFn, within
from atp_viz.core.ranks import resolve_rank
from atp_viz.figures import maps as maps_fig
from atp_viz.figures import plots
from atp_viz.hf.engine import ATPConfig
from atp_viz.hf.model_info import TUNED_PREFIX, LoadedModel
from atp_viz.outputs import export
from atp_viz.text.inputs import readable_tokens, tokenize

Section = tuple[str, str, str, go.Figure]  # (file name, heading, caption, figure)
MAP_SIZE = 256  # attention maps are block-averaged to at most this many rows/columns (as in the app)
TEXT_PREVIEW = 400  # characters of the text shown in the header; the whole text is one click away


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes. Ranks are ints (principal keys) or floats in (0, 1] (share of L)."""

    ranks: tuple[int | float, ...] | None = None  # the sweep; None: compare.sweep_ranks(L)
    form: str = "exact"  # the form of the attention maps (the sweep runs every registered form)
    map_rank: int | float = 0.5
    map_layer: int | None = None  # None: the middle layer
    map_head: int = 0
    write_capture: bool = False
    write_png: bool = True
    text_label: str = ""  # where the text came from (a file name), for the header


@dataclass
class Report:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _resolve_ranks(ranks: Sequence[int | float], n_tokens: int) -> list[int]:
    """Each rank to an int in [1, L]; a rank above L is an error here (the user asked for that sweep)."""
    out = []
    for r in ranks:
        value, notice = resolve_rank(r, n_tokens)
        if notice:
            raise ValueError(
                f"Sweep rank {r} exceeds the text's L = {n_tokens} tokens; give ranks <= {n_tokens}."
            )
        out.append(value)
    return sorted(set(out))


def _page(title: str, header_html: str, sections: list[tuple[str, str, str, go.Figure]]) -> str:
    from plotly.offline import get_plotlyjs

    body = []
    for i, (_, heading, caption, fig) in enumerate(sections):
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}", default_width="100%")
        body.append(
            f"<section><h2>{html.escape(heading)}</h2>\n<p>{html.escape(caption)}</p>\n{div}\n</section>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;vertical-align:top}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}section{margin-top:2em}</style>\n"
        # plotly.js inlined once for every figure: the page works offline and makes no request.
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
        f"</head>\n<body>\n{header_html}\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _header(loaded: LoadedModel, cap: Any, settings: ReportSettings, facts: dict, notes: list[str]) -> str:
    i = loaded.info
    kind = "decoder" if i.is_decoder else "encoder"
    rows = {
        "model": f"{i.label} ({i.key}): {kind}, {i.n_layers} layers, {i.n_heads} heads "
        f"({i.n_kv_heads} key/value), d = {i.d_model}",
        "text": settings.text_label or "(given directly)",
        "tokens L": f"{cap.n_tokens}"
        + (f" (truncated from {cap.n_original} to the model's limit)" if cap.truncated else ""),
        **facts,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "made by": f"atp_viz {__version__} (python -m atp_viz report)",
    }
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items()
    )
    text = cap.text
    preview = text if len(text) <= TEXT_PREVIEW else text[:TEXT_PREVIEW] + " ..."
    tuning = (
        "A fine-tuned model, read here with the paper's basis (from X) and one rank in every layer, "
        "whatever it was tuned with: <code>python -m atp_viz compare</code> reads it as it was tuned."
        if i.key.startswith(TUNED_PREFIX)
        else "Untuned model: the paper's accuracy figures were measured after fine-tuning."
    )
    parts = [
        "<h1>ATP report</h1>",
        "<p>Attention on Top Principal keys (arXiv 2403.02352): how low-rank this model's attention inputs "
        f"are on this text, and what ATP loses at each rank. {tuning}</p>",
        f"<table>\n{table}\n</table>",
        f"<p>Text ({len(text):,} characters):</p><pre>{html.escape(preview)}</pre>",
    ]
    if len(text) > TEXT_PREVIEW:
        parts.append(f"<details><summary>The whole text</summary><pre>{html.escape(text)}</pre></details>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


def _check(loaded: LoadedModel, settings: ReportSettings, out: Path) -> int:
    """The map layer, after checking the settings against the model (ValueError with a sentence)."""
    info = loaded.info
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder.")
    layer = info.n_layers // 2 if settings.map_layer is None else settings.map_layer
    if not 0 <= layer < info.n_layers:
        raise ValueError(f"Map layer {layer} does not exist: {info.label} has layers 0-{info.n_layers - 1}.")
    if not 0 <= settings.map_head < info.n_heads:
        raise ValueError(
            f"Map head {settings.map_head} does not exist: {info.label} has query heads 0-{info.n_heads - 1}."
        )
    forms.get(settings.form)  # ValueError naming the registered forms
    return layer


def _spectra_sections(sps, labels) -> list[Section]:
    return [
        (
            "spectra",
            "Singular values of the attention input X",
            "One line per layer: s_i / s_1 of X (L tokens x d), uncentred SVD as ATP uses. A fast fall "
            "means a few principal directions carry most of X.",
            plots.spectra_figure(sps, labels),
        ),
        (
            "energy",
            "Cumulative energy",
            "How many components hold 90%, 95% and 99% of each layer's energy.",
            plots.energy_figure(sps, labels, spectra.THRESHOLDS),
        ),
        (
            "ranks_needed",
            "Components needed per layer",
            "The smallest k with E(k) >= threshold, also as a share of L.",
            plots.ranks_heatmap(spectra.ranks_table(sps), labels, spectra.THRESHOLDS, sps[0].n_rows),
        ),
    ]


def _map_sections(
    loaded, tok, cap: Capture, settings: ReportSettings, layer: int, map_r: int
) -> list[Section]:
    """Dense, principal, lifted and difference maps of one layer and head."""
    head, L = settings.map_head, cap.n_tokens
    run = compare.forward(loaded, tok, ATPConfig(rank=map_r, form=settings.form), map_layers=[layer])
    maps = compare.attention_maps(cap.layers[layer].attn, run, layer, head)
    where = f"layer {layer}, head {head}, r = {map_r} of L = {L}, {settings.form} form"
    tokens = readable_tokens(cap.tokens)
    sections = []
    for name, m, title in zip(
        MAP_NAMES,
        (maps.dense, maps.principal, maps.lifted, maps.difference),
        (
            "Dense attention (L x L)",
            f"ATP weights on {map_r} principal keys (L x r)",
            "ATP lifted back to tokens (L x L)",
            "ATP lifted minus dense",
        ),
        strict=True,
    ):
        fig = maps_fig.token_map(
            m,
            tokens,
            title=title,
            max_size=MAP_SIZE,
            principal=name == "principal",
            signed=True if name == "difference" else None,
            causal=loaded.info.is_decoder,
        )
        sections.append((f"map_{name}", f"Attention map: {name}", where, fig))
    return sections


def _write_pngs(sections: list[Section], settings: ReportSettings, write) -> str | None:
    """Every figure as ``figures/<name>.png``; returns a note when there are none (or not all)."""
    if not settings.write_png:
        return "PNG files were not asked for (--no-png)."
    if problem := export.static_export_problem():
        return f"No PNG files: {problem}"
    try:
        for name, _, _, fig in sections:
            write(f"figures/{name}.png", export.figure_png(fig))
    except export.ExportError as err:
        return f"PNG files stopped: {err}"
    return None


OWN_FILES = ("report.html", "spectra.npz", "sweep.csv", "sweep.json", "capture.npz")
MAP_NAMES = ("dense", "principal", "lifted", "difference")
FIGURE_NAMES = ("spectra", "energy", "ranks_needed", "rank_sweep", *(f"map_{n}" for n in MAP_NAMES))


def _clear_earlier_report(out: Path) -> list[str]:
    """In a folder that holds an earlier report (its report.html), remove that report's files (the names a
    report writes, nothing else), so that no file from another model or text sits next to this one.
    Returns what was removed; a folder without a report.html is left as it is."""
    if not (out / "report.html").is_file():
        return []
    old = [out / name for name in OWN_FILES] + [out / "figures" / f"{n}.png" for n in FIGURE_NAMES]
    removed = []
    for path in old:
        if path.is_file():
            path.unlink()
            removed.append(str(path.relative_to(out)))
    return removed


def _not_written_here(out: Path, written: list[Path]) -> str | None:
    """A sentence naming the files in ``out`` with a report's own names that this report did not write
    (a folder without an earlier report.html is not cleared, and this report may leave out capture.npz
    or the figures): they are left as they are, but they are not this report's."""
    names = [name for name in OWN_FILES if name != "report.html"] + [f"figures/{n}.png" for n in FIGURE_NAMES]
    others = [name for name in names if (out / name).is_file() and out / name not in written]
    if not others:
        return None
    return f"This folder also holds {', '.join(others)}, not written by this report (left as they were)."


def make_report(
    loaded: LoadedModel,
    text: str,
    out_dir: str | Path,
    settings: ReportSettings = ReportSettings(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    progress: ProgressFn | None = None,
) -> Report:
    """Compute everything and write the report and its data files into ``out_dir`` (created)."""
    say = progress or (lambda f, msg: None)
    info = loaded.info
    out = Path(out_dir)
    layer = _check(loaded, settings, out)
    report = Report(out_dir=out)

    say(0.0, f"capturing {info.label} on the text")
    tok = tokenize(loaded.tokenizer, text, info.max_tokens)
    cap = capture(loaded, text, attentions=(layer,))
    L = cap.n_tokens
    ranks = _resolve_ranks(settings.ranks, L) if settings.ranks else compare.sweep_ranks(L)
    map_r, notice = resolve_rank(settings.map_rank, L)
    if notice:
        report.notes.append(notice)
    report.notes[:0] = list(cap.notes)
    for note in report.notes:  # on the terminal too, not only inside report.html
        say(0.05, f"note: {note}")

    say(0.1, f"spectra of {info.n_layers} layers (L = {L})")
    sps = spectra.layer_spectra([lc.x for lc in cap.layers])
    labels = [f"layer {i}" for i in range(info.n_layers)]
    sections = _spectra_sections(sps, labels)
    n_forms = len(forms.names())
    say(0.15, f"dense run and rank sweep over {len(ranks)} ranks x {n_forms} forms")
    dense = compare.forward(loaded, tok)
    sweep = compare.error_sweep(
        loaded, tok, dense, ATPConfig(), ranks, progress=within(say, 0.15, 0.85, "sweep ")
    )
    sections.append(
        (
            "rank_sweep",
            "Error vs rank, every form",
            "Exact form: the error of dropping bases alone. Every other form: its total error (errors of two "
            "forms do not add up).",
            plots.sweep_figure(sweep, current=map_r),
        )
    )
    say(0.85, f"attention maps, layer {layer}, head {settings.map_head}, r = {map_r}, {settings.form} form")
    sections += _map_sections(loaded, tok, cap, settings, layer, map_r)
    out.mkdir(parents=True, exist_ok=True)
    stale = _clear_earlier_report(out)
    if stale:
        report.notes.append(
            f"This folder held an earlier report; its {len(stale)} files were removed first ("
            + ", ".join(stale)
            + "), so every file here is this report's."
        )
        say(0.86, report.notes[-1])

    def write(name: str, data: bytes) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        report.files.append(path)
        say(0.9, f"wrote {path} ({len(data) / 1e6:.2f} MB)")

    write("spectra.npz", export.spectra_npz(sps, labels))
    rows = export.sweep_rows(sweep)
    write("sweep.csv", export.table_csv(rows))
    write("sweep.json", export.table_json(rows))
    if settings.write_capture:
        write("capture.npz", export.capture_npz(cap))
    for note in (_write_pngs(sections, settings, write), _not_written_here(out, report.files)):
        if note:
            report.notes.append(note)
            say(0.95, note)
    facts = {
        "sweep ranks": ", ".join(map(str, ranks)) + f" ({', '.join(forms.names())})",
        "sweep metric": sweep.metric,
        "attention maps": f"layer {layer}, head {settings.map_head}, r = {map_r} of L = {L}, "
        f"{settings.form} form",
        "basis": "top-r left singular vectors of each layer's X (exact SVD), ATP on every layer",
        "files": ", ".join(str(p.relative_to(out)) for p in report.files),
    }
    page = _page(f"ATP report: {info.label}", _header(loaded, cap, settings, facts, report.notes), sections)
    write("report.html", page.encode("utf-8"))
    return report
