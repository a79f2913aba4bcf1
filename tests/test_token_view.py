"""Per-token views and attention maps that show structure: the maths of one query's view, attention
sinks, colour scales, and the default map on both bundled models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atp_viz.analysis import compare, token_view
from atp_viz.figures import maps
from atp_viz.figures import tokens as tokens_fig
from atp_viz.hf.engine import ATPConfig
from atp_viz.text.inputs import readable_tokens, tokenize

TEXT = "Attention on top principal keys keeps the few directions that carry most of the energy of a text."


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- attention sinks ---------------------------------------------------------------------------------


def test_sink_columns_finds_a_column_that_takes_most_of_every_row():
    rng = np.random.default_rng(0)
    L = 60
    s = rng.normal(size=(L, L))
    assert token_view.sink_columns(_softmax_rows(s)) == ()  # no column stands out
    s[:, 0] += 4.0  # the first token takes most of each row's weight
    s[:, 7] += 2.5
    sinks = token_view.sink_columns(_softmax_rows(s))
    assert sinks[0] == 0 and set(sinks) <= {0, 7}
    with pytest.raises(ValueError, match="non-empty"):
        token_view.sink_columns(np.zeros((0, 0)))


def test_sink_columns_needs_more_than_a_uniform_share_on_short_texts():
    uniform = np.full((4, 4), 0.25)  # 25% each: above SINK_SHARE, but just 1/L
    assert token_view.sink_columns(uniform) == ()


# ---- one query ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_maps(load):
    """Maps of layer 1, head 2 of the tiny Llama, exact and linear form, r = 5."""
    m = load("tiny-llama")
    tok = tokenize(m.tokenizer, TEXT, m.info.max_tokens)
    from atp_viz.analysis.capture import capture

    cap = capture(m, tok, attentions="all")
    out = {}
    for form in ("exact", "linear"):
        run = compare.forward(m, tok, ATPConfig(rank=5, form=form), map_layers=[1])
        out[form] = compare.attention_maps(cap.layers[1].attn, run, 1, 2)
    return out, readable_tokens(cap.tokens)


def test_query_view_reads_the_maps_row(tiny_maps):
    maps_by_form, tokens = tiny_maps
    mp = maps_by_form["exact"]
    q = len(tokens) - 3
    view = token_view.query_view(mp, q)
    np.testing.assert_array_equal(view.dense, mp.dense[q])
    np.testing.assert_array_equal(view.atp, mp.lifted[q])
    assert view.weights.shape == (5,) and (view.weights >= 0).all()
    assert list(view.order) == sorted(range(5), key=lambda a: -view.weights[a])
    assert view.loadings.shape == (len(tokens), 5)
    with pytest.raises(ValueError, match="query token must be an index"):
        token_view.query_view(mp, len(tokens))


def test_linear_form_row_is_the_sum_of_its_principal_keys(tiny_maps):
    """The linear form's map is over principal keys: its token row is sum_a weight_a U_r[:, a]."""
    mp = tiny_maps[0]["linear"]
    for q in (0, 4, mp.dense.shape[0] - 1):
        view = token_view.query_view(mp, q)
        np.testing.assert_allclose(view.through_keys, view.atp, rtol=1e-4, atol=1e-5)


def test_query_view_does_not_depend_on_the_sign_of_a_basis_vector(tiny_maps):
    """U_r and U_r with a column negated span the same keys; the view must not change."""
    from dataclasses import replace

    mp = tiny_maps[0]["linear"]
    flip = np.array([1.0, -1.0, 1.0, -1.0, -1.0])
    flipped = replace(mp, basis=mp.basis * flip, principal=mp.principal * flip)
    for q in (1, 6):
        a, b = token_view.query_view(mp, q), token_view.query_view(flipped, q)
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6)
        np.testing.assert_allclose(a.loadings, b.loadings, rtol=1e-6, atol=1e-7)


