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
        (f, m) for f in ("linear", "exact") for m in METHODS
    }
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
