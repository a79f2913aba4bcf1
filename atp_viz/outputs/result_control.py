"""The README's table "ATP-tuned against a dense-tuned control" (SmolLM2, L/2 and L/4).

The SmolLM2 goals are scored against the *original* dense model, as the issue sets them. But a run's
adapters also adapt the model to docstrings, and the tuned weights with dense attention score above the
original. The paper compares an ATP-tuned model with a model tuned the same way with dense attention.
This table puts the shipped ATP-tuned runs next to such a control (``finetune --attention dense``: the
same data, steps, adapters and loss, dense attention; it does not depend on the rank, so one control
serves both runs) on the same held-out windows, every difference paired per window (measure -> JSON,
JSON -> markdown, as in :mod:`atp_viz.outputs.result_tables`).
"""

from __future__ import annotations

from pathlib import Path

from atp_viz.core.progress import ProgressFn, within
from atp_viz.outputs.result_tuning import _md, _metric

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "tuned"
ATP_RUNS = ("smollm2-exact-keys-r0.5-300-two-stage", "smollm2-exact-keys-r0.25-300-two-stage")
CONTROL_RUN = "smollm2-dense-control-r0.5-300"
# What the control must share with an ATP run for the comparison to be like for like (the rank, form
# and stage 1 are what differs: the control trains no ATP parameter).
SAME_RECIPE = ("steps", "lr", "kl_weight", "lora_r", "lora_alpha", "seq_len", "chunk", "seed", "rank_mode")


def _share(settings: dict) -> str:
    return f"L/{round(1 / settings['rank'])}"


def files() -> tuple[str, ...]:
    """The control's result file, once measured (the scoreboard reads it too)."""
    path = SHIPPED.parents[1] / "docs" / "results" / "control-smollm2.json"
    return ("docs/results/control-smollm2.json",) if path.is_file() else ()


def check_control(control: dict, runs: dict[str, dict]) -> None:
    """Raise ValueError unless ``control`` (settings) is a dense run with each ATP run's recipe."""
    if control.get("attention") != "dense":
        raise ValueError(f"{CONTROL_RUN} was not trained with dense attention.")
    for name, s in runs.items():
        differ = [k for k in SAME_RECIPE if control.get(k) != s.get(k)]
        if differ:
            raise ValueError(f"{CONTROL_RUN} is not a dense control of {name} (differs in {differ}).")


def measure_control_smollm2(out: Path, progress: ProgressFn) -> dict:
    """Top-1 and perplexity of the original model, the dense-tuned control and each ATP-tuned run (under
    its own rank, form and basis) on every held-out window, each against the original and against the
    control, paired by window."""
    from atp_viz.analysis import protocol
    from atp_viz.hf.models import load_model
    from atp_viz.hf.tuned import read_settings

    c = read_settings(SHIPPED / CONTROL_RUN)["settings"]
    runs = {name: read_settings(SHIPPED / name)["settings"] for name in ATP_RUNS}
    check_control(c, runs)
    base = load_model("smollm2")
    windows = protocol.heldout_windows(base.tokenizer, c["seq_len"])
    dense = {"rank": None, "form": "exact"}  # the past exact: the model's own attention
    models = {"original, dense": (base, dense), "dense-tuned control, dense": (CONTROL_RUN, dense)}
    for name, s in runs.items():
        atp = {k: s[k] for k in ("rank", "form", "rank_mode")} | {"basis_from": s.get("basis_from", "input")}
        models[f"ATP-tuned {_share(s)}, ATP"] = (name, atp)
    scores = {}
    for i, (label, (model, how)) in enumerate(models.items()):
        loaded = load_model(f"tuned:{SHIPPED / model}") if isinstance(model, str) else model
        sub = within(progress, i / len(models), (i + 1) / len(models), f"{label}: ")
        scores[label] = protocol.score_decoder(loaded, windows, chunk=c["chunk"], progress=sub, **how)
    original, control = scores["original, dense"], scores["dense-tuned control, dense"]
    rows = []
    for label, (model, how) in models.items():
        sc = scores[label]
        against = None if sc is original else original
        row = {"setting": label, **protocol.decoder_summary(sc, windows, against)}
        if how["rank"] is not None:
            row["run"] = f"data/tuned/{model}"
            vs = protocol.decoder_summary(sc, windows, control)
            row["vs_control"] = {k: v for k, v in vs.items() if "reference" in k}
        rows.append(row)
    return {
        "model": "smollm2",
        "atp_runs": [{"folder": f"data/tuned/{name}", "settings": s} for name, s in runs.items()],
        "control_run": {"folder": f"data/tuned/{CONTROL_RUN}", "settings": c},
        "rows": rows,
    }


def _iv(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    return _metric(row, key, scale, digits, missing="-")  # "-": a comparison this row does not have


def _runs_line(runs: list[dict]) -> str:
    """'exact form, r = L/2 (effective), basis from keys, 80 layer-wise transfer steps first; ...'."""
    return "; ".join(
        f"{s['form']} form, r = {_share(s)} ({s['rank_mode']}), basis from {s.get('basis_from', 'input')}, "
        f"{s['transfer_steps']} layer-wise transfer steps first"
        for s in (r["settings"] for r in runs)
    )


def render_control_smollm2(data: list[dict]) -> str:
    (d,) = data
    c = d["control_run"]["settings"]
    rows = []
    for r in d["rows"]:
        vs = r.get("vs_control", {})
        rows.append([
            r["setting"], _iv(r, "top1"), _iv(r, "top1_minus_reference", 100, 1),
            _iv(r, "perplexity", 1, 2), _iv(r, "perplexity_ratio_to_reference"),
            _iv(vs, "top1_minus_reference", 100, 1), _iv(vs, "perplexity_ratio_to_reference"),
        ])  # fmt: skip
    head = ["model, attention", "top-1", "minus original dense, pt", "perplexity", "perplexity / original",
            "minus dense-tuned control, pt", "perplexity / control"]  # fmt: skip
    n = d["rows"][0]
    folders = ", ".join(f"`{r['folder']}`" for r in [*d["atp_runs"], d["control_run"]])
    return _md(head, rows) + (
        f"\n\nSmolLM2, next-token prediction on {n['n_windows']} held-out windows ({n['n_scored']} "
        f"predictions), strictly causal chunks of {c['chunk']}. ATP runs: {_runs_line(d['atp_runs'])}. "
        f"Every model: LoRA r = {c['lora_r']}, {c['steps']} end-to-end steps on the same windows in the "
        "same order, the same loss; the control trains no ATP parameter and has no transfer stage. 95% "
        f"intervals by bootstrap over windows; differences and ratios paired per window. Adapters: {folders}."
    )
