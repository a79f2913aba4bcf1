"""``atp-viz perplexity``: strictly causal perplexity with a compressed past, over a rank grid."""

from __future__ import annotations

import argparse
import sys

from atp_viz.cli.common import MODEL_HELP, add_form, read_text_file, write_json


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def register(sub) -> None:
    pp = sub.add_parser("perplexity", help="strictly causal perplexity, compressed past, rank grid")
    pp.add_argument("--model", default="smollm2", help=MODEL_HELP)
    pp.add_argument("--text-file", help="default: Python standard-library docstrings (real text)")
    pp.add_argument("--tokens", type=int, default=2048, help="tokens of text to evaluate")
    pp.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    pp.add_argument("--ranks", type=_ints, default=[16, 32, 64, 128], help="principal keys for the past")
    add_form(pp, many=True)
    pp.add_argument("--json")
    pp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis import serving
    from atp_viz.hf.models import load_model
    from atp_viz.text import corpus
    from atp_viz.text.inputs import tokenize

    loaded = load_model(args.model)
    if args.text_file:
        text, source = read_text_file(args.text_file), args.text_file
    else:
        text, mods = corpus.perplexity_text()
        source = "Python standard-library docstrings (inspect.getdoc) of: " + ", ".join(mods)
    tok = tokenize(loaded.tokenizer, text, min(args.tokens, loaded.info.max_tokens))
    ids = tok.input_ids.to(loaded.device)
    print(f"{tok.n_tokens} tokens from {source}; chunks of {args.chunk}", file=sys.stderr)

    def show(label: str, res) -> None:
        print(
            f"{label:>22}: perplexity {res.perplexity:8.3f}  top-1 {res.top1:.3f}  ({res.seconds:.1f} s)",
            file=sys.stderr,
        )

    dense = serving.perplexity(loaded, ids, rank=None, chunk=args.chunk)
    show("dense", dense)
    results = []
    for form in args.forms:
        for r in args.ranks:
            res = serving.perplexity(loaded, ids, rank=r, form=form, chunk=args.chunk)
            show(f"{form} r={r}", res)
            results.append(res)
    write_json(
        {
            "model": args.model,
            "text_source": source,
            "n_tokens": tok.n_tokens,
            "chunk": args.chunk,
            "mode": "strictly causal: each chunk attends to the past chunks compressed to r principal "
            "keys/values (basis from past tokens only) and to itself exactly",
            "rows": serving.as_table(results, dense),
        },
        args.json,
    )
    return 0
