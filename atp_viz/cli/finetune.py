"""``atp-viz finetune``: low-rank-aware fine-tuning (LoRA with ATP in place) and held-out evaluation."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from atp_viz.cli.common import MODEL_HELP, add_centre_basis, add_exact_window, add_form, rank_arg
from atp_viz.core.progress import stderr_progress
from atp_viz.core.ranks import RANK_MODES
from atp_viz.hf.engine import BASIS_SOURCES


def register(sub) -> None:
    from atp_viz.analysis.finetune.config import TRAIN_ATTENTION, TuneConfig

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
    f.add_argument(
        "--rank", type=rank_arg, default=d.rank,
        help="ATP rank: a share of L (0.5, 0.25, L/4); decoders also an int (principal keys of the past)",
    )  # fmt: skip
    add_form(f, default=d.form)
    f.add_argument(
        "--rank-mode", choices=RANK_MODES, default=d.rank_mode,
        help="decoders: 'past' (share of the compressed past) or 'effective' (share of the attended key set)",
    )  # fmt: skip
    f.add_argument(
        "--basis-from", choices=list(BASIS_SOURCES), default=d.basis_from,
        help="what the basis U_r decomposes: the attention input X (the paper) or the keys",
    )  # fmt: skip
    add_centre_basis(f)
    f.add_argument(
        "--layer-ranks", metavar="HOW", dest="layer_ranks_how",
        help="one rank per layer with mean --rank: 'measured' (encoders: by what each layer's rank costs "
        "the output on training texts), 'spectrum' (by each layer's spectrum), or shares (0.375,0.125,...)",
    )  # fmt: skip
    f.add_argument(
        "--attention", choices=list(TRAIN_ATTENTION), default=d.attention,
        help="what the layers run while training: 'atp' (the run) or 'dense' (decoders: a control with the "
        "same recipe and no ATP, evaluated like a run)",
    )  # fmt: skip
    _add_training(f, d)
    f.add_argument("--json-copy", help="also copy the run's JSON here (e.g. docs/finetune-runs/NAME.json)")
    _add_data(f, d)
    f.add_argument("--out", help="output folder (default: <cache>/tuned/<model>-r<rank>-<form>-<time>)")
    f.add_argument(
        "--reevaluate", metavar="DIR",
        help="train nothing: measure the finished run in DIR again with the current code and update its JSON",
    )  # fmt: skip
    f.set_defaults(func=run)


def _add_training(f, d) -> None:
    """The two stages' steps, rates and loss weights."""
    f.add_argument("--steps", type=int, default=d.steps, help="stage 2: end-to-end tuning steps")
    f.add_argument("--lr", type=float, default=d.lr)
    f.add_argument(
        "--transfer-steps", type=int, default=d.transfer_steps,
        help="stage 1: layer-wise attention transfer steps first (0: none)",
    )  # fmt: skip
    f.add_argument("--transfer-lr", type=float, default=d.transfer_lr)
    f.add_argument(
        "--hidden-weight", type=float, default=d.hidden_weight,
        help="encoders, stage 2: weight of the every-layer hidden-state distillation",
    )  # fmt: skip
    f.add_argument(
        "--kl-weight", type=float, default=d.kl_weight,
        help="decoders, stage 2: weight of KL(original dense || ATP) next to the token loss",
    )  # fmt: skip


def _add_data(f, d) -> None:
    """Adapters, texts and windows, evaluation size, and how a decoder reads its past."""
    from atp_viz.text.corpus import TRAIN_TEXTS

    f.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank")
    f.add_argument("--batch", type=int, default=d.batch, help="encoder texts per step")
    f.add_argument("--max-tokens", type=int, default=d.max_tokens, help="encoder: longest text")
    f.add_argument("--seq-len", type=int, default=d.seq_len, help="decoder: window length")
    f.add_argument("--chunk", type=int, default=d.chunk, help="decoder: chunk of the strictly causal mode")
    f.add_argument("--eval-texts", type=int, default=d.eval_texts, help="encoder: held-out texts (0: all)")
    f.add_argument(
        "--eval-windows", type=int, default=d.eval_windows, help="decoder: held-out windows (0: all)"
    )
    f.add_argument("--seed", type=int, default=d.seed)
    add_exact_window(f)
    f.add_argument(
        "--form-init", default=d.form_init, metavar="NAME=VALUE,...",
        help="where the form's per-head parameters start (e.g. e=0.5,b=-2; default: the untrained form)",
    )  # fmt: skip
    f.add_argument(
        "--basis-update", choices=("recompute", "moments"), default=d.basis_update,
        help="decoders: recompute the past's basis for every chunk (every form), or keep running sums of "
        "the past (moments: linear-cost forms, the cost that does not grow with the past)",
    )  # fmt: skip
    f.add_argument(
        "--train-text", choices=list(TRAIN_TEXTS), default=d.train_text,
        help="what the adapters train on: the training split's docstrings, or those and 51 more "
        "standard-library modules (wider); the held-out split is the same",
    )  # fmt: skip


