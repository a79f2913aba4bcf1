"""An offline HTML report of one model on one text: ``python -m atp_viz report``.

``DIR/report.html`` is one self-contained page (plotly.js inlined once, no CDN, no network) with a
header (model, text, token count, settings, date), the singular-value spectra of every layer's
attention input X, the error-vs-rank sweep of both ATP forms, and the attention maps of one layer and
head (dense, ATP on principal keys, ATP lifted to tokens, and the difference). Beside it, the data:

- ``spectra.npz`` (see :func:`atp_viz.export.spectra_npz`);
- ``sweep.csv`` and ``sweep.json`` (one row per rank, see :func:`atp_viz.export.sweep_rows`);
- ``capture.npz`` with ``--capture`` (every layer's X, Q, K, V, block outputs, the map's layer);
- ``figures/<name>.png`` for every figure when Chromium is available (the report says when not).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from atp_viz import __version__, atp, compare, export, plots, spectra
from atp_viz.capture import capture
from atp_viz.engine import ATPConfig
from atp_viz.models import LoadedModel
from atp_viz.texts import tokenize

ProgressFn = Callable[[str], None]
MAP_SIZE = 256  # attention maps are block-averaged to at most this many rows/columns (as in the app)
TEXT_PREVIEW = 400  # characters of the text shown in the header; the whole text is one click away


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes. Ranks are ints (principal keys) or floats in (0, 1] (share of L)."""

    ranks: tuple[int | float, ...] | None = None  # the sweep; None: compare.sweep_ranks(L)
    form: str = "exact"  # the form of the attention maps (the sweep always runs both)
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
        value, notice = atp.resolve_rank(r, n_tokens)
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
    parts = [
        "<h1>ATP report</h1>",
        "<p>Attention on Top Principal keys (arXiv 2403.02352): how low-rank this model's attention inputs "
        "are on this text, and what ATP loses at each rank. Untuned model: the paper's accuracy figures "
        "were measured after fine-tuning.</p>",
        f"<table>\n{table}\n</table>",
        f"<p>Text ({len(text):,} characters):</p><pre>{html.escape(preview)}</pre>",
    ]
    if len(text) > TEXT_PREVIEW:
        parts.append(f"<details><summary>The whole text</summary><pre>{html.escape(text)}</pre></details>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


def make_report(
    loaded: LoadedModel,
    text: str,
    out_dir: str | Path,
    settings: ReportSettings = ReportSettings(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    progress: ProgressFn | None = None,
) -> Report:
    """Compute everything and write the report and its data files into ``out_dir`` (created)."""
    say = progress or (lambda msg: None)
    info = loaded.info
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder.")
    layer = info.n_layers // 2 if settings.map_layer is None else settings.map_layer
    if not 0 <= layer < info.n_layers:
        raise ValueError(f"Map layer {layer} does not exist: {info.label} has layers 0-{info.n_layers - 1}.")
    if not 0 <= settings.map_head < info.n_heads:
        raise ValueError(
            f"Map head {settings.map_head} does not exist: {info.label} has query heads 0-{info.n_heads - 1}."
        )
    if settings.form not in ("exact", "linear"):
        raise ValueError(f"form must be 'exact' or 'linear', got {settings.form!r}")
    report = Report(out_dir=out)

    say(f"capturing {info.label} on the text")
    tok = tokenize(loaded.tokenizer, text, info.max_tokens)
    cap = capture(loaded, text, attentions=(layer,))
    L = cap.n_tokens
    ranks = _resolve_ranks(settings.ranks, L) if settings.ranks else compare.sweep_ranks(L)
    map_r, notice = atp.resolve_rank(settings.map_rank, L)
    if notice:
        report.notes.append(notice)
    report.notes[:0] = list(cap.notes)

    say(f"spectra of {info.n_layers} layers (L = {L})")
    sps = spectra.layer_spectra([lc.x for lc in cap.layers])
    labels = [f"layer {i}" for i in range(info.n_layers)]
    # (file name, heading, caption, figure)
    sections: list[tuple[str, str, str, go.Figure]] = [
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

    say(f"dense run and rank sweep over {len(ranks)} ranks x 2 forms")
    dense = compare.forward(loaded, tok)
    sweep = compare.error_sweep(
        loaded,
        tok,
        dense,
        ATPConfig(),
        ranks,
        progress=lambda f, msg: say(f"  sweep {msg}"),
    )
    sections.append(
        (
            "rank_sweep",
            "Error vs rank, both forms",
            "Exact form: the error of dropping bases. Linear form (the paper's): the total error; the "
            "dotted line is what linearising softmax adds.",
            plots.sweep_figure(
                sweep.ranks, sweep.exact, sweep.linear, metric=sweep.metric, n_tokens=L, current=map_r
            ),
        )
    )

    head = settings.map_head
    say(f"attention maps, layer {layer}, head {head}, r = {map_r}, {settings.form} form")
    run = compare.forward(loaded, tok, ATPConfig(rank=map_r, form=settings.form), map_layers=[layer])
    maps = compare.attention_maps(cap.layers[layer].attn, run, layer, head)
    where = f"layer {layer}, head {head}, r = {map_r} of L = {L}, {settings.form} form"
    for name, m, title, x_title, diverging in (
        ("dense", maps.dense, "Dense attention (L x L)", "key token", False),
        (
            "principal",
            maps.principal,
            f"ATP weights on {map_r} principal keys (L x r)",
            "principal key",
            False,
        ),
        ("lifted", maps.lifted, "ATP lifted back to tokens (L x L)", "key token", False),
        ("difference", maps.difference, "ATP lifted minus dense", "key token", True),
    ):
        small, block = compare.downsample(m, MAP_SIZE)
        fig = plots.heatmap_figure(small, title=title, x_title=x_title, diverging=diverging, block=block)
        sections.append((f"map_{name}", f"Attention map: {name}", where, fig))

    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        report.files.append(path)
        say(f"wrote {path} ({len(data) / 1e6:.2f} MB)")

    write("spectra.npz", export.spectra_npz(sps, labels))
    rows = export.sweep_rows(sweep)
    write("sweep.csv", export.table_csv(rows))
    write("sweep.json", export.table_json(rows))
    if settings.write_capture:
        write("capture.npz", export.capture_npz(cap))

    png_note = None
    if not settings.write_png:
        png_note = "PNG files were not asked for (--no-png)."
    elif problem := export.static_export_problem():
        png_note = f"No PNG files: {problem}"
    else:
        try:
            for name, _, _, fig in sections:
                write(f"figures/{name}.png", export.figure_png(fig))
        except export.ExportError as err:
            png_note = f"PNG files stopped: {err}"
    if png_note:
        report.notes.append(png_note)
        say(png_note)

    facts = {
        "sweep ranks": ", ".join(map(str, ranks)) + " (both forms)",
        "sweep metric": sweep.metric,
        "attention maps": where,
        "basis": "top-r left singular vectors of each layer's X (exact SVD), ATP on every layer",
        "files": ", ".join(str(p.relative_to(out)) for p in report.files),
    }
    page = _page(f"ATP report: {info.label}", _header(loaded, cap, settings, facts, report.notes), sections)
    write("report.html", page.encode("utf-8"))
    return report


def cmd_report(args: argparse.Namespace) -> int:
    from atp_viz.cli import _read_text
    from atp_viz.models import load_model

    def say(msg: str) -> None:
        print(f"report: {msg}", file=sys.stderr, flush=True)

    text = _read_text(args.text_file)
    say(f"loading {args.model}")
    loaded = load_model(args.model)
    settings = ReportSettings(
        ranks=tuple(args.ranks) if args.ranks else None,
        form=args.form,
        map_rank=args.map_rank,
        map_layer=args.map_layer,
        map_head=args.map_head,
        write_capture=args.capture,
        write_png=not args.no_png,
        text_label=args.text_file,
    )
    report = make_report(loaded, text, args.out, settings, progress=say)
    say(f"done: {report.out_dir / 'report.html'}")
    return 0


def _ranks(text: str) -> list[int | float]:
    from atp_viz.cli import parse_rank

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("--ranks needs at least one rank, e.g. 4,16,64 or 0.25,0.5")
    return [parse_rank(t) for t in items]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an argparse subparsers object; returns its parser."""
    from atp_viz.cli import parse_rank

    r = subparsers.add_parser(
        "report",
        help="write an offline HTML report (spectra, rank sweep, attention maps) and its data files",
        description="Write DIR/report.html (self-contained, offline) with the spectra, the error-vs-rank "
        "sweep of both forms and dense vs ATP attention maps, plus spectra.npz, sweep.csv, sweep.json, "
        "optionally capture.npz, and PNG files of each figure when Chromium is available.",
    )
    r.add_argument("--model", default="minilm", help="minilm | smollm2 | tiny-* | folder | hub id")
    r.add_argument("--text-file", required=True)
    r.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created)")
    r.add_argument(
        "--ranks",
        type=_ranks,
        help="sweep ranks, comma-separated ints or fractions of L (default: 1 ... L, denser at the low end)",
    )
    r.add_argument("--form", choices=["exact", "linear"], default="exact", help="form of the attention maps")
    r.add_argument("--map-rank", type=parse_rank, default=0.5, help="rank of the maps: int or fraction of L")
    r.add_argument("--map-layer", type=int, help="layer of the maps (default: the middle one)")
    r.add_argument("--map-head", type=int, default=0, help="query head of the maps")
    r.add_argument(
        "--capture", action="store_true", help="also write capture.npz (every layer's activations)"
    )
    r.add_argument("--no-png", action="store_true", help="skip the PNG files")
    r.set_defaults(func=cmd_report)
    return r
