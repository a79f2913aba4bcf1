"""``atp-viz bench`` (``make bench``): time and measure ATP against dense attention."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from atp_viz.analysis.bench import layer, model, prefill, timing
from atp_viz.cli.common import add_exact_window, arg_type, exact_keep


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse subparsers object; returns its parser."""
    b = subparsers.add_parser(
        "bench",
        help="benchmark ATP vs dense attention (one layer, and a whole-model prefill)",
        description=(
            "Time and measure one attention layer with SmolLM2's geometry (dense SDPA, dense eager, ATP "
            "linear form with its basis) at several lengths, and a SmolLM2 prefill dense vs ATP."
        ),
    )
    b.add_argument("--json", metavar="OUT", help="write every figure here as JSON")
    b.add_argument(
        "--lengths",
        type=arg_type(timing.parse_lengths),
        help=f"comma-separated L (default {','.join(map(str, layer.DEFAULT_LENGTHS))})",
    )
    b.add_argument(
        "--ranks",
        type=arg_type(timing.parse_ranks),
        help=f"comma-separated ranks, ints or 'L/k' (default {layer.DEFAULT_RANKS})",
    )
    b.add_argument(
        "--repeats", type=int, help=f"timed runs per path at least (default {layer.DEFAULT_REPEATS})"
    )
    target = f"{timing.TARGET_CI:.0%}".replace("%", "%%")  # argparse formats help with %
    b.add_argument(
        "--max-repeats",
        type=int,
        help=f"more runs of a path until its median's 95%% interval is within +-{target}, up to this many "
        f"(default {timing.MAX_REPEATS}; --tiny: no more than --repeats)",
    )
    b.add_argument("--warmup", type=int, help=f"untimed runs per path first (default {layer.DEFAULT_WARMUP})")
    b.add_argument("--no-model", action="store_true", help="skip the whole-model part")
    b.add_argument(
        "--tiny",
        action="store_true",
        help=f"tiny sizes for tests: lengths {','.join(map(str, layer.TINY_LENGTHS))}, "
        f"ranks {layer.TINY_RANKS}, {layer.TINY_REPEATS} repeats, model {model.TINY_MODEL_KEY}",
    )
    b.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: leave as is)")
    b.add_argument(
        "--eager-limit-gb",
        type=float,
        default=layer.EAGER_LIMIT_GB,
        help="skip dense eager where its H x L x L float32 probabilities would exceed this many GB "
        f"(default {layer.EAGER_LIMIT_GB:g})",
    )
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    b.add_argument("--model-length", type=int, help=f"model prefill tokens (default {model.MODEL_LENGTH})")
    b.add_argument("--model-rank", type=int, help=f"ATP rank for the model (default {model.MODEL_RANK})")
    b.add_argument(
        "--model-repeats",
        type=int,
        help=f"timed model forwards per configuration (default {model.MODEL_REPEATS})",
    )
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _prefill_arguments(b)
    b.set_defaults(func=run)
    return b


def _prefill_arguments(b: argparse.ArgumentParser) -> None:
    """The ``--prefill`` group's options."""
    p = b.add_argument_group(
        "prefill (--prefill)",
        "dense SDPA prefill against ATP prefill (strictly causal chunks, past compressed to --rank principal "
        "keys, basis timed), timed and scored on the same positions in one run",
    )
    p.add_argument("--prefill", action="store_true", help="run the prefill benchmark instead")
    p.add_argument("--model", help="a decoder: smollm2 (default), tuned:DIR, a local path")
    p.add_argument(
        "--tokens", type=arg_type(timing.parse_lengths), help="comma-separated L (default 2048,4096,8192)"
    )
    p.add_argument("--form", help="attention form (default exact)")
    p.add_argument("--rank", type=int, help="principal keys of the past (default 128)")
    p.add_argument("--chunk", type=int, help=f"chunk size (default {prefill.DEFAULT_CHUNK})")
    p.add_argument("--basis-from", choices=("input", "keys"), help="basis source (default input)")
    p.add_argument("--basis-method", help="exact, randomized (default) or sketch")
    p.add_argument(
        "--basis-update", choices=("recompute", "moments"),
        help="recompute: an SVD of the whole past per chunk (every form); moments: running sums of the "
        "past, cost independent of its length (linear, pksoftmax)",
    )  # fmt: skip
    add_exact_window(p, drop_middle=True, tuned_default=True)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The layer bench's settings from the arguments (``--tiny`` changes the defaults), checked."""
    tiny = args.tiny
    repeats = (
        args.repeats if args.repeats is not None else (layer.TINY_REPEATS if tiny else layer.DEFAULT_REPEATS)
    )
    warmup = args.warmup if args.warmup is not None else layer.DEFAULT_WARMUP
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be at least 1 and --warmup at least 0")
    max_repeats = args.max_repeats if args.max_repeats is not None else (None if tiny else timing.MAX_REPEATS)
    return {
        "lengths": args.lengths or (layer.TINY_LENGTHS if tiny else layer.DEFAULT_LENGTHS),
        "ranks": args.ranks or timing.parse_ranks(layer.TINY_RANKS if tiny else layer.DEFAULT_RANKS),
        "repeats": repeats,
        "max_repeats": max_repeats,
        "warmup": warmup,
    }


def _model_part(args: argparse.Namespace, o: dict[str, Any], progress) -> dict[str, Any]:
    if args.no_model:
        return {"skipped": "skipped: --no-model"}
    tiny = args.tiny
    return model.run_model_bench(
        model.TINY_MODEL_KEY if tiny else model.MODEL_KEY,
        args.model_length or (model.TINY_MODEL_LENGTH if tiny else model.MODEL_LENGTH),
        args.model_rank or (model.TINY_MODEL_RANK if tiny else model.MODEL_RANK),
        repeats=args.model_repeats
        or (model.TINY_MODEL_REPEATS if tiny else min(o["repeats"], model.MODEL_REPEATS)),
        warmup=o["warmup"],
        device=args.device,
        progress=progress,
    )


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, allow_nan=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