def _reevaluate(args: argparse.Namespace) -> int:
    from atp_viz.analysis.finetune.config import TuneConfig
    from atp_viz.analysis.finetune.evaluation import metrics_table
    from atp_viz.analysis.finetune.training import reevaluate
    from atp_viz.hf.tuned import SETTINGS_FILE

    # The run's own settings are re-measured; a training or evaluation option given next to it would be
    # silently ignored, so it is refused.
    d = TuneConfig()
    given = [f"--{k.replace('_', '-')}" for k in vars(d) if getattr(args, k, getattr(d, k)) != getattr(d, k)]
    given += ["--out"] if args.out else []
    given += ["--layer-ranks"] if args.layer_ranks_how else []
    if given:
        print(
            f"error: --reevaluate measures the run with its own settings; drop {', '.join(given)}.",
            file=sys.stderr,
        )
        return 2

    metrics = reevaluate(args.reevaluate, progress=stderr_progress(), command=args.argv)
    if args.json_copy:
        Path(args.json_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.reevaluate) / SETTINGS_FILE, args.json_copy)
    print(f"\n{metrics['what']}", file=sys.stderr)
    for row in metrics_table({"metrics": metrics}):
        print("  ".join(f"{k}: {v}" for k, v in row.items()), file=sys.stderr)
    return 0


def _layer_ranks(args: argparse.Namespace) -> dict:
    """--layer-ranks read into the config's two fields ({} without it); 'measured' and 'spectrum' are
    chosen when training starts, on training-split texts."""
    how = (args.layer_ranks_how or "").strip()
    if not how:
        return {}
    if how in ("measured", "spectrum"):
        return {"layer_ranks_from": how}
    from atp_viz.core.ranks import parse_layer_shares

    return {"layer_ranks": parse_layer_shares(how), "layer_ranks_from": "given"}


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis.finetune.config import TuneConfig
    from atp_viz.analysis.finetune.training import check_trains, train

    if args.reevaluate:
        return _reevaluate(args)
    cfg = TuneConfig(
        model=args.model, rank=args.rank, form=args.form, rank_mode=args.rank_mode, steps=args.steps,
        basis_from=args.basis_from, centre_basis=args.centre_basis, attention=args.attention,
        lr=args.lr, lora_r=args.lora_r, transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
        hidden_weight=args.hidden_weight, kl_weight=args.kl_weight,
        lora_alpha=2 * args.lora_r, batch=args.batch, max_tokens=args.max_tokens, seq_len=args.seq_len,
        chunk=args.chunk, eval_texts=args.eval_texts, eval_windows=args.eval_windows, seed=args.seed,
        window=args.window, sinks=args.sinks, basis_update=args.basis_update, form_init=args.form_init,
        train_text=args.train_text, **_layer_ranks(args),
    )  # fmt: skip
    check_trains(cfg)  # every run's JSON already holds the untuned figures
    res = train(cfg, args.out, progress=stderr_progress(), command=args.argv)
    from atp_viz.analysis.finetune.evaluation import metrics_table
    from atp_viz.hf.tuned import SETTINGS_FILE

    if args.json_copy:
        Path(args.json_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(res.out_dir / SETTINGS_FILE, args.json_copy)

    print(f"\n{res.metrics['what']}", file=sys.stderr)
    for row in metrics_table({"metrics": res.metrics}):
        print("  ".join(f"{k}: {v}" for k, v in row.items()), file=sys.stderr)
    print(
        f"train {res.train_seconds:.0f} s, evaluation {res.eval_seconds:.0f} s; wrote {res.out_dir}",
        file=sys.stderr,
    )
    return 0
