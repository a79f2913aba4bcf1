"""The centred basis (:func:`atp_viz.core.basis.principal_basis`, ``centre=True``) against the plain SVD
basis at the same rank, untuned, on every held-out text (MiniLM) or window (SmolLM2), paired."""

from __future__ import annotations

from pathlib import Path

from atp_viz import forms
from atp_viz.analysis.protocol import interval
from atp_viz.core.progress import ProgressFn, steps, within
from atp_viz.outputs.result_tuning import FRACTIONS, PROTOCOL_TOKENS, _md

MINILM_FORMS = ("exact", "taylor2")  # the reference and the positive below-quadratic form
SOURCES = ("keys", "input")
BASIS_NAMES = {"keys": "the keys", "input": "X"}
SMOLLM2_SEQ_LEN, SMOLLM2_CHUNK = 512, 128  # the perplexity protocol's windows


def measure_centred_minilm(out: Path, progress: ProgressFn) -> dict:
    """MiniLM, untuned: cosine to dense with the plain basis and with the centred one, for each form,
    basis source and share; the centred row paired against the plain one on the same texts."""
    from atp_viz.analysis import protocol
    from atp_viz.analysis.finetune.evaluation import embeddings
    from atp_viz.hf.engine import ATPConfig
    from atp_viz.hf.models import load_model

    loaded = load_model("minilm")
    texts, modules = protocol.heldout_texts(loaded.tokenizer, max_tokens=PROTOCOL_TOKENS)
    dense = embeddings(loaded, None, texts, PROTOCOL_TOKENS)
    grid = [(form, source, share) for form in MINILM_FORMS for source in SOURCES for share in FRACTIONS]
    rows = []
    for form, source, share in steps(progress, grid, lambda g: f"{g[0]}, basis from {g[1]}, r = {g[2]:g} L"):
        cos = {}
        for centre in (False, True):
            cfg = ATPConfig(rank=share, form=form, basis_source=source, centre_basis=centre)
            cos[centre] = (embeddings(loaded, cfg, texts, PROTOCOL_TOKENS) * dense).sum(-1)
        rows.append(
            {
                "form": form, "basis_from": source, "rank": share,
                "plain": protocol.encoder_summary(cos[False], modules),
                "centred": protocol.encoder_summary(cos[True], modules, reference=cos[False]),
            }
        )  # fmt: skip
    return {"model": "minilm", "n_texts": len(texts), "rows": rows}


def render_centred_minilm(data: list[dict]) -> str:
    d = data[0]
    rows = []
    for r in d["rows"]:
        plain, centred = r["plain"], r["centred"]
        rows.append([
            forms.get(r["form"]).display_name, BASIS_NAMES[r["basis_from"]], f"L/{round(1 / r['rank'])}",
            interval(plain["cosine_mean"], plain["cosine_mean_ci"]),
            interval(centred["cosine_mean"], centred["cosine_mean_ci"]),
            interval(centred["cosine_minus_reference"], centred["cosine_minus_reference_ci"]),
        ])  # fmt: skip
    head = ["form (untuned)", "basis from", "rank", "plain basis", "centred basis", "centred - plain"]
    return _md(head, rows) + (
        f"\n\nMiniLM, sentence-embedding cosine to dense, mean and 95% interval over {d['n_texts']} held-out "
        "texts; both bases have r columns; differences paired on the same texts."
    )


def measure_centred_smollm2(out: Path, progress: ProgressFn) -> dict:
    """SmolLM2, untuned, exact form, basis from the keys, rank as the share of the attended key set: top-1
    and perplexity with the plain and the centred basis on every held-out window, paired."""
    from atp_viz.analysis import protocol
    from atp_viz.hf.models import load_model

    loaded = load_model("smollm2")
    windows = protocol.heldout_windows(loaded.tokenizer, SMOLLM2_SEQ_LEN)
    opts = {"form": "exact", "chunk": SMOLLM2_CHUNK, "rank_mode": "effective", "basis_from": "keys"}
    n = 1 + 2 * len(FRACTIONS)
    dense = protocol.score_decoder(
        loaded, windows, rank=None, form="exact", chunk=SMOLLM2_CHUNK, progress=within(progress, 0, 1 / n)
    )
    rows = [{"setting": "dense", **protocol.decoder_summary(dense, windows)}]
    j = 1
    for share in FRACTIONS:
        plain = None
        for centre in (False, True):
            say = within(
                progress, j / n, (j + 1) / n, f"r = {share:g} L, {'centred' if centre else 'plain'}: "
            )
            scores = protocol.score_decoder(
                loaded, windows, rank=share, centre_basis=centre, progress=say, **opts
            )
            row = {"setting": "centred" if centre else "plain", "rank": share}
            row.update(protocol.decoder_summary(scores, windows, dense))
            if centre:
                vs = protocol.decoder_summary(scores, windows, plain)
                row["top1_minus_plain"], row["top1_minus_plain_ci"] = (
                    vs["top1_minus_reference"], vs["top1_minus_reference_ci"],
                )  # fmt: skip
                row["perplexity_ratio_to_plain"], row["perplexity_ratio_to_plain_ci"] = (
                    vs["perplexity_ratio_to_reference"], vs["perplexity_ratio_to_reference_ci"],
                )  # fmt: skip
            plain = scores if not centre else plain
            rows.append(row)
            j += 1
    return {
        "model": "smollm2", "n_windows": len(windows.ids), "seq_len": SMOLLM2_SEQ_LEN, "chunk": SMOLLM2_CHUNK,
        **{k: v for k, v in opts.items() if k != "chunk"}, "rows": rows,
    }  # fmt: skip


def render_centred_smollm2(data: list[dict]) -> str:
    d = data[0]
    rows = []
    for r in d["rows"]:
        rank = "dense" if r["setting"] == "dense" else f"{r['rank']:g} L ({r['setting']})"
        diff = r.get("top1_minus_reference")
        rows.append([
            rank,
            interval(r["perplexity"], r["perplexity_ci"], 2),
            interval(r["top1"], r["top1_ci"]),
            "" if diff is None else interval(diff, r["top1_minus_reference_ci"], 1, 100),
            *(
                (interval(r["top1_minus_plain"], r["top1_minus_plain_ci"], 1, 100),
                 interval(r["perplexity_ratio_to_plain"], r["perplexity_ratio_to_plain_ci"]))
                if "top1_minus_plain" in r else ("", "")
            ),
        ])  # fmt: skip
    head = [
        "rank (basis)",
        "perplexity",
        "top-1",
        "top-1 - dense, pt",
        "top-1 - plain, pt",
        "perplexity / plain",
    ]
    return _md(head, rows) + (
        f"\n\nSmolLM2 untuned, exact form, basis from the keys, rank as the share of the attended key set "
        f"(effective); {d['n_windows']} held-out windows of {d['seq_len']} tokens, chunks of {d['chunk']}, "
        "strictly causal (each chunk's basis from its past alone, centred on that past's mean). Intervals: "
        "bootstrap over windows, differences paired."
    )
