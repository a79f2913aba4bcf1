"""What every command shares: argument types, reading a text file, writing JSON, progress lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from atp_viz import forms
from atp_viz.core import basis, ranks
from atp_viz.text.inputs import read_text_file

MODEL_HELP = "minilm | smollm2 | tiny-* | tuned:DIR | folder | hub id"

__all__ = ["MODEL_HELP", "add_form", "add_basis_method", "rank_arg", "read_text_file", "write_json"]


def arg_type(parse):
    """An argparse type from one of the project's parsers (their ValueError becomes a usage error)."""

    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


rank_arg = arg_type(ranks.parse_rank)
rank_list_arg = arg_type(ranks.parse_rank_list)


def add_form(parser: argparse.ArgumentParser, *, default: str = forms.DEFAULT, many: bool = False) -> None:
    """``--form`` (or ``--forms a,b``) with the registered attention forms as choices."""
    if many:
        parser.add_argument(
            "--forms",
            type=arg_type(_form_list),
            default=list(forms.names()),
            help=f"comma-separated forms (default: all registered: {','.join(forms.names())})",
        )
    else:
        parser.add_argument("--form", choices=forms.names(), default=default, help="attention form")


def _form_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        forms.get(n)  # ValueError naming the registered forms
    if not names:
        raise ValueError("Give at least one form.")
    return names


def add_basis_method(parser: argparse.ArgumentParser, default: str = "exact") -> None:
    parser.add_argument("--basis-method", choices=basis.METHODS, default=default, help="how U_r is computed")


def add_centre_basis(parser: argparse.ArgumentParser, *, tuned_default: bool = False) -> None:
    """``--centre-basis``: U_r's first column is the mean token, the rest the centred input's principal
    directions (:func:`atp_viz.core.basis.principal_basis`). ``tuned_default``: ``--no-centre-basis`` too,
    and None when neither is given, for the command to fill in a tuned model's own."""
    help_ = (
        "U_r's first column is the mean token, the rest the principal directions of the centred input (same "
        "rank and cost; README: 'A centred basis')"
    )
    if tuned_default:
        parser.add_argument(
            "--centre-basis", action=argparse.BooleanOptionalAction, default=None,
            help=help_ + "; default: a tuned model's own, else off",
        )  # fmt: skip
    else:
        parser.add_argument("--centre-basis", action="store_true", help=help_)


def add_exact_window(parser, *, drop_middle: bool = False, tuned_default: bool = False) -> None:
    """``--window`` and ``--sinks`` (and ``--drop-middle``): past tokens read exactly, only the rest of the
    past compressed (:class:`atp_viz.analysis.serving.ExactKeep`); read back with :func:`exact_keep`.
    ``tuned_default``: both default to None, for the command to fill in a tuned model's own."""
    default = "how a tuned model was tuned, else 0" if tuned_default else "0"
    parser.add_argument(
        "--window", type=int, default=None if tuned_default else 0,
        help="read the last N past tokens before each chunk exactly (their own keys, under the form's "
        "weighting of exact keys: a softmax for exact and pksoftmax) and compress only the rest of the past "
        f"(the middle); default {default} (0: compress all of it)",
    )  # fmt: skip
    parser.add_argument(
        "--sinks", type=int, default=None if tuned_default else 0,
        help=f"with --window: also read the first N tokens exactly (default {default})",
    )  # fmt: skip
    if drop_middle:
        parser.add_argument(
            "--drop-middle", action="store_true",
            help="with --window: leave the middle out (the window alone, one softmax; --form is ignored)",
        )  # fmt: skip


def exact_keep(args: argparse.Namespace):
    """The :class:`~atp_viz.analysis.serving.ExactKeep` the arguments ask for (None without ``--window``)."""
    from atp_viz.analysis.serving import ExactKeep

    drop = getattr(args, "drop_middle", False)
    if args.window < 0 or args.sinks < 0:
        raise ValueError(f"--window and --sinks are token counts >= 0, got {args.window} and {args.sinks}")
    if (args.sinks or drop) and not args.window:
        raise ValueError("--sinks and --drop-middle need a --window")
    return ExactKeep(args.sinks, args.window, drop_rest=drop) if args.window else None


def check_context(loaded, n_tokens: int) -> None:
    """ValueError with a sentence when windows of ``n_tokens`` are longer than the model reads."""
    if loaded.info.max_tokens < n_tokens:
        raise ValueError(
            f"{loaded.info.label} reads at most {loaded.info.max_tokens} tokens; --seq-len {n_tokens} is "
            "longer."
        )


def check_output(path: str, *, folder: bool = False) -> None:
    """ValueError with a sentence when ``path`` cannot be written (a file where a folder is needed, or the
    other way round; no write access): asked before a command computes anything, so no result is lost
    at the end."""
    target = Path(path).expanduser()
    if target.exists() and target.is_dir() != folder:
        raise ValueError(
            f"{path} is a {'file' if folder else 'folder'}: give a {'folder' if folder else 'file'}."
        )
    parent = target if folder and target.exists() else target.parent
    while not parent.exists():  # the folders that will be created
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path} cannot be written: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{path} cannot be written: no write access to {parent}.")


def write_json(obj, out: str | None) -> None:
    """``obj`` as indented JSON to the file ``out`` (folders created), or to stdout."""
    text = json.dumps(obj, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
