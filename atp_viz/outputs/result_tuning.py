"""The README's tables about the attention forms: untuned forms with uniform and per-layer ranks, the
two-stage fine-tuning runs, and the long-context prefill benchmark (measure -> JSON, JSON -> markdown,
as in :mod:`atp_viz.outputs.result_tables`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atp_viz import forms
from atp_viz.analysis.protocol import interval
from atp_viz.core.progress import ProgressFn, steps, within
from atp_viz.core.ranks import describe_layer_shares, describe_window

ROOT = Path(__file__).resolve().parents[2]
RUNS_DIR = ROOT / "docs" / "finetune-runs"
FRACTIONS = (0.5, 0.25)
PROTOCOL_TOKENS = 128  # encoder runs: the protocol's longest training / held-out text


def _md(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Untuned MiniLM, every form, uniform and per-layer ranks (held-out texts, protocol)
# --------------------------------------------------------------------------------------------------


def _form_at(setting: tuple[float, str]) -> str:
    """ "taylor2 at L/4" for a (share, form) step's progress line."""
    return f"{setting[1]} at L/{round(1 / setting[0])}"


def measure_forms_minilm(out: Path, progress: ProgressFn) -> dict:
    """Cosine to dense of every form at L/2 and L/4 on all held-out texts, with one rank for every
    layer and with per-layer ranks under the same budget, chosen two ways on training-split texts: from
    the spectra, and by what each layer's rank costs the output (measured per form)."""
    from atp_viz.analysis import allocation, protocol
    from atp_viz.analysis.finetune.evaluation import embeddings
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model

    loaded = load_model("minilm")
    texts, modules = protocol.heldout_texts(loaded.tokenizer, max_tokens=PROTOCOL_TOKENS)
    dense = embeddings(loaded, None, texts, PROTOCOL_TOKENS)
    calibration = allocation.calibration_texts(loaded)
    names = forms.names()
    losses = {}  # each form's own, measured anew here (never read from the disk cache): about 35 s each
    for i, form in enumerate(names):
        say = within(
            progress, 0.25 * i / len(names), 0.25 * (i + 1) / len(names), f"{form}, one layer at a time: "
        )
        losses[form] = allocation.layer_losses(loaded, calibration, form=form, progress=say)
    spectrum = {share: allocation.calibrated_layer_ranks(loaded, share, calibration) for share in FRACTIONS}

    def cosine(cfg: ATPConfig) -> np.ndarray:
        return (embeddings(loaded, cfg, texts, PROTOCOL_TOKENS) * dense).sum(-1)

    rows = []
    grid = [(share, form) for share in FRACTIONS for form in names]
    for share, form in steps(within(progress, 0.25, 1.0, "held-out texts: "), grid, _form_at):
        measured = allocation.allocate_measured(losses[form], share)
        uniform = cosine(ATPConfig(rank=share, form=form))
        per_layer = cosine(ATPConfig(rank=share, form=form, layer_ranks=spectrum[share]))
        by_loss = cosine(ATPConfig(rank=share, form=form, layer_ranks=measured))
        rows.append(
            {
                "form": form,
                "rank": share,
                "layer_ranks": list(spectrum[share]),
                "measured_layer_ranks": list(measured),
                "uniform": protocol.encoder_summary(uniform, modules),
                "per_layer": protocol.encoder_summary(per_layer, modules, reference=uniform),
                "measured": protocol.encoder_summary(by_loss, modules, reference=uniform),
            }
        )
    return {
        "model": "minilm", "n_texts": len(texts), "calibration": f"{len(calibration)} training-split texts",
        "measured_grid": allocation.MEASURED_GRID, "rows": rows,
    }  # fmt: skip


