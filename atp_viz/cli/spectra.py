"""``atp-viz spectra``: singular-value spectra of every layer's attention input."""

from __future__ import annotations

import argparse
import sys
import time

from atp_viz.cli.common import MODEL_HELP, read_text_file, write_json


def register(sub) -> None:
    s = sub.add_parser("spectra", help="singular-value spectra of every layer's attention input")
    s.add_argument("--model", default="minilm", help=MODEL_HELP)
    s.add_argument("--text-file", required=True)
    s.add_argument("--centered", action="store_true", help="PCA (subtract the mean token) instead of SVD")
    s.add_argument("--skip-first", action="store_true", help="leave out the first token")
    s.add_argument("--json", help="write the result here (default: stdout)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis import spectra
    from atp_viz.analysis.capture import capture
    from atp_viz.hf.models import load_model

    text = read_text_file(args.text_file)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    t_load = time.perf_counter() - t0
    cap = capture(loaded, text, attentions="none")
    if args.skip_first and spectra.skip_first_refusal(cap.n_tokens):
        raise ValueError(spectra.skip_first_refusal(cap.n_tokens))
    sps = spectra.layer_spectra(
        [layer.x for layer in cap.layers], centered=args.centered, skip_first=args.skip_first
    )
    rows = []
    kept = f" ({sps[0].n_rows} analysed: the first left out)" if args.skip_first else ""
    print(f"{cap.info.label}: L = {cap.n_tokens} tokens{kept}, d = {cap.info.d_model}", file=sys.stderr)
    for note in cap.notes:
        print(f"note: {note}", file=sys.stderr)
    header = "layer  erank  " + "  ".join(f"r@{t:.0%}" for t in spectra.THRESHOLDS)
    print(header, file=sys.stderr)
    for i, sp in enumerate(sps):
        ranks = [sp.rank_for(t) for t in spectra.THRESHOLDS]
        print(f"{i:5d}  {sp.effective_rank:5.1f}  " + "  ".join(f"{r:5d}" for r in ranks), file=sys.stderr)
        rows.append(
            {
                "layer": i,
                "effective_rank": sp.effective_rank,
                "rank_for": {f"{t}": r for t, r in zip(spectra.THRESHOLDS, ranks, strict=True)},
                "singular_values": sp.singular_values.tolist(),
            }
        )
    write_json(
        {
            "model": args.model,
            "n_tokens": cap.n_tokens,
            "n_tokens_before_truncation": cap.n_original,
            "n_tokens_analysed": sps[0].n_rows,
            "centered": args.centered,
            "skip_first": args.skip_first,
            "load_seconds": t_load,
            "notes": list(cap.notes),
            "layers": rows,
        },
        args.json,
    )
    return 0
