"""``atp-viz compare``: ATP vs dense on one text at one rank (the explorer's metrics)."""

from __future__ import annotations

import argparse
import sys

from atp_viz.cli.common import (
    MODEL_HELP,
    add_basis_method,
    add_centre_basis,
    add_form,
    rank_arg,
    read_text_file,
    write_json,
)
from atp_viz.hf.engine import BASIS_SOURCES

NEW_TOKENS = 32


def register(sub) -> None:
    c = sub.add_parser("compare", help="ATP vs dense on one text at one rank")
    c.add_argument("--model", default="minilm", help=MODEL_HELP)
    c.add_argument("--text-file", required=True)
    c.add_argument(
        "--rank", type=rank_arg,
        help="int (principal keys), fraction of L, or L/k (default: a tuned model's own, else 0.5)",
    )  # fmt: skip
    add_form(c, default=None)
    c.add_argument("--layers", default="all", help="'all', '3', '0-5' or '1,3,7'")
    c.add_argument(
        "--layer-ranks", metavar="HOW",
        help="one rank per layer, mean --rank (a share): shares (0.375,0.125,...), 'measured' or 'spectrum'; "
        "'one': the same rank in every layer. Default: a run tuned per layer at its own rank, its shares",
    )  # fmt: skip
    c.add_argument(
        "--basis", choices=tuple(BASIS_SOURCES),
        help="basis from X (input) or from K (keys); default: a tuned model's own, else input",
    )  # fmt: skip
    add_basis_method(c)
    add_centre_basis(c, tuned_default=True)
    c.add_argument("--lowrank-linear", action="store_true", help="low-rank inputs for the linear layers too")
    c.add_argument(
        "--new-tokens", type=int, default=NEW_TOKENS, help="greedy continuation length (decoders; 0: none)"
    )
    c.add_argument("--sweep", action="store_true", help="also sweep the rank for every form")
    c.add_argument("--json", help="write the result here (default: stdout)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atp_viz.analysis import compare
    from atp_viz.core.progress import stderr_progress
    from atp_viz.core.ranks import parse_layers
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model
    from atp_viz.text.inputs import tokenize

    if args.new_tokens < 0:  # before the model loads (seconds to minutes): nothing to wait for
        raise ValueError(f"--new-tokens must be 0 (no continuation) or more, got {args.new_tokens}")
    text = read_text_file(args.text_file)
    _as_tuned_by_default(args)
    loaded = load_model(args.model)
    if not loaded.info.is_decoder and args.new_tokens != NEW_TOKENS:
        print(
            "note: --new-tokens is for decoders (a greedy continuation); an encoder has none.",
            file=sys.stderr,
        )
    tok = tokenize(loaded.tokenizer, text, loaded.info.max_tokens)
    config = ATPConfig(
        rank=args.rank,
        form=args.form,
        layers=parse_layers(args.layers, loaded.info.n_layers),
        basis_source=args.basis,
        lowrank_linear=args.lowrank_linear,
        basis_method=args.basis_method,
        centre_basis=args.centre_basis,
        layer_ranks=_layer_ranks(args, loaded),
    )
    dense = compare.forward(loaded, tok)
    run_ = compare.forward(loaded, tok, config)
    result = compare.compare(dense, run_).as_dict(loaded.tokenizer)
    result.update(model=args.model, text_file=args.text_file, truncation_notice=tok.notice)
    for notice in [tok.notice, *result.get("notices", [])]:  # e.g. a rank above L, clamped
        if notice:
            print(f"note: {notice}", file=sys.stderr)
    if loaded.info.is_decoder and args.new_tokens > 0:
        cont = compare.continuation(loaded, tok, config, n_new=args.new_tokens)
        result["continuation"] = {
            "dense": loaded.tokenizer.decode(list(cont.dense_ids)),
            "atp": loaded.tokenizer.decode(list(cont.atp_ids)),
            "first_divergence": cont.first_divergence,
            "agreement": cont.agreement,
        }
    _against_original(args.model, loaded, tok, run_, result)
    _warn_if_not_as_tuned(args, result, config)
    if args.sweep:
        sw = compare.error_sweep(
            loaded, tok, dense, config, compare.sweep_ranks(tok.n_tokens), progress=stderr_progress()
        )
        result["sweep"] = {
            "metric": sw.metric,
            "ranks": sw.ranks.tolist(),
            "errors": {name: errs.tolist() for name, errs in sw.errors.items()},
        }
    summary = f"{config.label()}: r = {result['rank']} of L = {result['n_tokens']}"
    if "layer_ranks" in result:  # the budget's r, and the layers' own ranks with their mean
        ranks = result["layer_ranks"]
        summary = (
            f"{config.label()}: the budget's r = {result['rank']} of L = {result['n_tokens']}; per layer "
        )
        summary += f"{', '.join(map(str, ranks))} (mean {sum(ranks) / len(ranks):g})"
    if "embedding_cosine_to_original_dense" in result:
        summary += (
            f", embedding cosine to the original model {result['embedding_cosine_to_original_dense']:.4f}"
        )
    if "kl_to_original_dense" in result:
        summary += f", KL to the original model {result['kl_to_original_dense']:.4f} nats"
    if "embedding_cosine_to_dense" in result:
        summary += f", embedding cosine to dense {result['embedding_cosine_to_dense']:.4f}"
    else:
        summary += (
            f", next-token KL {result['next_token_kl_dense_to_atp']:.4f} nats, "
            f"top-1 agrees: {result['next_token_top1_agree']}"
        )
    print(summary, file=sys.stderr)
    write_json(result, args.json)
    return 0


def _as_tuned_by_default(args: argparse.Namespace) -> None:
    """A tuned model (``tuned:DIR``) is read as it was tuned, unless told otherwise: its form, basis and
    rank, and its per-layer shares when the rank is its own (as ``perplexity`` and the Serving page do)."""
    from atp_viz.analysis.allocation import SAME_BUDGET, typed_budget
    from atp_viz.core.ranks import format_layer_shares
    from atp_viz.hf.tuned import as_tuned

    trained = as_tuned(args.model)
    args.form = args.form or trained["form"]
    args.basis = args.basis or trained["basis_from"]
    args.centre_basis = trained["centre_basis"] if args.centre_basis is None else args.centre_basis
    own = trained["layer_ranks"]
    typed = _typed_shares(args.layer_ranks)
    serves = typed_budget(typed, own, trained["rank"]) if typed else None
    # typed shares serve their budget: their mean, or the rank of the run tuned with them
    if args.rank is None:
        args.rank = serves if typed else (0.5 if trained["rank"] is None else trained["rank"])
    elif typed and abs(serves - float(args.rank)) > SAME_BUDGET:
        raise ValueError(
            f"The per-layer shares serve r = {serves!r} L, not --rank {args.rank}: give --rank {serves!r}."
        )
    if args.layer_ranks is None and own and abs(float(args.rank) - float(trained["rank"])) <= SAME_BUDGET:
        args.layer_ranks = format_layer_shares(own)


def _typed_shares(how: str | None) -> tuple[float, ...]:
    """Per-layer shares typed on the command line (empty for none, 'one', 'measured' or 'spectrum')."""
    from atp_viz.core.ranks import parse_layer_shares

    if not how or how.strip() in ("one", "measured", "spectrum"):
        return ()
    return parse_layer_shares(how)


def _layer_ranks(args: argparse.Namespace, loaded) -> tuple[float, ...] | None:
    if not args.layer_ranks or args.layer_ranks.strip() == "one":
        return None
    from atp_viz.analysis.allocation import choose_layer_ranks
    from atp_viz.core.progress import stderr_progress

    shares, _ = choose_layer_ranks(  # measured the first time for a form and basis: about 35 s on MiniLM
        args.layer_ranks, loaded, args.rank, form=args.form, basis_source=args.basis,
        centre_basis=args.centre_basis, progress=stderr_progress(),
    )  # fmt: skip
    return shares


def _warn_if_not_as_tuned(args: argparse.Namespace, result: dict, config) -> None:
    """A tuned model run under another form, basis or choice of per-layer ranks than it was tuned with:
    say so (and in the JSON)."""
    from atp_viz.analysis.allocation import SAME_BUDGET
    from atp_viz.core.ranks import describe, describe_window, format_layer_shares
    from atp_viz.hf.model_info import TUNED_PREFIX
    from atp_viz.hf.tuned import read_settings

    if not args.model.startswith(TUNED_PREFIX):
        return
    trained = read_settings(args.model[len(TUNED_PREFIX) :])["settings"]
    if trained.get("attention") == "dense":  # a control trained no ATP setting: any one can be compared
        return
    basis = trained.get("basis_from", "input")
    tuned_ranks = format_layer_shares(trained.get("layer_ranks") or ())
    given = format_layer_shares(config.layer_ranks or ())
    note = ""
    if trained["form"] != args.form or basis != args.basis:
        note = (
            f"this model was tuned with the {trained['form']} form and the basis from {basis}; this run uses "
            f"{args.form} and the basis from {args.basis} (pass --form {trained['form']} --basis {basis})"
        )
    if bool(trained.get("centre_basis")) != args.centre_basis:
        note += "; " if note else ""
        note += (
            "this model was tuned with a centred basis (pass --centre-basis)"
            if trained.get("centre_basis")
            else "this model was tuned with the plain basis (pass --no-centre-basis)"
        )
    if tuned_ranks != given:
        note += "; " if note else ""
        note += (
            f"this model was tuned with per-layer ranks {tuned_ranks} (pass --rank {trained['rank']:g} "
            f"--layer-ranks {tuned_ranks})"
            if tuned_ranks
            else "this model was tuned with one rank for every layer; this run uses per-layer ranks"
        )
    if (
        not isinstance(trained["rank"], type(args.rank))
        or abs(float(args.rank) - trained["rank"]) > SAME_BUDGET
    ):
        note += "; " if note else ""
        note += f"this model was tuned at {describe(trained['rank'])} (pass --rank {trained['rank']:g})"
    if trained.get("window"):
        note += "; " if note else ""
        window = describe_window(trained["window"], trained.get("sinks", 0))
        note += (
            f"this model was tuned reading its past in chunks, {window} and the rest compressed; compare "
            "reads the text in one pass without them "
            f"(python -m atp_viz perplexity --model {args.model} --text-file FILE reads it as tuned)"
        )
    if note:
        result["not_as_tuned"] = note
        print(f"note: {note}", file=sys.stderr)


def _against_original(key: str, loaded, tok, run_, result: dict) -> None:
    """For a tuned model (``tuned:DIR``): the same ATP run against the untouched base model's dense
    forward, so any text can be checked against the model before fine-tuning."""
    from atp_viz.analysis import compare
    from atp_viz.hf.models import load_model
    from atp_viz.hf.tuned import base_model_of

    base = base_model_of(key)
    if base is None:
        return
    original = compare.forward(load_model(base), tok)
    vs = compare.compare(original, run_).as_dict(loaded.tokenizer)
    result["original_model"] = base
    if "embedding_cosine_to_dense" in vs:
        result["embedding_cosine_to_original_dense"] = vs["embedding_cosine_to_dense"]
    else:
        result["kl_to_original_dense"] = vs["next_token_kl_dense_to_atp"]
        result["top1_agrees_with_original_dense"] = vs["next_token_top1_agree"]
