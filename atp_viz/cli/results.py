"""``atp-viz results``: the README's figures from their files (``--check``, ``--write``) and the
measurements behind them (``--measure NAME``, ``--list``)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    r = sub.add_parser(
        "results",
        help="check (or rewrite) the README's result tables against docs/results/, or rerun a measurement",
        description="Every table of figures in README.md sits between <!-- results:NAME --> markers and is "
        "rendered from files (docs/results/*.json, docs/bench-reference.json). --check (the default) fails "
        "when the README differs; --write rewrites the tables; --measure NAME reruns a measurement.",
    )
    group = r.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail (exit 1) when the README differs (default)")
    group.add_argument("--write", action="store_true", help="rewrite the README's tables from the files")
    group.add_argument(
        "--measure",
        nargs="+",
        metavar="NAME",
        help="rerun these measurements (progress on stderr), then rewrite",
    )
    group.add_argument("--list", action="store_true", help="list the tables, their files and commands")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.outputs import results

    if args.list:
        for res in results.RESULTS:
            print(f"{res.name}: {', '.join(res.files)}; `{res.command}` (about {res.minutes:g} min)")
        return 0
    if args.measure:
        from atp_viz.core.progress import stderr_progress

        for name in args.measure:
            print(f"measuring {name}...", file=sys.stderr, flush=True)
            print(f"wrote {results.measure(name, stderr_progress())}", file=sys.stderr)
        results.write()
        return 0
    if args.write:
        results.write()
        print(f"rewrote the tables of {results.README}", file=sys.stderr)
        return 0
    problems = results.check()
    for p in problems:
        print(f"results: {p}", file=sys.stderr)
    if not problems:
        print(f"results: the README's {len(results.RESULTS)} tables match their files", file=sys.stderr)
    return 1 if problems else 0