def render_forms_minilm(data: list[dict]) -> str:
    d = data[0]
    rows = []
    for r in d["rows"]:
        u, p = r["uniform"], r["per_layer"]
        row = [
            forms.get(r["form"]).display_name,
            f"L/{round(1 / r['rank'])}",
            interval(u["cosine_mean"], u["cosine_mean_ci"]),
            interval(p["cosine_minus_reference"], p["cosine_minus_reference_ci"]),
            " ".join(f"{x:.2f}" for x in r["layer_ranks"]),
        ]
        if "measured" in r:
            m = r["measured"]
            row += [
                interval(m["cosine_minus_reference"], m["cosine_minus_reference_ci"]),
                " ".join(f"{x:g}" for x in r["measured_layer_ranks"]),
            ]
        rows.append(row)
    head = [
        "form (untuned)",
        "budget",
        "one rank per layer",
        "spectrum's per-layer ranks: difference",
        "shares",
    ]
    if "measured" in d["rows"][0]:
        head += ["measured per-layer ranks: difference", "shares"]
    return _md(head, rows) + (
        f"\n\nMiniLM, sentence-embedding cosine to dense, mean and 95% interval over {d['n_texts']} held-out "
        "texts; per-layer ranks under the same budget (mean share), chosen on "
        f"{d['calibration']}: from the spectra (the energy each layer keeps), and measured (each layer "
        f"alone at shares 1/{d.get('measured_grid', 8)} ... 1 of L, the others dense, 1 - cosine to dense "
        "averaged; the split with the least summed loss). Differences to one rank per layer, paired."
    )


def measure_projection_split(out: Path, progress: ProgressFn) -> dict:
    """Which projection costs the exact form its accuracy: the exact form, then the same softmax with only
    the keys rebuilt from r principal keys (values exact), then only the values (keys exact); MiniLM,
    every held-out text, untuned, each paired against the exact form."""
    from atp_viz.analysis import protocol
    from atp_viz.analysis.finetune.evaluation import embeddings
    from atp_viz.forms.exact import DIAGNOSTIC_VARIANTS
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model

    loaded = load_model("minilm")
    texts, modules = protocol.heldout_texts(loaded.tokenizer, max_tokens=PROTOCOL_TOKENS)
    dense = embeddings(loaded, None, texts, PROTOCOL_TOKENS)
    rows = []
    with forms.registered(*DIAGNOSTIC_VARIANTS):  # for this measurement only: never listed elsewhere
        for share in steps(progress, FRACTIONS, lambda share: f"L/{round(1 / share)}, three settings"):
            exact = ATPConfig(rank=share, form="exact")
            both = (embeddings(loaded, exact, texts, PROTOCOL_TOKENS) * dense).sum(-1)
            rows.append({"form": "exact", "rank": share, "cosine": protocol.encoder_summary(both, modules)})
            for variant in DIAGNOSTIC_VARIANTS:
                cfg = ATPConfig(rank=share, form=variant.name)
                cos = (embeddings(loaded, cfg, texts, PROTOCOL_TOKENS) * dense).sum(-1)
                summary = protocol.encoder_summary(cos, modules, reference=both)
                rows.append({"form": variant.name, "display_name": variant.display_name, "rank": share,
                             "cosine": summary})  # fmt: skip
    return {"model": "minilm", "n_texts": len(texts), "rows": rows}


def render_projection_split(data: list[dict]) -> str:
    d = data[0]
    rows = []
    for r in d["rows"]:
        c, paired = r["cosine"], "cosine_minus_reference"
        diff = interval(c[paired], c[f"{paired}_ci"]) if paired in c else ""
        name = r.get("display_name") or forms.get(r["form"]).display_name
        mean = interval(c["cosine_mean"], c["cosine_mean_ci"])
        rows.append([name, f"L/{round(1 / r['rank'])}", mean, diff])
    head = ["rebuilt from r principal keys (untuned)", "rank", "cosine to dense", "minus the exact form"]
    return _md(head, rows) + (
        f"\n\nMiniLM, sentence-embedding cosine to dense, mean and 95% interval over {d['n_texts']} held-out "
        "texts; differences paired on the same texts."
    )


# --------------------------------------------------------------------------------------------------
# MiniLM by input length: the same share of L, longer texts
# --------------------------------------------------------------------------------------------------

LENGTH_BUCKETS = ((24, 64), (64, 128), (128, 257))  # tokens, [lo, hi)


