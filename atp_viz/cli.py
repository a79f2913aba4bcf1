"""Command line: ``python -m atp_viz <command>`` (also installed as ``atp-viz``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from atp_viz.models import ModelLoadError
from atp_viz.texts import TextError


def _read_text(path: str) -> str:
    from atp_viz.texts import decode_upload

    p = Path(path)
    if not p.is_file():
        raise TextError(f"No such text file: {path}")
    return decode_upload(p.read_bytes(), p.name)


def _write_json(obj, out: str | None) -> None:
    text = json.dumps(obj, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)


def cmd_spectra(args: argparse.Namespace) -> int:
    from atp_viz import spectra
    from atp_viz.capture import capture
    from atp_viz.models import load_model

    text = _read_text(args.text_file)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    t_load = time.perf_counter() - t0
    cap = capture(loaded, text, attentions="none")
    sps = spectra.layer_spectra(
        [layer.x for layer in cap.layers], centered=args.centered, skip_first=args.skip_first
    )
    rows = []
    print(f"{cap.info.label}: L = {cap.n_tokens} tokens, d = {cap.info.d_model}", file=sys.stderr)
    for note in cap.notes:
        print(f"note: {note}", file=sys.stderr)
    header = "layer  erank  " + "  ".join(f"r@{t:.0%}" for t in spectra.THRESHOLDS)
    print(header, file=sys.stderr)
    for i, sp in enumerate(sps):
        ranks = [sp.rank_for(t) for t in spectra.THRESHOLDS]
        print(f"{i:5d}  {sp.effective_rank:5.1f}  " + "  ".join(f"{r:5d}" for r in ranks), file=sys.stderr)
        rows.append(
            {
                "layer": i,
                "effective_rank": sp.effective_rank,
                "rank_for": {f"{t}": r for t, r in zip(spectra.THRESHOLDS, ranks, strict=True)},
                "singular_values": sp.singular_values.tolist(),
            }
        )
    _write_json(
        {
            "model": args.model,
            "n_tokens": cap.n_tokens,
            "n_tokens_before_truncation": cap.n_original,
            "centered": args.centered,
            "skip_first": args.skip_first,
            "load_seconds": t_load,
            "notes": list(cap.notes),
            "layers": rows,
        },
        args.json,
    )
    return 0


def parse_rank(text: str) -> int | float:
    """'64' -> 64 principal keys; '0.5' -> half of L."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an int or a fraction (0.5), got {text!r}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from atp_viz import compare
    from atp_viz.engine import ATPConfig, parse_layers
    from atp_viz.models import load_model
    from atp_viz.texts import tokenize

    text = _read_text(args.text_file)
    loaded = load_model(args.model)
    tok = tokenize(loaded.tokenizer, text, loaded.info.max_tokens)
    config = ATPConfig(
        rank=args.rank,
        form=args.form,
        layers=parse_layers(args.layers, loaded.info.n_layers),
        basis_source=args.basis,
        lowrank_linear=args.lowrank_linear,
        basis_method=args.basis_method,
    )
    dense = compare.forward(loaded, tok)
    run = compare.forward(loaded, tok, config)
    result = compare.compare(dense, run).as_dict(loaded.tokenizer)
    result.update(model=args.model, text_file=args.text_file, truncation_notice=tok.notice)
    if tok.notice:
        print(f"note: {tok.notice}", file=sys.stderr)
    if loaded.info.is_decoder and args.new_tokens > 0:
        cont = compare.continuation(loaded, tok, config, n_new=args.new_tokens)
        result["continuation"] = {
            "dense": loaded.tokenizer.decode(list(cont.dense_ids)),
            "atp": loaded.tokenizer.decode(list(cont.atp_ids)),
            "first_divergence": cont.first_divergence,
            "agreement": cont.agreement,
        }
    if args.sweep:
        sw = compare.error_sweep(loaded, tok, dense, config, compare.sweep_ranks(tok.n_tokens))
        result["sweep"] = {
            "metric": sw.metric,
            "ranks": sw.ranks.tolist(),
            "exact": sw.exact.tolist(),
            "linear": sw.linear.tolist(),
            "linearisation": sw.linearisation.tolist(),
        }
    summary = f"{config.label()}: r = {result['rank']} of L = {result['n_tokens']}"
    if "embedding_cosine_to_dense" in result:
        summary += f", embedding cosine to dense {result['embedding_cosine_to_dense']:.4f}"
    else:
        summary += (
            f", next-token KL {result['next_token_kl_dense_to_atp']:.4f} nats, "
            f"top-1 agrees: {result['next_token_top1_agree']}"
        )
    print(summary, file=sys.stderr)
    _write_json(result, args.json)
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def cmd_perplexity(args: argparse.Namespace) -> int:
    from atp_viz import serving
    from atp_viz.models import load_model
    from atp_viz.texts import tokenize

    loaded = load_model(args.model)
    if args.text_file:
        text, source = _read_text(args.text_file), args.text_file
    else:
        text, mods = serving.stdlib_text()
        source = "Python standard-library docstrings (inspect.getdoc) of: " + ", ".join(mods)
    tok = tokenize(loaded.tokenizer, text, min(args.tokens, loaded.info.max_tokens))
    ids = tok.input_ids.to(loaded.device)
    print(f"{tok.n_tokens} tokens from {source}; chunks of {args.chunk}", file=sys.stderr)

    def show(label: str, res) -> None:
        print(
            f"{label:>22}: perplexity {res.perplexity:8.3f}  top-1 {res.top1:.3f}  ({res.seconds:.1f} s)",
            file=sys.stderr,
        )

    dense = serving.perplexity(loaded, ids, rank=None, chunk=args.chunk)
    show("dense", dense)
    results = []
    for form in args.forms.split(","):
        for r in args.ranks:
            res = serving.perplexity(loaded, ids, rank=r, form=form, chunk=args.chunk)
            show(f"{form} r={r}", res)
            results.append(res)
    _write_json(
        {
            "model": args.model,
            "text_source": source,
            "n_tokens": tok.n_tokens,
            "chunk": args.chunk,
            "mode": "strictly causal: each chunk attends to the past chunks compressed to r principal "
            "keys/values (basis from past tokens only) and to itself exactly",
            "rows": serving.as_table(results, dense),
        },
        args.json,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from atp_viz import atp, serving
    from atp_viz.models import load_model
    from atp_viz.texts import tokenize

    loaded = load_model(args.model)
    tok = tokenize(loaded.tokenizer, _read_text(args.prompt_file), loaded.info.max_tokens, min_tokens=1)
    ids = tok.input_ids.to(loaded.device)
    r, notice = atp.resolve_rank(args.rank, tok.n_tokens)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    dense = serving.generate(loaded, ids, rank=None, max_new_tokens=args.max_new_tokens)
    comp = serving.generate(loaded, ids, rank=r, form=args.form, max_new_tokens=args.max_new_tokens)
    share, first = serving.agreement(dense.new_ids, comp.new_ids)
    dec = loaded.tokenizer.decode
    result = {
        "model": args.model,
        "prompt_tokens": tok.n_tokens,
        "rank": r,
        "form": args.form,
        "dense_text": dec(list(dense.new_ids)),
        "atp_text": dec(list(comp.new_ids)),
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
    _write_json(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atp-viz", description="ATP Explorer command line.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("spectra", help="singular-value spectra of every layer's attention input")
    s.add_argument("--model", default="minilm", help="minilm | smollm2 | tiny-* | folder | hub id")
    s.add_argument("--text-file", required=True)
    s.add_argument("--centered", action="store_true", help="PCA (subtract the mean token) instead of SVD")
    s.add_argument("--skip-first", action="store_true", help="leave out the first token")
    s.add_argument("--json", help="write the result here (default: stdout)")
    s.set_defaults(func=cmd_spectra)

    c = sub.add_parser("compare", help="ATP vs dense on one text at one rank")
    c.add_argument("--model", default="minilm", help="minilm | smollm2 | tiny-* | folder | hub id")
    c.add_argument("--text-file", required=True)
    c.add_argument("--rank", type=parse_rank, default=0.5, help="int (principal keys) or fraction of L")
    c.add_argument("--form", choices=["exact", "linear"], default="exact")
    c.add_argument("--layers", default="all", help="'all', '3', '0-5' or '1,3,7'")
    c.add_argument("--basis", choices=["input", "keys"], default="input", help="basis from X or from K")
    c.add_argument(
        "--basis-method",
        choices=["exact", "randomized", "sketch"],
        default="exact",
        help="how U_r is computed",
    )
    c.add_argument("--lowrank-linear", action="store_true", help="low-rank inputs for the linear layers too")
    c.add_argument("--new-tokens", type=int, default=32, help="greedy continuation length (decoders)")
    c.add_argument("--sweep", action="store_true", help="also sweep the rank for both forms")
    c.add_argument("--json", help="write the result here (default: stdout)")
    c.set_defaults(func=cmd_compare)

    pp = sub.add_parser("perplexity", help="strictly causal perplexity, compressed past, rank grid")
    pp.add_argument("--model", default="smollm2")
    pp.add_argument("--text-file", help="default: Python standard-library docstrings (real text)")
    pp.add_argument("--tokens", type=int, default=2048, help="tokens of text to evaluate")
    pp.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    pp.add_argument("--ranks", type=_ints, default=[16, 32, 64, 128], help="principal keys for the past")
    pp.add_argument("--forms", default="exact,linear")
    pp.add_argument("--json")
    pp.set_defaults(func=cmd_perplexity)

    g = sub.add_parser("generate", help="greedy generation: dense KV cache vs ATP-compressed prompt cache")
    g.add_argument("--model", default="smollm2")
    g.add_argument("--prompt-file", required=True)
    g.add_argument("--rank", type=parse_rank, default=0.5)
    g.add_argument("--form", choices=["exact", "linear"], default="exact")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--json")
    g.set_defaults(func=cmd_generate)

    from atp_viz import bench, finetune, report

    bench.register(sub)
    finetune.register(sub)
    report.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ModelLoadError, TextError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