def test_token_figures_name_the_tokens(tiny_maps):
    mp = tiny_maps[0]["exact"]
    tokens = tiny_maps[1]
    view = token_view.query_view(mp, 3)
    fig = tokens_fig.query_attention_figure(view, tokens, atp_label="ATP exact", causal=True)
    labels = maps.axis_labels(tokens)
    assert [t.name for t in fig.data] == ["dense", "ATP exact"]
    assert list(fig.data[0].x) == labels and np.allclose(fig.data[1].y, view.atp)
    assert labels[3] in fig.layout.title.text and "keys after the query" in fig.layout.title.text
    assert any(s.type == "rect" for s in fig.layout.shapes)  # the future keys of a decoder, shaded
    fig = tokens_fig.principal_keys_figure(view, tokens, n_keys=2)
    assert len(fig.data) == 3  # the ranking, then two keys' loadings
    np.testing.assert_allclose(fig.data[0].y, view.weights[view.order])
    a = view.order[0]
    np.testing.assert_allclose(fig.data[1].y, view.loadings[:, a])
    assert f"principal key {a + 1}" in fig.layout.annotations[1].text


# ---- colour scales -----------------------------------------------------------------------------------


def test_log_scale_spans_the_top_decades_and_blanks_zeros():
    m = np.array([[1.0, 0.0, 1e-2], [1e-6, 0.5, 0.2]])
    c = maps.colours(m, "log")
    assert c.zmax == pytest.approx(0.0) and c.zmin == pytest.approx(-maps.LOG_DECADES)
    assert np.isnan(c.z[0, 1]) and c.z[0, 2] == pytest.approx(-2.0)
    assert c.transformed and c.colorbar["ticktext"][-1] == "1e+00"


def test_hidden_columns_are_blank_and_out_of_the_colour_range():
    m = np.full((5, 5), 0.05)
    m[:, 0] = 0.8
    c = maps.colours(m, "linear", hidden_cols=[0])
    assert np.isnan(c.z[:, 0]).all() and c.zmax == pytest.approx(0.05)