def _shipped_run(form: str, basis: str, share: float) -> Path | None:
    """The shipped MiniLM run (``data/tuned``) of this form, basis (plain, as the length study runs it) and
    rank, trained on the protocol's texts (<= ``PROTOCOL_TOKENS``), with the best tuned cosine."""
    from atp_viz.hf import tuned

    runs = [(d, m) for d, m in tuned.find_runs([tuned.SHIPPED_DIR]) if m["settings"]["model"] == "minilm"
            and m["settings"]["form"] == form and m["settings"].get("basis_from", "input") == basis
            and m["settings"]["rank"] == share and texts_of(m["settings"]) == PROTOCOL_TOKENS
            and not m["settings"].get("centre_basis")]  # fmt: skip
    best = max(runs, key=lambda dm: dm[1]["metrics"]["rows"]["atp_tuned"]["cosine_mean"], default=None)
    return best[0] if best else None


def measure_length_minilm(out: Path, progress: ProgressFn) -> dict:
    """Cosine to the original dense model by input length, on held-out texts cut at up to 256 tokens
    (MiniLM's limit; fine-tuning and the runs' tables use at most 128): the exact form at L/2 and L/4,
    untuned with either basis and tuned (the shipped keys-basis adapters, trained on texts of <= 128)."""
    from atp_viz.analysis import protocol
    from atp_viz.analysis.finetune.evaluation import embeddings
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model

    base = load_model("minilm")
    longest = min(LENGTH_BUCKETS[-1][1] - 1, base.info.max_tokens)
    texts, modules = protocol.heldout_texts(base.tokenizer, max_tokens=longest)
    lengths = np.array([len(base.tokenizer(t)["input_ids"]) for t in texts])
    dense = embeddings(base, None, texts, longest)
    rows = []
    for share in steps(progress, FRACTIONS, lambda share: f"L/{round(1 / share)}, untuned and tuned"):
        settings = [("untuned", "input", base), ("untuned", "keys", base)]
        run = _shipped_run("exact", "keys", share)
        if run is not None:
            settings.append((str(run.relative_to(ROOT)), "keys", load_model(f"tuned:{run}")))
        for which, basis, model in settings:
            cfg = ATPConfig(rank=share, form="exact", basis_source=basis)
            cos = (embeddings(model, cfg, texts, longest) * dense).sum(-1)
            buckets = []
            for lo, hi in LENGTH_BUCKETS:
                idx = np.flatnonzero((lengths >= lo) & (lengths < hi))
                summary = protocol.encoder_summary(cos[idx], [modules[i] for i in idx]) if idx.size else None
                buckets.append({"tokens": [lo, hi], "cosine": summary})
            rows.append({"rank": share, "basis_from": basis, "model": which, "buckets": buckets})
    return {"model": "minilm", "n_texts": len(texts), "longest": longest, "rows": rows}


def render_length_minilm(data: list[dict]) -> str:
    d = data[0]
    head = ["exact form", "rank", *(f"{lo}-{hi - 1} tokens" for lo, hi in LENGTH_BUCKETS)]
    rows = []
    for r in d["rows"]:
        which = "untuned" if r["model"] == "untuned" else f"tuned (`{r['model']}`)"
        cells = []
        for b in r["buckets"]:
            c = b["cosine"]
            cells.append(
                f"{interval(c['cosine_mean'], c['cosine_mean_ci'])} ({c['n_texts']})" if c else "no text"
            )
        rows.append([f"{which}, basis from {r['basis_from']}", f"L/{round(1 / r['rank'])}", *cells])
    return _md(head, rows) + (
        f"\n\nMiniLM, sentence-embedding cosine to the original dense model, mean and 95% interval (texts in "
        f"brackets) over {d['n_texts']} held-out texts cut at paragraph boundaries to at most {d['longest']} "
        f"tokens. The tuned adapters were trained on texts of at most {PROTOCOL_TOKENS} tokens."
    )


# --------------------------------------------------------------------------------------------------
# Two-stage fine-tuning runs (each run's JSON, as written by training)
# --------------------------------------------------------------------------------------------------


def run_files(model: str) -> tuple[str, ...]:
    """The committed two-stage runs of ``model``, relative to the repository root."""
    return tuple(str(p.relative_to(ROOT)) for p in sorted(RUNS_DIR.glob(f"{model}-*-two-stage.json")))


