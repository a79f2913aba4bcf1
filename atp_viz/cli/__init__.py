"""Command line: ``python -m atp_viz <command>`` (also installed as ``atp-viz``).

One module per command, each with ``register(subparsers)`` and ``run(args)``; what they share is in
:mod:`atp_viz.cli.common`. Heavy imports happen inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from atp_viz.cli import bench, compare, finetune, generate, perplexity, report, results, spectra
from atp_viz.cli.common import check_output
from atp_viz.hf.model_info import ModelLoadError
from atp_viz.text.inputs import TextError

COMMANDS = (spectra, compare, perplexity, generate, bench, finetune, report, results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atp-viz", description="ATP Explorer command line.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():  # -v also after the command; SUPPRESS keeps one given before
        command_parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["python", "-m", "atp_viz", *(sys.argv[1:] if argv is None else argv)]  # for the records
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        for name in ("json", "json_copy"):
            if getattr(args, name, None):
                check_output(getattr(args, name))
        if getattr(args, "out", None):
            check_output(args.out, folder=True)
        return args.func(args)
    except (ModelLoadError, TextError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
