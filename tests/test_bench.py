"""The bench command at its tiny size: JSON structure, finite positive figures, ratios, skip reasons.

Timings and speed-ups are never asserted (the machine is shared and noisy): only that every figure is
there, finite, positive where it must be, and consistent with the other figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from atp_viz import forms
from atp_viz.analysis.bench import layer, timing
from atp_viz.cli import bench
from atp_viz.core.basis import METHODS

# A limit between the tiny lengths' dense-eager probability sizes (L=64: 0.15 MB, L=128: 0.59 MB), so
# one length runs dense eager and the other reports why it skipped it.
EAGER_LIMIT_GB = "0.0004"


def _run(tmp_path, *extra: str) -> tuple[dict, str]:
    parser = argparse.ArgumentParser(prog="atp-viz")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.register(sub)
    out = tmp_path / "bench.json"
    # One thread: on a busy 2-core box, multi-threaded LAPACK calls can stall for seconds each.
    args = parser.parse_args(["bench", "--tiny", "--json", str(out), "--threads", "1", "--quiet", *extra])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text()), str(out)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    data, _ = _run(tmp_path_factory.mktemp("bench"), "--eager-limit-gb", EAGER_LIMIT_GB)
    return data


def _numbers(obj, path=""):
    """Every (path, number) in a JSON tree (bools are not numbers)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, obj


def _timing(t):
    assert set(t) >= {"repeats_s", "median_s", "min_s"}
    assert len(t["repeats_s"]) == 2  # --tiny: 2 repeats
    assert all(s > 0 and math.isfinite(s) for s in t["repeats_s"])
    assert t["min_s"] == min(t["repeats_s"])
    assert min(t["repeats_s"]) <= t["median_s"] <= max(t["repeats_s"])


def test_register_adds_bench_with_defaults():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench"])
    assert args.func is bench.run
    assert not args.tiny and not args.no_model and args.threads is None and args.json is None
    assert timing.parse_lengths("512,1024,2048,4096,8192") == layer.DEFAULT_LENGTHS
    assert timing.parse_ranks(layer.DEFAULT_RANKS) == ("64", "128", "L/8")
    assert timing.ranks_for(("64", "128", "L/8"), 1024) == [(64, ["64"]), (128, ["128", "L/8"])]
    assert timing.ranks_for(("64",), 32) == [(32, ["64"])]  # clamped to L
    for bad in ("0", "x", "L/0", ""):
        with pytest.raises(ValueError):
            timing.parse_ranks(bad)


def test_json_structure_and_settings(result):
    assert result["schema"] == "atp_viz.bench/1"
    s = result["settings"]
    assert s["lengths"] == [64, 128] and s["ranks"] == ["8", "16"] and s["repeats"] == 2 and s["tiny"]
    assert s["threads"] == 1
    m = result["machine"]
    assert m["torch_version"] == torch.__version__ and m["torch_threads"] == 1 and m["device"] == "cpu"
    assert isinstance(m["cpu_model"], str) and m["cpu_model"]
    layer = result["layer"]
    assert layer["geometry"] == {"d": 576, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}
    assert "profile_memory=True" in layer["memory_method"]
    assert "excluded" in layer["projections"]
    assert [row["L"] for row in layer["lengths"]] == [64, 128]
    for row in layer["lengths"]:
        combos = {(a["rank"], a["basis_method"]) for a in row["atp"]}
        assert combos == {(r, m) for r in (8, 16) for m in METHODS}


def test_all_numbers_finite_and_timings_positive(result):
    nums = list(_numbers(result))
    assert nums
    for path, x in nums:
        assert math.isfinite(x), path
        if "next_token_kl" in path:
            assert x > -1e-9, path  # a KL divergence, up to rounding
        elif "load_average" not in path:
            assert x > 0, path
    layer = result["layer"]
    for row in layer["lengths"]:
        _timing(row["dense_sdpa"])
        assert row["dense_sdpa"]["peak_bytes"] > 0
        if "skipped" not in row["dense_eager"]:
            _timing(row["dense_eager"])
            assert row["dense_eager"]["peak_bytes"] > 0
        for a in row["atp"]:
            for part in ("total", "basis", "attention"):
                _timing(a[part])
            assert a["peak_bytes"] > 0 and a["madds"]["attention"] > 0


def test_ratios_are_ratios_of_the_reported_medians(result):
    for row in result["layer"]["lengths"]:
        sdpa, eager = row["dense_sdpa"], row["dense_eager"]
        for a in row["atp"]:
            med = a["total"]["median_s"]
            assert a["speedup_vs_dense_sdpa"] == pytest.approx(sdpa["median_s"] / med, rel=1e-12)
            assert a["memory_vs_dense_sdpa"] == pytest.approx(a["peak_bytes"] / sdpa["peak_bytes"], rel=1e-12)
            if "skipped" in eager:
                continue
            assert a["speedup_vs_dense_eager"] == pytest.approx(eager["median_s"] / med, rel=1e-12)
            assert a["memory_vs_dense_eager"] == pytest.approx(
                a["peak_bytes"] / eager["peak_bytes"], rel=1e-12
            )
    model = result["model"]
    for run in model["atp"].values():
        assert run["speedup_vs_dense"] == pytest.approx(
            model["dense"]["median_s"] / run["median_s"], rel=1e-12
        )