def texts_of(s: dict) -> int:
    """An encoder run's longest training / held-out text, from its settings."""
    return int(s.get("max_tokens", PROTOCOL_TOKENS))


# Recipe settings a runs table does not show in its own columns: a run that changed one says so next to
# its form, so two rows with the same form, rank and steps always show how they differ.
_RECIPE = {
    "lr": "lr {}", "transfer_lr": "stage-1 lr {}", "hidden_weight": "hidden-state weight {}",
    "kl_weight": "KL weight {}", "lora_r": "LoRA r = {}", "batch": "batch {}",
    "seq_len": "windows of {} tokens", "chunk": "chunks of {}", "seed": "seed {}",
    "form_init": "form parameters from {}", "train_text": "{} training text",
    "layer_ranks_from": "per-layer ranks ({})",
}  # fmt: skip


def basis_note(s: dict) -> str:
    """', basis from keys, centred' for a run's basis (empty for the paper's: X, plain)."""
    basis = s.get("basis_from", "input")
    return ("" if basis == "input" else f", basis from {basis}") + (
        ", centred" if s.get("centre_basis") else ""
    )


def recipe_note(s: dict) -> str:
    """', LoRA r = 32, hidden-state weight 4' for the recipe settings that differ from the defaults of
    ``finetune`` (empty for a default recipe); LoRA alpha only when it is not the CLI's 2 x r."""
    from atp_viz.analysis.finetune.config import TuneConfig

    default = TuneConfig()
    parts = [label.format(s[k]) for k, label in _RECIPE.items() if k in s and s[k] != getattr(default, k)]
    if "lora_alpha" in s and s["lora_alpha"] != 2 * s.get("lora_r", default.lora_r):
        parts.append(f"LoRA alpha {s['lora_alpha']}")
    return "".join(f", {p}" for p in parts)


def _rank(s: dict) -> str:
    mode = s.get("rank_mode", "past")
    if isinstance(s["rank"], int):  # a fixed number of principal keys, behind an exact window if any
        window = ", " + describe_window(s["window"], s.get("sinks", 0)) if s.get("window") else ""
        return f"r = {s['rank']}{window}, {s.get('basis_update', 'recompute')}"
    if s.get("layer_ranks"):  # one budget, shared out over the layers
        return f"L/{round(1 / s['rank'])} on average ({describe_layer_shares(s['layer_ranks'])})"
    return f"L/{round(1 / s['rank'])}" + ("" if mode == "past" else f" ({mode})")


def _metric(row: dict, key: str, scale: float = 1.0, digits: int = 3, missing: str = "unknown") -> str:
    if key not in row:
        return missing
    return interval(row[key], tuple(row[f"{key}_ci"]), digits, scale)


def _shipped(run: dict) -> bool:
    """Whether ``data/tuned/`` holds this run's adapters (its atp_tuning.json has the same settings and
    training time)."""
    for meta in (ROOT / "data" / "tuned").glob("*/atp_tuning.json"):
        other = json.loads(meta.read_text())
        if other.get("settings") == run["settings"] and other.get("train_seconds") == run["train_seconds"]:
            return True
    return False


