"""``atp-viz finetune``: low-rank-aware fine-tuning (LoRA with ATP in place) and held-out evaluation."""

from __future__ import annotations

import argparse
import sys

from atp_viz.cli.common import MODEL_HELP, add_form, fraction_arg, stderr_progress


def register(sub) -> None:
    from atp_viz.analysis.finetune.config import TuneConfig

    d = TuneConfig()
    f = sub.add_parser(
        "finetune",
        help="low-rank-aware fine-tuning (LoRA with ATP in place) and held-out evaluation",
        description=(
            "Train LoRA adapters on the attention and MLP projections while ATP runs at the given rank and "
            "form, on Python standard-library docstrings (split by module into train / held-out), then "
            "evaluate dense, untuned ATP and tuned ATP on the held-out modules."
        ),
    )
    f.add_argument("--model", default=d.model, help=MODEL_HELP)
    f.add_argument("--rank", type=fraction_arg, default=d.rank, help="ATP rank as a share of L (0.5, 0.25)")
    add_form(f, default=d.form)
    f.add_argument("--steps", type=int, default=d.steps)
    f.add_argument("--lr", type=float, default=d.lr)
    f.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank")
    f.add_argument("--batch", type=int, default=d.batch, help="encoder texts per step")
    f.add_argument("--max-tokens", type=int, default=d.max_tokens, help="encoder: longest text")
    f.add_argument("--seq-len", type=int, default=d.seq_len, help="decoder: window length")
    f.add_argument("--chunk", type=int, default=d.chunk, help="decoder: chunk of the strictly causal mode")
    f.add_argument("--eval-texts", type=int, default=d.eval_texts)
    f.add_argument("--eval-windows", type=int, default=d.eval_windows)
    f.add_argument("--seed", type=int, default=d.seed)
    f.add_argument("--out", help="output folder (default: <cache>/tuned/<model>-r<rank>-<form>-<time>)")
    f.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis.finetune.config import TuneConfig
    from atp_viz.analysis.finetune.training import train

    cfg = TuneConfig(
        model=args.model, rank=args.rank, form=args.form, steps=args.steps, lr=args.lr, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, batch=args.batch, max_tokens=args.max_tokens, seq_len=args.seq_len,
        chunk=args.chunk, eval_texts=args.eval_texts, eval_windows=args.eval_windows, seed=args.seed,
    )  # fmt: skip
    res = train(cfg, args.out, progress=stderr_progress())
    rows = res.metrics["rows"]
    print(f"\n{res.metrics['what']}; rank {cfg.rank:g} L, {cfg.form} form", file=sys.stderr)
    keys = list(next(iter(rows.values())).keys())
    print("setting               " + "  ".join(f"{k:>12}" for k in keys), file=sys.stderr)
    for name, vals in rows.items():
        cells = [f"{v:12.4f}" if isinstance(v, float) else f"{v:>12}" for v in vals.values()]
        print(f"{name:22}" + "  ".join(cells), file=sys.stderr)
    print(
        f"train {res.train_seconds:.0f} s, evaluation {res.eval_seconds:.0f} s; wrote {res.out_dir}",
        file=sys.stderr,
    )
    return 0