def test_skipped_entries_say_why(result):
    rows = {row["L"]: row for row in result["layer"]["lengths"]}
    assert "skipped" not in rows[64]["dense_eager"]
    eager = rows[128]["dense_eager"]
    assert eager["skipped"].startswith("skipped: would need") and "GB" in eager["skipped"]
    assert eager["median_s"] is None and eager["peak_bytes"] is None
    for a in rows[128]["atp"]:
        assert a["speedup_vs_dense_eager"] is None and a["speedup_vs_dense_eager_skipped"] == eager["skipped"]
        assert a["memory_vs_dense_eager"] is None and a["memory_vs_dense_eager_skipped"] == eager["skipped"]

    def nulls(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if v is None:
                    yield obj, k, f"{path}.{k}"
                else:
                    yield from nulls(v, f"{path}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from nulls(v, f"{path}[{i}]")

    for parent, key, path in nulls(result["layer"]):
        if path.endswith(".crossover_L"):
            continue  # None = ATP is not faster within the measured lengths (a result, not a skip)
        reason = parent.get("skipped") or parent.get(f"{key}_skipped")
        assert isinstance(reason, str) and reason, f"{path} is null without a reason"


def test_model_part_and_crossover(result):
    model = result["model"]
    assert model["model"] == "tiny-llama" and model["n_tokens"] == 64
    _timing_runs = [model["dense"], *model["atp"].values()]
    for t in _timing_runs:
        assert len(t["repeats_s"]) == 1 and t["median_s"] > 0
    assert {(r["form"], r["basis_method"]) for r in model["atp"].values()} == {
        (f, m) for f in forms.names() for m in METHODS
    }  # every registered form, with every basis method
    cross = result["layer"]["crossover"]
    assert {(c["rank_spec"], c["basis_method"]) for c in cross} == {
        (r, m) for r in ("8", "16") for m in METHODS
    }
    for c in cross:
        assert c["crossover_L"] is None or c["crossover_L"] in c["faster_than_sdpa_at"]


def test_no_model_and_table(tmp_path, capsys):
    data, out = _run(tmp_path, "--no-model", "--lengths", "64", "--ranks", "8,L/8", "--repeats", "1")
    assert data["model"]["skipped"].startswith("skipped")
    assert data["settings"]["model"] is False
    row = data["layer"]["lengths"][0]
    assert [a["rank_spec"] for a in row["atp"] if a["basis_method"] == "exact"] == [["8", "L/8"]]
    printed = capsys.readouterr().out
    assert "dense SDPA" in printed and "dense eager" in printed and "ATP r=8" in printed
    assert "Whole-model prefill: skipped" in printed


def test_layer_paths_agree_numerically():
    """The bench's paths compute what they claim: SDPA equals the eager path; full-rank ATP is finite."""
    t = layer.layer_inputs(32)
    with torch.inference_mode():
        sdpa = layer.dense_sdpa(t["q"], t["k"], t["v"])  # (1, H, L, dh)
        eager = layer.dense_eager(t["q"], t["k"], t["v"])  # (1, L, H, dh)
        torch.testing.assert_close(sdpa.transpose(1, 2), eager, atol=1e-5, rtol=1e-4)
        out = layer.atp_layer(t["x"], t["q"], t["k"], t["v"], 8, "randomized")
    assert out.shape == sdpa.shape and torch.isfinite(out).all()


def test_median_interval_from_order_statistics():
    assert timing.median_ci([1, 2, 3, 4, 5]) is None  # too few for 95%
    assert timing.median_ci(list(range(1, 7))) == (1, 6)
    assert timing.median_ci(list(range(10, 0, -1))) == (2, 9)  # sorted first
    assert timing.median_ci(list(range(1, 31))) == (10, 21)  # the textbook pair for n = 30


def test_paths_repeat_until_their_median_is_known(monkeypatch):
    """A path whose times scatter widely runs again (up to the cap); a steady one stops at the minimum."""
    clock = iter(range(10**6))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    calls = {"steady": 0, "noisy": 0}
    widths = iter([1, 30] * 100)

    def steady():
        calls["steady"] += 1

    def noisy():
        calls["noisy"] += 1
        for _ in range(next(widths)):  # alternately 1 and 30 clock ticks: the interval never narrows
            next(clock)

    times = timing.time_paths(
        {"steady": steady, "noisy": noisy}, repeats=6, warmup=0, device="cpu", max_repeats=15
    )
    assert len(times["steady"]) == 6 and timing.summary(times["steady"])["converged"]
    assert len(times["noisy"]) == 15 and not timing.summary(times["noisy"])["converged"]


def test_inconsistent_rows_are_flagged():
    def t(median, lo, hi):
        return {"median_s": median, "median_ci_s": [lo, hi]}

    row = {
        "atp": [
            {"rank": 64, "basis_method": "exact", "total": t(1.0, 0.9, 1.1), "basis": t(1.3, 1.2, 1.4),
             "attention": t(0.2, 0.1, 0.3)},
            {"rank": 128, "basis_method": "exact", "total": t(0.5, 0.45, 0.55), "basis": t(0.3, 0.2, 0.4),
             "attention": t(0.2, 0.1, 0.3)},
        ]
    }  # fmt: skip
    flags = layer.inconsistencies(row)
    assert any("basis alone slower" in f for f in flags) and any("r=128 faster than r=64" in f for f in flags)
    row["atp"][0]["basis"] = t(0.5, 0.4, 0.6)
    row["atp"][1]["total"] = t(1.2, 1.1, 1.3)
    assert layer.inconsistencies(row) == []


def test_prefill_with_an_exact_full_rank_past_is_dense_and_reports_every_key(tmp_path):
    """bench --prefill times dense and ATP and scores both on the same positions: with the exact form and
    as many principal keys as past tokens, ATP prefill is dense attention, so perplexities agree and every
    top-1 prediction matches (a misaligned scoring or a leaky chunk would not)."""
    out = tmp_path / "prefill.json"
    argv = ["bench", "--prefill", "--model", "tiny-llama", "--tokens", "96", "--rank", "96", "--chunk", "32",
            "--form", "exact", "--basis-method", "exact", "--repeats", "1", "--max-repeats", "1",
            "--json", str(out), "--quiet"]  # fmt: skip
    from atp_viz.cli import main

    assert main(argv) == 0
    r = json.loads(out.read_text())
    for key in ("dense_seconds", "atp_seconds", "speedup", "ceiling", "dense_perplexity", "atp_perplexity",
                "top1_agreement"):  # fmt: skip
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["speedup"] == pytest.approx(r["dense_seconds"] / r["atp_seconds"])
    assert r["ceiling"] == pytest.approx(r["macs"]["dense_total"] / r["macs"]["atp_total"])
    assert r["atp_perplexity"] == pytest.approx(r["dense_perplexity"], rel=1e-4)
    assert r["top1_agreement"] == 1.0 and r["n_scored"] == 96 - 32 - 1
    assert sum(r["scored_per_module"].values()) == r["n_scored"]
    argv[argv.index("--rank") + 1] = "2"  # two principal keys of a 32-wide input: the past is squeezed
    assert main(argv) == 0
    low = json.loads(out.read_text())
    assert low["atp_perplexity"] != pytest.approx(low["dense_perplexity"], rel=1e-4)
    assert low["dense_perplexity"] == pytest.approx(r["dense_perplexity"], rel=1e-6)
    assert low["ceiling"] > r["ceiling"]


def test_prefill_times_dense_sdpa_not_eager(monkeypatch):
    """The dense side of bench --prefill is the model with torch SDPA (what dense_how says): a bare model
    call runs the backend's eager attention, which holds every L x L probability."""
    from atp_viz.analysis.bench import prefill
    from atp_viz.hf import backend
    from atp_viz.hf.models import load_model

    def no_eager(*args, **kwargs):
        raise AssertionError("dense prefill ran eager attention")

    monkeypatch.setattr(backend, "eager_attention", no_eager)
    loaded = load_model("tiny-llama")
    r = prefill.run_prefill(loaded, 64, form="linear", rank=4, chunk=16, repeats=1, max_repeats=1)
    assert "SDPA" in r["dense_how"] and r["dense_seconds"] > 0


def test_prefill_counts_the_projections_and_head_and_refuses_bad_settings():
    from atp_viz.analysis.bench import prefill
    from atp_viz.hf.models import load_model

    loaded = load_model("tiny-llama")
    per_token = prefill.linear_macs_per_token(loaded.model)
    i = loaded.info
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    assert per_token > vocab * i.d_model  # the LM head, and every layer's projections on top
    macs = prefill.counted_macs(
        loaded, 96, rank=8, form="linear", chunk=32, basis_from="input", method="exact"
    )
    assert macs["linear_layers"] == 96 * per_token
    assert macs["dense_attention"] == i.n_layers * i.n_heads * 96 * 97 * i.head_dim
    bad = ((dict(rank=0.5), "an int"), (dict(rank=8, chunk=96), "smaller than"), (dict(form="x"), "'x'"))
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            prefill.run_prefill(loaded, 96, **{"form": "exact", "rank": 8, "chunk": 32, **kw})
    enc = load_model("tiny-bert")
    with pytest.raises(ValueError, match="decoder"):
        prefill.run_prefill(enc, 32, form="exact", rank=4)