def render_runs(data: list[dict]) -> str:
    if not data:
        return "No two-stage run committed yet."
    decoder = "top1" in data[0]["metrics"]["rows"]["dense"]
    key = "top1" if decoder else "cosine_mean"
    rows = []

    def order(run: dict) -> tuple:  # by form, shares of L from the largest, then fixed ranks
        r = run["settings"]["rank"]
        return run["settings"]["form"], isinstance(r, int), -r

    for run in sorted(data, key=order):
        s, m = run["settings"], run["metrics"]["rows"]
        tuned = m["atp_tuned"]
        row = [
            forms.get(s["form"]).name
            + basis_note(s)
            + recipe_note(s)
            + (" (metrics re-measured: `finetune --reevaluate`)" if run.get("reevaluated") else ""),
            _rank(s)
            + ("" if decoder or texts_of(s) == PROTOCOL_TOKENS else f", texts <= {texts_of(s)} tokens"),
            f"{s['transfer_steps']} + {s['steps']}",
            _metric(m["atp_untuned"], key),
            f"**{_metric(tuned, key)}**",
        ]
        if decoder:
            row += [
                _metric(tuned, "top1_minus_reference", 100, 1),
                _metric(tuned, "perplexity_ratio_to_reference", 1, 3),
                _metric(m["dense"], "perplexity", 1, 2),
                f"{m['dense'].get('n_windows', '?')} ({m['dense'].get('n_scored', '?')})",
            ]
        load = run.get("load_average_at_end_of_training")
        row += [
            _metric(m["dense_tuned_weights"], key),
            f"{(run['train_seconds'] + run.get('eval_seconds', 0)) / 60:.1f}",
            f"{run.get('torch_threads', '?')}, {load[0]:.1f}" if load else "unknown",
            run.get("skipped_steps", "unknown"),
            "yes" if _shipped(run) else "no",
        ]
        rows.append(row)
    head = ["form", "rank", "steps (transfer + tuning)", "untuned ATP", "tuned ATP"]
    if decoder:
        head += ["tuned - dense, pt", "perplexity / dense", "dense perplexity", "windows (predictions)"]
    head += ["tuned weights, dense attention", "minutes (train + eval)", "threads, load at end",
             "skipped steps", "adapters in data/tuned"]  # fmt: skip
    plain = [d for d in data if not d["settings"].get("window")]  # a window run's note says more than its row
    # The caption is one run's description of what was scored: not one naming its own per-layer ranks
    # (each such row shows its shares) nor one scored on shorter texts.
    usual = [
        d for d in plain
        if (decoder or texts_of(d["settings"]) == PROTOCOL_TOKENS) and not d["settings"].get("layer_ranks")
    ]  # fmt: skip
    what = (usual or data)[0]["metrics"]["what"]
    if not decoder and any(texts_of(d["settings"]) != PROTOCOL_TOKENS for d in data):
        what += (
            "; a run marked 'texts <= N tokens' trained and is scored on the held-out modules' texts cut at "
            "up to N tokens (another set: compare it with the length table, not with the other rows)"
        )
    if decoder:  # runs may score different numbers of windows: the table gives each run's
        what = what.split(" of ", 1)[0] + " of held-out windows (see the table); " + what.split("; ", 1)[-1]
    return (
        _md(head, rows) + f"\n\n{'Next-token top-1' if decoder else 'Cosine to the original dense'}: {what}."
    )


# --------------------------------------------------------------------------------------------------
# Long-context prefill (bench --prefill JSON files)
# --------------------------------------------------------------------------------------------------


