"""``atp-viz bench`` (``make bench``): time and measure ATP against dense attention."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from atp_viz.analysis.bench import layer, model, timing
from atp_viz.cli.common import arg_type


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
    b.add_argument("--repeats", type=int, help=f"timed runs per path (default {layer.DEFAULT_REPEATS})")
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
    b.set_defaults(func=run)
    return b


def run(args: argparse.Namespace) -> int:
    """Handler of ``atp-viz bench``: run, print the table, write the JSON."""
    import torch

    from atp_viz.analysis.bench import layer, model, timing
    from atp_viz.analysis.bench.report import format_report

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    lengths = args.lengths or (layer.TINY_LENGTHS if tiny else layer.DEFAULT_LENGTHS)
    ranks = args.ranks or timing.parse_ranks(layer.TINY_RANKS if tiny else layer.DEFAULT_RANKS)
    repeats = (
        args.repeats if args.repeats is not None else (layer.TINY_REPEATS if tiny else layer.DEFAULT_REPEATS)
    )
    warmup = args.warmup if args.warmup is not None else layer.DEFAULT_WARMUP
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be at least 1 and --warmup at least 0")
    device = args.device
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "schema": "atp_viz.bench/1",
        "argv": list(sys.argv),
        "settings": {
            "lengths": list(lengths),
            "ranks": list(ranks),
            "repeats": repeats,
            "warmup": warmup,
            "tiny": tiny,
            "threads": torch.get_num_threads(),
            "threads_option": args.threads,
            "eager_limit_gb": args.eager_limit_gb,
            "device": device,
            "model": not args.no_model,
        },
        "machine": timing.machine_info(device),
    }
    verbose = not getattr(args, "quiet", False)

    def progress(fraction: float, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result["layer"] = layer.run_layer_bench(
        lengths,
        ranks,
        repeats=repeats,
        warmup=warmup,
        eager_limit_gb=args.eager_limit_gb,
        device=device,
        progress=progress if verbose else None,
    )
    if args.no_model:
        result["model"] = {"skipped": "skipped: --no-model"}
    else:
        key = model.TINY_MODEL_KEY if tiny else model.MODEL_KEY
        result["model"] = model.run_model_bench(
            key,
            args.model_length or (model.TINY_MODEL_LENGTH if tiny else model.MODEL_LENGTH),
            args.model_rank or (model.TINY_MODEL_RANK if tiny else model.MODEL_RANK),
            repeats=args.model_repeats
            or (model.TINY_MODEL_REPEATS if tiny else min(repeats, model.MODEL_REPEATS)),
            warmup=warmup,
            device=device,
            progress=progress if verbose else None,
        )
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - t0
    print(format_report(result))
    text = json.dumps(result, indent=2, allow_nan=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
