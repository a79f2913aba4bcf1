"""``atp-viz perplexity``: strictly causal top-1 and perplexity with a compressed past, over a rank grid,
on the evaluation protocol's held-out windows (or a text file cut into windows), with 95% intervals."""

from __future__ import annotations

import argparse
import sys
import time

from atp_viz.cli.common import (
    MODEL_HELP,
    add_centre_basis,
    add_exact_window,
    add_form,
    check_context,
    exact_keep,
    rank_list_arg,
    read_text_file,
    write_json,
)
from atp_viz.core.ranks import RANK_MODES

DEFAULT_RANKS = (16, 32, 64, 128)


def register(sub) -> None:
    pp = sub.add_parser(
        "perplexity",
        help="strictly causal perplexity and top-1 with a compressed past, over ranks and forms",
        description="Each window is read in chunks; chunk c attends to the earlier chunks compressed to r "
        "principal keys/values (basis from past tokens only) and to itself exactly. Scored: the "
        "predictions from positions >= chunk (whose past is compressed), dense included. Intervals: 95%, "
        "bootstrap over windows; differences to dense are paired (same positions).",
    )
    pp.add_argument("--model", default="smollm2", help=MODEL_HELP)
    pp.add_argument("--text-file", help="a text cut into windows (default: the held-out docstring modules)")
    pp.add_argument(
        "--windows",
        type=int,
        default=24,
        help="windows, spread over the held-out stream or the text (0: all)",
    )
    pp.add_argument("--seq-len", type=int, help="tokens per window (default: a tuned model's own, else 512)")
    pp.add_argument("--chunk", type=int, help="tokens per chunk (default: a tuned model's own, else 128)")
    pp.add_argument(
        "--ranks", type=rank_list_arg,
        help=f"ints or shares of L (default: {','.join(map(str, DEFAULT_RANKS))}, and a tuned model's own "
        "rank)",
    )  # fmt: skip
    pp.add_argument(
        "--rank-mode", choices=RANK_MODES,
        help="what a share of L means (default: a tuned model's own, else past)",
    )  # fmt: skip
    pp.add_argument(
        "--basis-from", choices=("input", "keys"), default=None,
        help="basis source of the past: attention inputs X or the keys (default: a tuned model's own, "
        "else input)",
    )  # fmt: skip
    add_centre_basis(pp, tuned_default=True)
    add_exact_window(pp, tuned_default=True)
    pp.add_argument(
        "--basis-update", choices=("recompute", "moments"), default=None,
        help="the past's basis: an SVD per chunk, or running sums (moments; linear and pksoftmax, the other "
        "forms recompute). Default, with --window and --sinks: how a tuned model was tuned, else recompute",
    )  # fmt: skip
    pp.add_argument(
        "--layer-ranks", metavar="HOW",
        help="one rank per layer with mean each share in --ranks: 'spectrum' (the spectra's split of that "
        "budget, chosen on training texts) or shares (0.375,0.125,...; --ranks then their mean); 'one': the "
        "same rank in every layer. Default: a run tuned per layer reads its own budget with its shares",
    )  # fmt: skip
    add_form(pp, many=True)
    pp.add_argument("--json")
    pp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis import protocol
    from atp_viz.core.progress import stderr_progress
    from atp_viz.core.ranks import describe_window
    from atp_viz.hf.models import load_model
    from atp_viz.hf.tuned import as_tuned, base_model_of

    trained = as_tuned(args.model)  # a tuned model is read as it was tuned unless told otherwise
    not_as_tuned = _as_tuned(args, trained)
    basis_update, basis_from = args.basis_update, args.basis_from
    if args.centre_basis and basis_update == "moments":
        raise ValueError(
            "--centre-basis needs --basis-update recompute (running sums cannot centre their basis)"
        )
    keep = exact_keep(args)
    if keep is not None and args.rank_mode != "past":
        raise ValueError("--window counts ranks of the middle of the past: use --rank-mode past")
    if keep is not None and not keep.drop_rest and keep.covers(args.seq_len, args.chunk):
        print(
            f"note: the {describe_window(args.window, args.sinks)} covers the whole past of every chunk: "
            "nothing is compressed, every row equals dense. Use a longer --seq-len or a smaller --window.",
            file=sys.stderr,
        )
    loaded = load_model(args.model)
    check_context(loaded, args.seq_len)
    if args.text_file:
        windows = protocol.text_windows(
            loaded.tokenizer, read_text_file(args.text_file), args.seq_len, max_windows=args.windows or None
        )
        source = args.text_file
    else:
        windows = protocol.heldout_windows(loaded.tokenizer, args.seq_len, max_windows=args.windows or None)
        source = "held-out standard-library docstring modules (atp_viz.text.corpus.HELDOUT_MODULES)"
    print(
        f"{len(windows.ids)} windows of {args.seq_len} tokens from {source}; chunks of {args.chunk}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    settings = [(r, f) for f in args.forms for r in args.ranks]
    base = base_model_of(args.model)  # a tuned model is also compared with the model it was tuned from
    rows = protocol.perplexity_grid(
        loaded, windows, settings, chunk=args.chunk, rank_mode=args.rank_mode, basis_from=basis_from,
        centre_basis=args.centre_basis, keep=keep, basis_update=basis_update,
        layer_split=_layer_split(args, loaded, basis_from, trained), progress=stderr_progress(),
        original=load_model(base) if base else None,
    )  # fmt: skip
    for row in protocol.grid_table(rows):
        print("  ".join(f"{k}: {v}" for k, v in row.items()), file=sys.stderr)
    write_json(
        {
            "model": args.model,
            "original_model": base,
            "text_source": source,
            "n_windows": len(windows.ids),
            "seq_len": args.seq_len,
            "chunk": args.chunk,
            "rank_mode": args.rank_mode,
            "basis_from": basis_from,
            "centre_basis": args.centre_basis,
            "exact_sinks": args.sinks,
            "exact_window": args.window,
            "basis_update": basis_update,
            "layer_ranks": args.layer_ranks
            or ("as tuned, at its own rank" if trained["layer_ranks"] else None),
            **({"not_as_tuned": not_as_tuned} if not_as_tuned else {}),
            "scored": f"predictions from positions {args.chunk} .. {args.seq_len - 2} of each window "
            "(whose past is compressed), dense included",
            "intervals": "95%, bootstrap over windows (2000 resamples, seed 0), differences paired",
            "seconds": time.perf_counter() - t0,
            "argv": getattr(args, "argv", None),  # the command, for the records
            "rows": rows,
        },
        args.json,
    )
    return 0


def _as_tuned(args: argparse.Namespace, trained: dict) -> str:
    """Fill the settings left out with how a tuned model was tuned (else the usual defaults), and say
    which settings given differ from it (empty for an untuned model or a run read as tuned)."""
    if args.ranks is None:
        own = (
            [trained["rank"]] if trained["rank"] is not None and trained["rank"] not in DEFAULT_RANKS else []
        )
        args.ranks = [*DEFAULT_RANKS, *own]
    if args.sinks is None:  # the run's sinks, unless this run reads no window
        args.sinks = trained["sinks"] if args.window != 0 else 0
    fallback = {"seq_len": 512, "chunk": 128, "rank_mode": "past", "window": 0, "basis_update": "recompute",
                "basis_from": "input", "centre_basis": False}  # fmt: skip
    tuned = trained["rank"] is not None and trained["attention"] != "dense"  # a control tuned no ATP setting
    differs = []
    for name, default in fallback.items():
        given, own = getattr(args, name), trained.get(name)
        if given is None:
            setattr(args, name, default if own is None else own)
        elif tuned and own is not None and given != own:
            differs.append(f"--{name.replace('_', '-')} {given} (tuned: {own})")
    if tuned and args.sinks != trained["sinks"] and args.window:
        differs.append(f"--sinks {args.sinks} (tuned: {trained['sinks']})")
    if args.windows < 0 or args.seq_len < 4 or not 1 <= args.chunk < args.seq_len - 1:
        raise ValueError("--windows must be >= 0, --seq-len >= 4 and 1 <= --chunk < --seq-len - 1")
    note = f"this model is read otherwise than it was tuned: {', '.join(differs)}" if differs else ""
    if note:
        print(f"note: {note}", file=sys.stderr)
    return note


def _layer_split(args: argparse.Namespace, loaded, basis_from: str, trained: dict):
    """--layer-ranks as a function of the budget (a share of L) -> one share per layer, or None."""
    from atp_viz.analysis import allocation
    from atp_viz.core.progress import stderr_progress
    from atp_viz.core.ranks import format_layer_shares

    if args.layer_ranks is None:  # a run tuned per layer: its shares for its own budget, one rank elsewhere
        if not trained["layer_ranks"]:
            return None
        split = allocation.budget_splitter(
            format_layer_shares(trained["layer_ranks"]), loaded, budget=trained["rank"]
        )
        if all(split(r) is None for r in args.ranks if isinstance(r, float)):
            print(
                f"note: this model was tuned with per-layer ranks at r = {trained['rank']:g} L; add "
                f"{trained['rank']:g} to --ranks to read it that way (the ranks given keep one rank).",
                file=sys.stderr,
            )
        return split
    if args.layer_ranks.strip() == "one":
        return None
    if any(not isinstance(r, float) for r in args.ranks):
        raise ValueError(
            "--layer-ranks shares budgets given as shares of L: give --ranks as shares (e.g. --ranks "
            f"0.5,0.25); the ranks here, {','.join(map(str, args.ranks))}, include key counts (without "
            "--ranks, the default ranks do)."
        )
    how = args.layer_ranks.strip()
    if how == "measured":
        raise ValueError("Measured per-layer ranks are for encoders; a decoder takes 'spectrum' or shares.")
    budget = None  # typed shares serve one budget: their mean, or the rank of the run tuned with them
    if how != "spectrum":
        shares = allocation.given_shares(how, loaded)
        budget = allocation.typed_budget(shares, trained["layer_ranks"], trained["rank"])
    split = allocation.budget_splitter(
        how, loaded, basis_source=basis_from, centre_basis=args.centre_basis, budget=budget,
        progress=stderr_progress(),
    )  # fmt: skip
    if any(split(r) is None for r in args.ranks):
        raise ValueError(
            f"The per-layer shares serve r = {budget!r} L: give it as the one rank (--ranks {budget!r})."
        )
    return split