def prefill_files() -> tuple[str, ...]:
    return tuple(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs" / "results").glob("prefill-*.json")))


def _round_ratios(run: dict) -> str:
    """The range of dense / ATP over the interleaved rounds (round i ran both paths back to back): how
    much the speedup moved with the machine's load."""
    dense, atp = run["dense_timing"]["repeats_s"], run["atp_timing"]["repeats_s"]
    ratios = [d / a for d, a in zip(dense, atp, strict=False)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "unknown"


def _prefill_setting(r: dict) -> str:
    """The ATP column of a prefill run: form, rank, basis, and the exact sinks and window if any."""
    window = describe_window(r.get("exact_window", 0), r.get("exact_sinks", 0))
    if r.get("middle") == "dropped":
        return f"{window}, the rest dropped (no ATP)"
    basis = f"basis from {r.get('basis_from', '?')} ({r.get('basis_update', 'recompute')})"
    setting = f"{r['form']}, r = {r['rank']}, {basis}"
    return f"{window}, the rest: {setting}" if r.get("middle") else setting


def _vs_original(r: dict) -> str:
    """A tuned model's ATP perplexity over the original model's dense one (empty for an untuned run)."""
    if "perplexity_ratio_to_original_dense" not in r:
        return ""
    ratio = r["perplexity_ratio_to_original_dense"], tuple(r["perplexity_ratio_to_original_dense_ci"])
    return f"x{interval(ratio[0], ratio[1], 2)} (original {r['original_dense_perplexity']:.2f})"


def render_prefill(data: list[dict]) -> str:
    rows = []
    for d in data:
        for r in d.get("runs", [d]):
            rows.append(
                [
                    r["model"].replace(str(ROOT) + "/", ""),
                    _prefill_setting(r),
                    r["tokens"],
                    f"{r['dense_seconds']:.1f}",
                    f"{r['atp_seconds']:.1f}",
                    f"{r['speedup']:.2f}x",
                    _round_ratios(r),
                    f"{r['ceiling']:.2f}x",
                    interval(r["dense_perplexity"], tuple(r["dense_perplexity_ci"]), 2),
                    interval(r["atp_perplexity"], tuple(r["atp_perplexity_ci"]), 2),
                    interval(r["top1_agreement"], tuple(r["top1_agreement_ci"])),
                    _vs_original(r),
                ]
            )
    head = [
        "model",
        "ATP",
        "L",
        "dense s",
        "ATP s",
        "speedup",
        "per round",
        "ceiling",
        "dense ppl",
        "ATP ppl",
        "top-1 agrees",
        "tuned: ATP ppl / original dense",
    ]
    return _md(head, rows) + (
        "\n\nMedians of interleaved runs on one held-out window per length; chunks of "
        f"{data[0].get('chunk', data[0].get('runs', [{}])[0].get('chunk'))} tokens, the past compressed to r "
        "principal keys with the basis timed; per round: the smallest and largest dense / ATP ratio of the "
        "rounds (each round runs both back to back); perplexities on the same positions (those with a "
        "compressed past), intervals by bootstrap over blocks of positions of that one window. A tuned "
        "model's dense and ATP runs use its tuned weights; the last column compares its ATP perplexity with "
        "the original model's dense perplexity on the same positions (not timed)."
        if data
        else ""
    )


CEILING_SETTINGS = (
    ("linear", "moments"),
    ("pksoftmax", "moments"),
    ("exact", "recompute"),
    ("taylor2", "recompute"),
)
CEILING_LENGTHS = (2048, 4096, 8192)  # SmolLM2 reads at most 8192 tokens


def measure_prefill_ceilings(out: Path, progress: ProgressFn) -> dict:
    """Counted (not timed) multiply-add ratio dense / ATP of a SmolLM2 prefill, per form and length, at
    r = 128 principal keys from the keys, chunks of 256: what each form could gain at best."""
    from atp_viz.analysis.bench import prefill
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    rows = []
    grid = [(form, update, L) for form, update in CEILING_SETTINGS for L in CEILING_LENGTHS]
    for form, update, L in steps(progress, grid, lambda s: f"counting {s[0]} ({s[1]}) at L = {s[2]}"):
        macs = prefill.counted_macs(
            loaded, L, rank=128, form=form, chunk=256, basis_from="keys", method="randomized",
            basis_update=update,
        )  # fmt: skip
        rows.append({"form": form, "basis_update": update, "tokens": L, **macs,
                     "ceiling": macs["dense_total"] / macs["atp_total"]})  # fmt: skip
    return {"model": "smollm2", "rank": 128, "chunk": 256, "rows": rows}


def render_prefill_ceilings(data: list[dict]) -> str:
    (d,) = data
    lengths = sorted({r["tokens"] for r in d["rows"]})
    by = {(r["form"], r["basis_update"], r["tokens"]): r for r in d["rows"]}
    settings = list(dict.fromkeys((r["form"], r["basis_update"]) for r in d["rows"]))
    rows = []
    for form, update in settings:
        share = by[form, update, lengths[-1]]
        rows.append(
            [f"{form} ({update})"]
            + [f"{by[form, update, L]['ceiling']:.2f}x" for L in lengths]
            + [f"{share['linear_layers'] / share['atp_total']:.0%}"]
        )
    head = [
        "form (basis update)",
        *[f"L = {L}" for L in lengths],
        f"projections + MLP + head, share of ATP at {lengths[-1]}",
    ]
    return _md(head, rows) + (
        f"\n\nCounted multiply-adds of a {d['model']} prefill, dense (causal) / ATP (chunks of {d['chunk']}, "
        f"past compressed to r = {d['rank']} principal keys of the keys, basis included): the most a run "
        "can gain."
    )