def test_rank_scale_orders_each_row_and_clip_stops_at_the_percentile():
    m = np.array([[0.1, 0.5, 0.4], [3.0, 1.0, 2.0]])
    c = maps.colours(m, "rank")
    np.testing.assert_allclose(c.z, [[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
    big = np.arange(1000.0).reshape(10, 100)
    assert maps.colours(big, "clip").zmax == pytest.approx(np.percentile(big, maps.CLIP_PERCENTILE))


def test_signed_maps_get_a_diverging_scale_centred_on_zero():
    m = np.array([[0.5, -0.25], [0.001, -0.0001]])
    for scale in maps.SCALES:
        c = maps.colours(m, scale)
        assert c.colorscale == "RdBu_r" and c.zmin == pytest.approx(-c.zmax), scale
    c = maps.colours(m, "log")
    assert c.z[0, 0] > 0 > c.z[0, 1] and c.z[1, 1] == 0.0  # below 1% of the top: drawn as 0
    with pytest.raises(ValueError, match="scale must be one of"):
        maps.colours(m, "cubic")


def test_heatmap_names_tokens_on_hover_and_outlines_the_causal_triangle():
    tokens = ["The", " cat", " sat", " the"]
    m = np.tril(np.ones((4, 4)))
    m /= m.sum(axis=1, keepdims=True)
    labels = maps.axis_labels(tokens)
    assert labels == ["The #0", "cat #1", "sat #2", "the #3"]
    fig = maps.attention_heatmap(m, title="t", row_labels=labels, col_labels=labels, causal=True)
    trace = fig.data[0]
    assert list(trace.x) == labels and list(trace.y) == labels  # hover names both tokens
    assert "%{y}" in trace.hovertemplate and "%{customdata" in trace.hovertemplate
    np.testing.assert_allclose(trace.customdata, m)  # the raw weight, whatever the colours show
    assert list(fig.layout.xaxis.ticktext) == labels  # small maps: every token on the axes
    (outline,) = [s for s in fig.layout.shapes if s.type == "path"]
    assert outline.path.startswith("M -0.5 -0.5 H 0.5 V 0.5") and outline.path.endswith("H -0.5 Z")
    fig = maps.attention_heatmap(m, title="t", row_labels=labels, col_labels=labels, scale="linear")
    assert not fig.layout.shapes and fig.data[0].customdata is None
    assert maps.axis_labels(["a"] * 10, block=4) == ["#0-3", "#4-7", "#8-9"]


def test_sinks_leave_a_block_before_it_is_averaged_not_the_whole_block():
    """On a long text the map is averaged in blocks; a sink column is taken out before, so the block
    that holds it shows its other tokens (blanking after averaging hid a whole block per sink), and the
    title names the sink token. Drawn token by token, the sink's own column is blank."""
    L, size = 60, 20  # blocks of 3 tokens
    m = np.tril(np.full((L, L), 0.01))
    m[:, 0] = 0.7
    m[:, 1] = np.tril(np.full((L, L), 0.02))[:, 1]
    tokens = [f"t{i}" for i in range(L)]
    fig = maps.token_map(m, tokens, title="t", max_size=size, sinks=[0], scale="linear")
    raw = np.asarray(fig.data[0].z, dtype=float)
    assert raw.shape == (20, 20) and list(fig.data[0].x)[0] == "#0-2"
    # block (rows 3-5, keys 0-2): the mean of keys 1 and 2 only, the sink left out
    assert raw[1, 0] == pytest.approx((0.02 + 0.01) / 2, rel=1e-6)
    assert "left out: t0 #0" in fig.layout.title.text
    whole = maps.token_map(m[:8, :8], tokens[:8], title="t", sinks=[0], scale="linear")
    z = np.asarray(whole.data[0].z, dtype=float)
    assert np.isnan(z[:, 0]).all() and np.isfinite(z[:, 1][1:]).all()
    principal = maps.token_map(m[:8, :4], tokens[:8], title="t", principal=True, sinks=[0])
    assert list(principal.data[0].x) == ["key 1", "key 2", "key 3", "key 4"]  # sinks are key tokens


# ---- the default map shows structure on both bundled models ----------------------------------------


def _colour_spread_outside_top_column(fig, m: np.ndarray) -> float:
    """How much of the figure's colour range the cells outside the heaviest key column use: the
    distance between their 10th and 90th percentile colours, as a share of the range (0 = one colour)."""
    tr = fig.data[0]
    z, lo, hi = np.asarray(tr.z, dtype=float), tr.zmin, tr.zmax
    top = int(np.argmax(np.nanmean(m, axis=0)))
    keep = np.ones(m.shape, bool)
    keep[:, top] = False
    if np.allclose(np.triu(m, 1), 0):  # causal: only the cells a query may attend to
        keep &= np.tril(np.ones(m.shape, bool))
    pos = (np.clip(np.nan_to_num(z[keep], nan=lo), lo, hi) - lo) / (hi - lo)
    return float(np.percentile(pos, 90) - np.percentile(pos, 10))


@pytest.mark.bundled
@pytest.mark.parametrize("key", ["minilm", "smollm2"])
def test_default_map_spends_its_colours_on_more_than_one_column(load, key):
    """The explorer's default map (middle layer, head 0, the default sample, default scale) spreads the
    attention of the other key columns over the colour range; the linear scale does not (it spends the
    range on the sink column and the first causal rows: a dark square)."""
    from atp_viz.analysis.capture import capture

    m = load(key)
    text = (Path(__file__).resolve().parent.parent / "data" / "04_attention_explainer.txt").read_text()
    cap = capture(m, text, attentions=[m.info.n_layers // 2])
    dense = cap.layers[m.info.n_layers // 2].attn[0]
    labels = maps.axis_labels(readable_tokens(cap.tokens))
    spread = {}
    for scale in (maps.DEFAULT_SCALE, "linear"):
        fig = maps.attention_heatmap(
            dense, title="", row_labels=labels, col_labels=labels, scale=scale, causal=m.info.is_decoder
        )
        json.dumps(fig.to_plotly_json(), default=str)  # serialisable as sent to the browser
        spread[scale] = _colour_spread_outside_top_column(fig, dense)
    assert spread[maps.DEFAULT_SCALE] >= 0.3, spread
    assert spread["linear"] < 0.05, spread  # what the issue saw: the range spent on one column
