"""The evaluation protocol: held-out data from every module, near-duplicates kept out of training,
one definition of rank for decoders, paired intervals that cover what they should."""

from __future__ import annotations

import numpy as np
import pytest

from atp_viz.analysis import protocol
from atp_viz.analysis.finetune.data import encoder_texts
from atp_viz.core.ranks import attended_share, chunk_rank
from atp_viz.text import corpus


def test_heldout_windows_come_from_every_module_and_are_deterministic(load):
    tok = load("tiny-llama").tokenizer
    w = protocol.heldout_windows(tok, 256)
    again = protocol.heldout_windows(tok, 256)
    assert len(w.ids) > 20 and all(a.equal(b) for a, b in zip(w.ids, again.ids, strict=True))
    seen = {w.module_names[k] for owner in w.module_of for k in owner}
    assert seen == {m for m in corpus.HELDOUT_MODULES if corpus.module_docstrings(m)}
    few = protocol.heldout_windows(tok, 256, max_windows=5)
    assert len(few.ids) == 5  # an evenly spread subset, not the first five
    spread = [next(i for i, a in enumerate(w.ids) if a.equal(b)) for b in few.ids]
    assert spread[-1] > len(w.ids) // 2


def test_training_split_windows_hold_no_heldout_module(load):
    """Windows of the training split (where a setting may be chosen) come from its modules only."""
    tok = load("tiny-llama").tokenizer
    train = protocol.module_windows(tok, corpus.TRAIN_MODULES, 512, max_windows=4)
    assert len(train.ids) == 4
    seen = {train.module_names[k] for owner in train.module_of for k in owner}
    assert seen and seen <= set(corpus.TRAIN_MODULES) and not seen & set(corpus.HELDOUT_MODULES)


def test_heldout_texts_interleave_every_module(load):
    tok = load("tiny-bert").tokenizer
    texts, modules = protocol.heldout_texts(tok, max_texts=30)
    assert len(texts) == 30 and len(set(modules)) >= 20  # the first 30 already span most modules
    counts = protocol.counts_by(modules)
    assert sum(counts.values()) == 30


def test_no_training_text_nearly_duplicates_a_heldout_one(load):
    held = [d for m in corpus.HELDOUT_MODULES for d in corpus.module_docstrings(m)]
    train = corpus.docstrings(corpus.TRAIN_MODULES)
    assert not any(corpus.near_duplicates(train, held))
    # What the filter catches beyond exact matches: case, punctuation and spacing, shared paragraphs.
    ref = ["Return the cumulative sum of the values.\n\nRaises ValueError when the input holds NaN values."]
    docs = [
        "return the CUMULATIVE sum of the values!",  # short: only an exact normalised match counts
        "Return the cumulative sum of the values.",
        "A new docstring.\n\nRaises ValueError when the input holds NaN values.",
        "Something else entirely, long enough to be checked for containment in the reference text.",
    ]
    assert corpus.near_duplicates(docs, ref, min_chars=40) == [False, False, True, False]
    assert corpus.near_duplicates(
        ["Return the cumulative sum of the values."], ["return the cumulative SUM of the values"]
    )
    tok = load("tiny-bert").tokenizer
    assert not set(encoder_texts(corpus.TRAIN_MODULES[:5], tok)) & set(protocol.heldout_texts(tok)[0])


@pytest.mark.parametrize("n_past", [128, 256, 384])
def test_effective_rank_gives_the_share_of_the_key_set(n_past):
    for share in (0.5, 0.25):
        r = chunk_rank(share, n_past, 128, "effective")
        got = np.mean(attended_share(r, n_past, 128))
        if r > 1:
            assert got == pytest.approx(share, abs=0.01)
        else:  # even one principal key gives more: the achieved share is what is reported
            assert got > share
    # "past": a share of the past only; the exact current chunk comes on top
    r = chunk_rank(0.5, 128, 128, "past")
    assert r == 64 and np.mean(attended_share(r, 128, 128)) > 0.6
    assert chunk_rank(16, 128, 128, "effective") == 16  # an int is a number of principal keys in any mode


def test_mean_share_matches_the_positions_scored():
    """A window of 512 in chunks of 128 with r = L/2 of the past: the 0.61 L the issue measured."""
    assert protocol.mean_share(0.5, 512, 128, "past") == pytest.approx(0.606, abs=0.005)
    assert protocol.mean_share(0.25, 512, 128, "past") == pytest.approx(0.41, abs=0.01)
    assert protocol.mean_share(0.5, 512, 128, "effective") == pytest.approx(0.5, abs=0.005)
    assert protocol.mean_share(None, 512, 128, "past") == 1.0


def test_paired_interval_is_tighter_than_unpaired_and_covers_the_truth():
    """Two settings that agree on most positions: the paired interval of their difference is narrow and
    contains the true difference; a shift of 2 points is detected."""
    rng = np.random.default_rng(0)
    base = [rng.random(380) < 0.5 for _ in range(60)]
    shifted = [b.copy() for b in base]
    for s in shifted:  # flip 2% of the positions from hit to miss
        idx = np.flatnonzero(s)[: int(0.02 * s.size)]
        s[idx] = False
    a = protocol.DecoderScores(hits=shifted, nll=[np.ones(380)] * 60, modules=[np.zeros(380, int)] * 60)
    b = protocol.DecoderScores(hits=base, nll=[np.ones(380)] * 60, modules=[np.zeros(380, int)] * 60)
    windows = protocol.Windows(ids=(), module_of=(), module_names=("m",))
    row = protocol.decoder_summary(a, windows, b)
    lo, hi = row["top1_minus_reference_ci"]
    true = row["top1_minus_reference"]
    assert lo <= true <= hi < 0 and hi - lo < 0.005  # paired: the shared noise cancels
    tlo, thi = row["top1_ci"]
    assert thi - tlo > 5 * (hi - lo)  # one setting alone is much less certain
    assert row["scored_per_module"] == {"m": 60 * 380}


def test_interval_formatting():
    assert protocol.interval(0.4821, (0.471, 0.4932)) == "0.482 [0.471, 0.493]"
    assert protocol.interval(-0.012, (-0.018, -0.006), 1, scale=100) == "-1.2 [-1.8, -0.6]"
    assert protocol.interval(186085779.65, (1.48e8, 2.38e8), 2) == "1.86e+08 [1.48e+08, 2.38e+08]"
