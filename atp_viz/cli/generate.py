"""``atp-viz generate``: greedy generation, dense KV cache vs an ATP-compressed prompt cache."""

from __future__ import annotations

import argparse
import sys

from atp_viz.cli.common import MODEL_HELP, add_centre_basis, add_form, rank_arg, read_text_file, write_json


def register(sub) -> None:
    g = sub.add_parser("generate", help="greedy generation: dense KV cache vs ATP-compressed prompt cache")
    g.add_argument("--model", default="smollm2", help=MODEL_HELP)
    g.add_argument("--prompt-file", required=True)
    g.add_argument(
        "--rank", type=rank_arg, help="int (principal keys) or share of the prompt (default: a tuned model's "
        "own, else 0.5)",
    )  # fmt: skip
    add_form(g, default=None)
    g.add_argument("--basis-from", choices=("input", "keys"), help="default: a tuned model's own, else input")
    add_centre_basis(g, tuned_default=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--json")
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis import serving
    from atp_viz.core.ranks import describe_window, format_layer_shares, resolve_rank
    from atp_viz.hf.models import load_model
    from atp_viz.hf.tuned import as_tuned
    from atp_viz.text.inputs import tokenize

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    trained = as_tuned(args.model)  # a tuned model generates as it was tuned unless told otherwise
    args.form = args.form or trained["form"]
    args.rank = (0.5 if trained["rank"] is None else trained["rank"]) if args.rank is None else args.rank
    args.basis_from = args.basis_from or trained["basis_from"]
    args.centre_basis = trained["centre_basis"] if args.centre_basis is None else args.centre_basis
    if trained["window"]:
        print(
            f"note: this model was tuned behind an {describe_window(trained['window'], trained['sinks'])}; "
            "generation compresses the whole prompt without one (perplexity and bench --prefill read it as "
            "tuned).",
            file=sys.stderr,
        )
    if trained["layer_ranks"]:  # generation has one rank for every layer (serving.generate)
        shares = format_layer_shares(trained["layer_ranks"])
        print(
            f"note: this model was tuned with its own rank per layer ({shares} of L); generation runs one "
            f"rank, r = {args.rank:g}, in every layer (perplexity reads it as tuned).",
            file=sys.stderr,
        )
    loaded = load_model(args.model)
    tok = tokenize(loaded.tokenizer, read_text_file(args.prompt_file), loaded.info.max_tokens, min_tokens=1)
    ids = tok.input_ids.to(loaded.device)
    r, notice = resolve_rank(args.rank, tok.n_tokens)
    for note in (tok.notice, notice):
        if note:
            print(f"note: {note}", file=sys.stderr)
    dense = serving.generate(loaded, ids, rank=None, max_new_tokens=args.max_new_tokens)
    comp = serving.generate(
        loaded,
        ids,
        rank=r,
        form=args.form,
        max_new_tokens=args.max_new_tokens,
        basis_from=args.basis_from,
        centre_basis=args.centre_basis,
    )
    for name, g in (("dense", dense), ("ATP", comp)):
        if g.context_notice:
            print(f"note ({name}): {g.context_notice}", file=sys.stderr)
    share, first = serving.agreement(dense.new_ids, comp.new_ids)
    dec = loaded.tokenizer.decode
    result = {
        "model": args.model,
        "prompt_tokens": tok.n_tokens,
        "rank": r,
        "form": args.form,
        "basis_from": args.basis_from,
        "centre_basis": args.centre_basis,
        "truncation_notice": tok.notice,
        "dense_text": dec(list(dense.new_ids)),
        "atp_text": dec(list(comp.new_ids)),
        "stop_reason_dense": dense.stop_reason,
        "stop_reason_atp": comp.stop_reason,
        "first_divergence": first,
        "token_agreement": share,
        "kv_cache_bytes_dense": dense.kv_cache_bytes,
        "kv_cache_bytes_atp": comp.kv_cache_bytes,
        "kv_cache_ratio": comp.kv_cache_bytes / dense.kv_cache_bytes,
        "seconds_dense": dense.seconds,
        "seconds_atp": comp.seconds,
    }
    print(
        f"r = {r} of {tok.n_tokens}: agreement {share:.2f}, first divergence {first}, "
        f"KV cache {comp.kv_cache_bytes / 1e6:.2f} MB vs {dense.kv_cache_bytes / 1e6:.2f} MB dense",
        file=sys.stderr,
    )
    write_json(result, args.json)
    return 0
