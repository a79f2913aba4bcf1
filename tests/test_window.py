"""Sinks and a sliding window read exactly, the middle of the past compressed (``serving.ExactKeep``)."""

from __future__ import annotations

import pytest
import torch

from atp_viz import forms
from atp_viz.analysis import serving

L, CHUNK = 64, 8


def _ids(seed=0, n=L):
    return torch.randint(5, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


def _window_mask(n: int, chunk: int, sinks: int, window: int) -> torch.Tensor:
    """The additive 4-D mask of 'sinks + the window before each chunk + the chunk itself, causally'."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    start = (i // chunk) * chunk
    allowed = (j <= i) & ((j < sinks) | (j >= start - window))
    return torch.where(allowed, 0.0, float("-inf"))[None, None]


@pytest.mark.parametrize(("sinks", "window"), [(0, 8), (2, 16), (4, 24), (10, 4)])
def test_the_window_alone_is_the_model_under_the_window_mask(load, sinks, window):
    """Dropping the middle is dense attention restricted to the sinks, the window and the chunk: the
    model itself run with that mask (transformers' custom 4-D attention mask)."""
    loaded = load("tiny-llama")
    ids = _ids()
    keep = serving.ExactKeep(sinks, window, drop_rest=True)
    with torch.inference_mode():
        ref = loaded.model(input_ids=ids, attention_mask=_window_mask(L, CHUNK, sinks, window)).logits[0]
        got = serving.chunked_logits(loaded, ids, rank=None, chunk=CHUNK, keep=keep)
        dense = serving.chunked_logits(loaded, ids, rank=None, chunk=CHUNK)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)  # the mask really drops something


@pytest.mark.parametrize("form", ["linear", "pksoftmax"])
def test_the_window_alone_ignores_rank_and_form(load, form):
    """Dropping the middle is one softmax over what is read, whatever rank and form a caller passes."""
    loaded = load("tiny-llama")
    ids = _ids(7)
    drop = serving.ExactKeep(2, 16, drop_rest=True)
    with torch.inference_mode():
        alone = serving.chunked_logits(loaded, ids, rank=None, chunk=CHUNK, keep=drop)
        asked = serving.chunked_logits(loaded, ids, rank=4, form=form, chunk=CHUNK, keep=drop)
    torch.testing.assert_close(asked, alone, atol=0, rtol=0)


def test_a_full_rank_middle_under_the_exact_form_is_dense(load):
    loaded = load("tiny-llama")
    ids = _ids(1)
    keep = serving.ExactKeep(2, 16)
    with torch.inference_mode():
        dense = serving.chunked_logits(loaded, ids, rank=None, chunk=CHUNK)
        full = serving.chunked_logits(loaded, ids, rank=10_000, form="exact", chunk=CHUNK, keep=keep)
        low = serving.chunked_logits(loaded, ids, rank=2, form="exact", chunk=CHUNK, keep=keep)
    torch.testing.assert_close(full, dense, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(low, dense, atol=1e-3)


@pytest.mark.parametrize("form", ["exact", "pksoftmax"])
def test_a_window_longer_than_the_text_leaves_nothing_to_compress(load, form):
    """With every past token in the window no principal key is made: softmax forms give dense."""
    loaded = load("tiny-llama")
    ids = _ids(2)
    with torch.inference_mode():
        dense = serving.chunked_logits(loaded, ids, rank=None, chunk=CHUNK)
        got = serving.chunked_logits(
            loaded, ids, rank=2, form=form, chunk=CHUNK, keep=serving.ExactKeep(0, L)
        )
    torch.testing.assert_close(got, dense, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("form", forms.names())
@pytest.mark.parametrize("update", ["recompute", "moments"])
def test_no_later_token_reaches_an_earlier_logit(load, form, update):
    if update == "moments" and forms.get(form).needs_basis_rows:
        pytest.skip("running sums do not keep U_r")
    loaded = load("tiny-llama")
    ids = _ids(3)
    j = 5 * CHUNK + 3
    other = ids.clone()
    other[0, j] = 7
    kw = dict(
        rank=3, form=form, chunk=CHUNK, basis_from="keys", basis_update=update, keep=serving.ExactKeep(2, 16)
    )
    with torch.inference_mode():
        a = serving.chunked_logits(loaded, ids, **kw)
        b = serving.chunked_logits(loaded, other, **kw)
    torch.testing.assert_close(a[:j], b[:j], atol=0, rtol=0)
    assert not torch.allclose(a[j], b[j])


@pytest.mark.parametrize(("sinks", "window"), [(3, 16), (10, 4), (3, 5)])
def test_running_sums_behind_the_window_equal_the_recomputed_middle(load, sinks, window):
    """The tokens that leave the window go to the running sums: the same principal keys as an SVD of the
    middle (the linear form does not depend on the basis vectors' signs); also with sinks spanning two
    chunks and windows shorter than a chunk (tokens of the current chunk leave at once)."""
    loaded = load("tiny-llama")
    ids = _ids(4)
    keep = serving.ExactKeep(sinks, window)
    kw = dict(rank=5, form="linear", chunk=CHUNK, basis_from="keys", method="exact", keep=keep)
    with torch.inference_mode():
        a = serving.chunked_logits(loaded, ids, basis_update="moments", **kw)
        b = serving.chunked_logits(loaded, ids, basis_update="recompute", **kw)
        without = serving.chunked_logits(loaded, ids, rank=5, form="linear", chunk=CHUNK, basis_from="keys")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(a, without, atol=1e-3)


def test_the_middle_rank_counts_the_middle(load, monkeypatch):
    """A share of L is a share of the middle's tokens, not of the whole past."""
    loaded = load("tiny-llama")
    seen = []
    real = serving.compressed

    def spy(mem, rank, **kw):
        seen.append((mem.n_exact, rank))
        return real(mem, rank, **kw)

    monkeypatch.setattr(serving, "compressed", spy)
    with torch.inference_mode():
        serving.chunked_logits(loaded, _ids(5), rank=0.5, chunk=CHUNK, keep=serving.ExactKeep(4, 16))
    n_middle = [n for n, _ in seen]
    assert min(n_middle) == CHUNK * 3 - 4 - 16 and max(n_middle) == L - CHUNK - 4 - 16
    assert all(r == round(0.5 * n) for n, r in seen)


def test_bad_settings_are_refused_with_a_reason(load):
    loaded = load("tiny-llama")
    with pytest.raises(ValueError, match="token counts"):
        serving.ExactKeep(-1, 8)
    with pytest.raises(ValueError, match="middle"):
        serving.chunked_logits(
            loaded, _ids(), rank=0.5, chunk=CHUNK, rank_mode="effective", keep=serving.ExactKeep(2, 8)
        )


def test_perplexity_command_reads_sinks_and_window(tmp_path, monkeypatch, capsys):
    """``perplexity --window --sinks`` scores the window alone as a row of its own and passes the window
    and the basis source to every ATP run; a tuned model's basis is the default."""
    import json

    from atp_viz.cli import main
    from atp_viz.hf.tuned import as_tuned

    calls = []
    real = serving.chunked_logits

    def spy(loaded, ids, **kw):
        calls.append(kw)
        return real(loaded, ids, **kw)

    monkeypatch.setattr(serving, "chunked_logits", spy)
    long_text = tmp_path / "long.txt"
    long_text.write_text("Principal keys keep the directions that matter. " * 24)
    out = tmp_path / "p.json"
    argv = ["perplexity", "--model", "tiny-llama", "--text-file", str(long_text), "--seq-len", "48",
            "--chunk", "8",
            "--ranks", "4", "--forms", "exact", "--window", "16", "--sinks", "2", "--basis-from", "keys",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    d = json.loads(out.read_text())
    assert (d["basis_from"], d["exact_sinks"], d["exact_window"]) == ("keys", 2, 16)
    assert [r["rank"] for r in d["rows"]] == ["dense", "window", 4]
    assert d["rows"][1]["middle"] == "dropped" and d["rows"][2]["middle"] == "principal keys"
    assert d["rows"][1]["attended_share"] < d["rows"][2]["attended_share"] < 1.0
    atp = [kw for kw in calls if kw["rank"] == 4]
    assert atp and all(kw["keep"] == serving.ExactKeep(2, 16) and kw["basis_from"] == "keys" for kw in atp)
    no_window = [a for i, a in enumerate(argv) if "--window" not in argv[max(i - 1, 0) : i + 1]]
    assert main(no_window) == 2  # sinks without a window
    assert "need a --window" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "atp_tuning.json").write_text(json.dumps({"settings": {"form": "exact", "basis_from": "keys"}}))
    assert as_tuned(f"tuned:{run}")["basis_from"] == "keys"
    assert as_tuned("smollm2")["basis_from"] == "input"


@pytest.mark.parametrize(("form", "drop"), [("exact", True), ("exact", False), ("linear", False)])
def test_counted_prefill_cost_with_a_window_is_what_runs(load, form, drop):
    """The prefill ceiling's count of a windowed run (projections, MLP, LM head, the exact sinks and
    window, the middle's compression and attention) matches torch's FLOP counter over the run to within
    6%; the exact SVD is not a matrix product for the counter, so the basis is left out of both (and
    attention runs through torch's math path, whose products the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from atp_viz.analysis.bench import prefill

    loaded = load("tiny-llama")
    n, chunk, rank = 160, 32, 6
    keep = serving.ExactKeep(3, 40, drop_rest=drop)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        serving.chunked_logits(
            loaded, _ids(6, n), rank=None if drop else rank, form=form, chunk=chunk, basis_from="keys",
            method="exact", keep=keep,
        )  # fmt: skip
    macs = prefill.counted_macs(
        loaded, n, rank=rank, form=form, chunk=chunk, basis_from="keys", method="exact", keep=keep
    )
    assert counter.get_total_flops() / 2 == pytest.approx(
        macs["linear_layers"] + macs["atp_attention"], rel=0.06
    )
    if not drop:
        return
    wide = prefill.counted_macs(
        loaded, n, rank=rank, form=form, chunk=chunk, basis_from="keys", method="exact",
        keep=serving.ExactKeep(3, 80, drop_rest=drop),
    )  # fmt: skip
    assert wide["atp_attention"] > macs["atp_attention"]  # a wider window reads more keys exactly


def test_prefill_bench_with_a_window(tmp_path, capsys):
    """``bench --prefill --window``: a window covering the whole past is dense (every prediction agrees),
    a short one alone is not; the JSON says what ran; a sink count without a window is refused."""
    import json

    from atp_viz.cli import main

    out = tmp_path / "prefill.json"
    argv = ["bench", "--prefill", "--model", "tiny-llama", "--tokens", "96", "--rank", "4", "--chunk", "16",
            "--basis-method", "exact", "--repeats", "1", "--max-repeats", "1", "--json", str(out), "--quiet",
            "--window", "96", "--sinks", "2", "--drop-middle"]  # fmt: skip
    assert main(argv) == 0
    full = json.loads(out.read_text())
    assert (full["middle"], full["exact_window"], full["exact_sinks"]) == ("dropped", 96, 2)
    assert full["top1_agreement"] == 1.0 and full["atp_perplexity"] == pytest.approx(
        full["dense_perplexity"], rel=1e-4
    )
    argv[argv.index("--window") + 1] = "16"
    assert main(argv) == 0
    short = json.loads(out.read_text())
    assert short["atp_perplexity"] != pytest.approx(short["dense_perplexity"], rel=1e-4)
    assert full["attended_share"] == 1.0 and short["attended_share"] < 0.6  # the window's keys, no more
    assert short["ceiling"] > full["ceiling"]
    assert "nothing else of its past" in short["atp_how"]
    assert main(argv[: argv.index("--window")] + ["--sinks", "2"]) == 2
    assert "need a --window" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--window", "16"]) == 2  # not the layer bench's option
    assert "--window belongs to --prefill" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--rank", "7", "--form", "linear"]) == 2  # prefill's options: not ignored
    assert "--form, --rank belong to --prefill" in capsys.readouterr().err
    assert main(["bench", "--prefill", "--tiny", "--lengths", "64"]) == 2  # and the other way round
    assert "--lengths, --tiny belong to the layer bench" in capsys.readouterr().err
    assert main(["bench", "--model-rank", "0"]) == 2
    assert "--model-rank must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("form", "basis"), [("linear", "keys"), ("pksoftmax", "keys"), ("linear", "input")])
@pytest.mark.parametrize("keep", [None, serving.ExactKeep(3, 40)], ids=["no window", "window"])
def test_counted_basis_cost_with_running_sums_is_what_runs(load, monkeypatch, form, basis, keep):
    """The prefill count's running-sums part is the work the run does: every token appended to the
    sums (behind a window: every token leaving it, the first chunks' few included, not a steady C per
    chunk) and one eigendecomposition plus K', V' per read of a compressed past, at the rank read."""
    from atp_viz.analysis import moments
    from atp_viz.analysis.bench import prefill
    from atp_viz.core import costs

    loaded = load("tiny-llama")
    info = loaded.info
    kv = info.n_kv_heads * info.head_dim
    d_s = kv if basis == "keys" else info.d_model  # what the sums decompose
    done = {"fed": 0.0, "read": 0.0}
    append, past = moments.MomentStore.append, moments.MomentStore.past

    def counted_append(self, k, v, x):
        done["fed"] += costs.moment_sums_macs(k.shape[1], d_s, kv)
        return append(self, k, v, x)

    def counted_past(self, rank):
        done["read"] += costs.moment_basis_macs(0, d_s, rank, kv)
        return past(self, rank)

    monkeypatch.setattr(moments.MomentStore, "append", counted_append)
    monkeypatch.setattr(moments.MomentStore, "past", counted_past)
    n, chunk, rank = 192, 16, 4
    with torch.inference_mode():
        serving.chunked_logits(
            loaded, _ids(8, n), rank=rank, form=form, chunk=chunk, basis_from=basis, basis_update="moments",
            keep=keep,
        )  # fmt: skip
    macs = prefill.counted_macs(
        loaded, n, rank=rank, form=form, chunk=chunk, basis_from=basis, method="exact",
        basis_update="moments", keep=keep,
    )  # fmt: skip
    assert done["read"] > 0
    assert macs["atp_basis"] == pytest.approx(done["fed"] + done["read"], rel=1e-9)
