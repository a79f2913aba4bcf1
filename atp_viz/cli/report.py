"""``atp-viz report``: an offline HTML report (spectra, rank sweep, attention maps) and its data files."""

from __future__ import annotations

import argparse
import sys

from atp_viz.cli.common import MODEL_HELP, add_form, rank_arg, rank_list_arg, read_text_file


def register(sub) -> None:
    r = sub.add_parser(
        "report",
        help="write an offline HTML report (spectra, rank sweep, attention maps) and its data files",
        description="Write DIR/report.html (self-contained, offline) with the spectra, the error-vs-rank "
        "sweep of every form and dense vs ATP attention maps, plus spectra.npz, sweep.csv, sweep.json, "
        "optionally capture.npz, and PNG files of each figure when Chromium is available.",
    )
    r.add_argument("--model", default="minilm", help=MODEL_HELP)
    r.add_argument("--text-file", required=True)
    r.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created)")
    r.add_argument(
        "--ranks",
        type=rank_list_arg,
        help="sweep ranks, comma-separated ints or fractions of L (default: 1 ... L, denser at the low end)",
    )
    add_form(r)
    r.add_argument("--map-rank", type=rank_arg, default=0.5, help="rank of the maps: int or fraction of L")
    r.add_argument("--map-layer", type=int, help="layer of the maps (default: the middle one)")
    r.add_argument("--map-head", type=int, default=0, help="query head of the maps")
    r.add_argument(
        "--capture", action="store_true", help="also write capture.npz (every layer's activations)"
    )
    r.add_argument("--no-png", action="store_true", help="skip the PNG files")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.hf.models import load_model
    from atp_viz.outputs.report import ReportSettings, make_report

    def say(fraction: float, msg: str) -> None:
        print(f"report: {msg}", file=sys.stderr, flush=True)

    text = read_text_file(args.text_file)
    say(0.0, f"loading {args.model}")
    loaded = load_model(args.model)
    if args.model.startswith("tuned:"):
        say(0.0, "note: a tuned model is read here with the paper's basis and one rank in every layer, "
            "not as it was tuned; `python -m atp_viz compare` reads it as it was tuned")  # fmt: skip
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
    say(1.0, f"done: {report.out_dir / 'report.html'}")
    return 0
