"""Figure builders: arrays in, figures out, with the data they were given."""

import numpy as np

from atp_viz.analysis import compare, spectra
from atp_viz.figures import plots


def test_spectra_and_energy_figures_carry_the_spectra():
    rng = np.random.default_rng(0)
    sps = spectra.layer_spectra([rng.normal(size=(20, 8)) for _ in range(3)])
    fig = plots.spectra_figure(sps, ["a", "b", "c"])
    assert [t.name for t in fig.data] == ["a", "b", "c"]
    np.testing.assert_allclose(fig.data[1].y, sps[1].normalized)
    assert fig.layout.yaxis.type == "log"
    fig = plots.energy_figure(sps, ["a", "b", "c"], spectra.THRESHOLDS)
    np.testing.assert_allclose(fig.data[2].y, sps[2].cumulative_energy)
    assert len(fig.layout.shapes) == len(spectra.THRESHOLDS)


def test_sweep_lines():
    errors = {"exact": np.array([0.3, 0.2, 0.0]), "linear": np.array([0.9, 0.8, 0.7])}
    sw = compare.Sweep(np.array([1, 2, 4]), errors, "m", 4)
    fig = plots.sweep_figure(sw, current=2)
    assert len(fig.data) == 2  # one line per form, no "difference" line
    np.testing.assert_allclose(fig.data[1].y, errors["linear"])


def test_sweep_rank_axis_spans_its_data():
    """On a log axis Plotly reads a shape's x as log10(x): the rank lines must not stretch the axis
    (they once drew it from 1 to 10^90)."""
    ranks = np.array([1, 3, 10, 40, 169])
    sw = compare.Sweep(ranks, {"exact": np.linspace(0.5, 0, 5), "linear": np.linspace(1, 0.5, 5)}, "m", 169)
    fig = plots.sweep_figure(sw, current=84)
    lo, hi = fig.layout.xaxis.range
    assert lo <= np.log10(1) and hi >= np.log10(169)  # spans the data
    assert lo > np.log10(1) - 1 and hi < np.log10(169) + 1  # and no more than a decade beyond
    lines = [s.x0 for s in fig.layout.shapes]
    assert np.log10(84) in lines and np.log10(round(169 / 4)) in lines
    assert all(lo <= x <= hi for x in lines)
    # only the current rank is labelled: an annotation without text is drawn as "new text" by Plotly.js
    assert [a.text for a in fig.layout.annotations] == ["r = 84"]


def test_fraction_vs_length_has_the_d_over_L_ceiling():
    fig = plots.fraction_vs_length_figure([16, 64, 1024], np.array([[0.5, 0.4, 0.2]]), ["mean"], 384, 0.9)
    ceiling = fig.data[-1]
    assert ceiling.name.startswith("ceiling")
    assert ceiling.y.max() <= 1.0 and np.isclose(ceiling.y[-1], 384 / 1024)