PREFILL_DEFAULTS = {
    "model": "smollm2", "form": "exact", "rank": 128, "chunk": prefill.DEFAULT_CHUNK, "basis_from": "input",
    "basis_method": "randomized", "basis_update": "recompute",
}  # fmt: skip
LAYER_ONLY = ("lengths", "ranks", "tiny", "no_model", "model_length", "model_rank", "model_repeats", "warmup")


def _check_mode(args: argparse.Namespace) -> None:
    """Options of the other benchmark are refused, not silently ignored; counts must be at least 1."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.prefill:
        given = [flag(n) for n in LAYER_ONLY if getattr(args, n) not in (None, False)]
        if given:
            raise ValueError(
                f"{', '.join(given)} {'belongs' if len(given) == 1 else 'belong'} to the layer bench, not "
                "--prefill (there: --tokens, --rank)."
            )
    else:
        names = [*PREFILL_DEFAULTS, "tokens", "window", "sinks", "drop_middle"]
        given = [flag(n) for n in names if getattr(args, n) not in (None, False, 0)]
        if given:
            raise ValueError(f"{', '.join(given)} {'belongs' if len(given) == 1 else 'belong'} to --prefill.")
    for name in ("repeats", "max_repeats", "model_length", "model_rank", "model_repeats", "rank", "chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {getattr(args, name)}.")


def _say(args: argparse.Namespace):
    if getattr(args, "quiet", False):
        return None
    return lambda fraction, msg: print(msg, file=sys.stderr, flush=True)


def run_prefill(args: argparse.Namespace) -> int:
    """``bench --prefill``: one JSON object per length (the object itself when there is one length)."""
    import torch

    from atp_viz.hf.models import load_model
    from atp_viz.hf.tuned import as_tuned, base_model_of

    if args.model is not None:  # a tuned model is read as it was tuned, unless told otherwise
        trained = as_tuned(args.model)
        # a run tuned at a share of L gives its form and basis; one tuned at a number of keys its past too
        names = ["form", "basis_from", "basis_update"]
        names += ["rank", "chunk", "window"] if isinstance(trained["rank"], int) else []
        for name in names:
            setattr(args, name, trained[name] if getattr(args, name) is None else getattr(args, name))
        if args.sinks is None and args.window and trained["window"]:
            args.sinks = trained["sinks"]
        if trained["centre_basis"]:
            print(
                "note: this model was tuned with a centred basis; the prefill benchmark does not centre its "
                "basis, so it times and scores this model with the plain one.",
                file=sys.stderr,
            )
    for name, default in {**PREFILL_DEFAULTS, "window": 0, "sinks": 0}.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    keep = exact_keep(args)
    lengths = args.tokens or (2048, 4096, 8192)
    repeats = args.repeats or prefill.DEFAULT_REPEATS
    max_repeats = max(repeats, args.max_repeats or prefill.DEFAULT_MAX_REPEATS)
    device = None if args.device == "cpu" else args.device
    loaded = load_model(args.model, device=device)
    base = base_model_of(args.model)  # a tuned run is also scored against its untouched model
    original = load_model(base, device=device) if base else None
    runs = []
    for L in lengths:
        run = prefill.run_prefill(
            loaded, L, form=args.form, rank=args.rank, chunk=args.chunk, basis_from=args.basis_from,
            method=args.basis_method, basis_update=args.basis_update, repeats=repeats,
            max_repeats=max_repeats, keep=keep, original=original, progress=_say(args),
        )  # fmt: skip
        run["machine"] = timing.machine_info(args.device)
        run["threads"] = torch.get_num_threads()
        run["argv"] = getattr(args, "argv", list(sys.argv))
        runs.append(prefill.nan_to_none(run))
    print(prefill.report(runs))
    out = runs[0] if len(runs) == 1 else {"runs": runs, "crossover_tokens": prefill.crossover(runs)}
    _write(args, {"schema": "atp_viz.bench.prefill/1", "argv": getattr(args, "argv", None), **out})
    return 0


def run(args: argparse.Namespace) -> int:
    """Handler of ``atp-viz bench``: run, print the table, write the JSON."""
    import torch

    from atp_viz.analysis.bench.report import format_report

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    _check_mode(args)
    if args.prefill:
        return run_prefill(args)
    o = _options(args)
    t0 = time.perf_counter()
    settings = {
        **o, "lengths": list(o["lengths"]), "ranks": list(o["ranks"]), "tiny": args.tiny,
        "threads": torch.get_num_threads(), "threads_option": args.threads,
        "eager_limit_gb": args.eager_limit_gb,
        "device": args.device, "model": not args.no_model,
    }  # fmt: skip
    result: dict[str, Any] = {
        "schema": "atp_viz.bench/1",
        "argv": getattr(args, "argv", list(sys.argv)),
        "settings": settings,
        "machine": timing.machine_info(args.device),
    }

    say = _say(args)
    result["layer"] = layer.run_layer_bench(
        o["lengths"], o["ranks"], repeats=o["repeats"], max_repeats=o["max_repeats"], warmup=o["warmup"],
        eager_limit_gb=args.eager_limit_gb, device=args.device, progress=say,
    )  # fmt: skip
    result["model"] = _model_part(args, o, say)
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - t0
    print(format_report(result))
    _write(args, result)
    return 0
