"""The README's table "ATP-tuned against a dense-tuned control" (SmolLM2, L/2).

The SmolLM2 L/2 goal is scored against the *original* dense model, as the issue sets it. But a run's
adapters also adapt the model to docstrings, and the tuned weights with dense attention score above the
original. The paper compares an ATP-tuned model with a model tuned the same way with dense attention.
This table puts the shipped ATP-tuned run next to such a control (``finetune --attention dense``: the
same data, steps, adapters and loss, dense attention) on the same held-out windows, every difference
paired per window (measure -> JSON, JSON -> markdown, as in :mod:`atp_viz.outputs.result_tables`).
"""

from __future__ import annotations

from pathlib import Path

from atp_viz.outputs.result_tuning import _md, _metric

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "tuned"
ATP_RUN = "smollm2-exact-keys-r0.5-300-two-stage"
CONTROL_RUN = "smollm2-dense-control-r0.5-300"


def files() -> tuple[str, ...]:
    """The control's result file, once measured (the scoreboard reads it too)."""
    path = SHIPPED.parents[1] / "docs" / "results" / "control-smollm2.json"
    return ("docs/results/control-smollm2.json",) if path.is_file() else ()


def measure_control_smollm2(out: Path) -> dict:
    """Top-1 and perplexity of the original model, the dense-tuned control and the ATP-tuned run (under
    its own rank, form and basis) on every held-out window, each against the original and against the
    control, paired by window."""
    from atp_viz.analysis import protocol
    from atp_viz.core.progress import stderr_progress, within
    from atp_viz.hf.models import load_model
    from atp_viz.hf.tuned import read_settings

    atp_meta, control_meta = read_settings(SHIPPED / ATP_RUN), read_settings(SHIPPED / CONTROL_RUN)
    s = atp_meta["settings"]
    c = control_meta["settings"]
    if c.get("attention") != "dense" or c["steps"] != s["steps"]:
        raise ValueError(f"{CONTROL_RUN} is not a dense control with the ATP run's {s['steps']} steps.")
    base = load_model("smollm2")
    windows = protocol.heldout_windows(base.tokenizer, s["seq_len"])
    models = {
        "original, dense": (base, None),
        "dense-tuned control, dense": (load_model(f"tuned:{SHIPPED / CONTROL_RUN}"), None),
        "ATP-tuned, ATP": (load_model(f"tuned:{SHIPPED / ATP_RUN}"), s["rank"]),
    }
    scores = {}
    say = stderr_progress()
    for i, (name, (loaded, rank)) in enumerate(models.items()):
        scores[name] = protocol.score_decoder(
            loaded, windows, rank=rank, form=s["form"], chunk=s["chunk"], rank_mode=s["rank_mode"],
            basis_from=s.get("basis_from", "input"), progress=within(say, i / 3, (i + 1) / 3, f"{name}: "),
        )  # fmt: skip
    original, control = scores["original, dense"], scores["dense-tuned control, dense"]
    rows = []
    for name, sc in scores.items():
        row = {"setting": name, **protocol.decoder_summary(sc, windows, None if sc is original else original)}
        if name == "ATP-tuned, ATP":
            vs = protocol.decoder_summary(sc, windows, control)
            row["vs_control"] = {k: v for k, v in vs.items() if "reference" in k}
        rows.append(row)
    return {
        "model": "smollm2",
        "atp_run": {"folder": f"data/tuned/{ATP_RUN}", "settings": s},
        "control_run": {"folder": f"data/tuned/{CONTROL_RUN}", "settings": control_meta["settings"]},
        "rows": rows,
    }


def _iv(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    return _metric(row, key, scale, digits, missing="-")  # "-": a comparison this row does not have


def render_control_smollm2(data: list[dict]) -> str:
    (d,) = data
    s = d["atp_run"]["settings"]
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
    return _md(head, rows) + (
        f"\n\nSmolLM2, next-token prediction on {n['n_windows']} held-out windows ({n['n_scored']} "
        f"predictions), strictly causal chunks of {s['chunk']}; ATP: {s['form']} form, r = L/"
        f"{round(1 / s['rank'])} ({s['rank_mode']}), basis from {s.get('basis_from', 'input')}. Both "
        f"models: LoRA r = {s['lora_r']}, {s['steps']} end-to-end steps on the same windows in the same "
        f"order (the ATP run had {s['transfer_steps']} layer-wise transfer steps before them). 95% "
        "intervals by bootstrap over windows; differences and ratios paired per window. Adapters: "
        f"`{d['atp_run']['folder']}`, `{d['control_run']['folder']}`."
    )
