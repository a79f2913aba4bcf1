"""Every figure with a log axis: the axis spans its data, and no more than a decade beyond.

Plotly's autorange on a log axis counts shapes too, and reads a shape's coordinate there as log10 of
the value: ``add_vline(x=r)`` once drew the rank sweep's axis from 1 to 10^90, and ``add_hline(y=ppl)``
would stretch the perplexity chart to 10^10. The figures now get explicit ranges (``plots.fit_log_axes``)
and draw lines with ``log_vline`` / ``log_hline``; this checks the result, shapes included.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
from conftest import SENTENCE

from atp_viz.analysis import compare, spectra
from atp_viz.analysis.capture import capture
from atp_viz.figures import plots
from atp_viz.figures.tour import data as tdata
from atp_viz.figures.tour import figures as tfig


def _axis_values(fig: go.Figure, axis_name: str) -> list[float]:
    """The positive data values plotted on layout axis ``axis_name`` ("xaxis", "yaxis2", ...)."""
    letter, suffix = axis_name[0], axis_name[5:]
    out: list[float] = []
    for trace in fig.data:
        if (getattr(trace, f"{letter}axis", None) or letter) != letter + suffix:
            continue
        vals = getattr(trace, letter)
        if vals is None:
            continue
        arr = np.asarray(vals, dtype=float).ravel()
        out += arr[np.isfinite(arr) & (arr > 0)].tolist()
    return out


def log_axes_problems(fig: go.Figure) -> list[str]:
    """What is wrong with the figure's log axes (empty: each spans its data, at most a decade beyond,
    and every shape drawn on it lies inside)."""
    problems = []
    layout = fig.to_dict()["layout"]
    for name, axis in layout.items():
        if not (name.startswith(("xaxis", "yaxis")) and isinstance(axis, dict) and axis.get("type") == "log"):
            continue
        vals = _axis_values(fig, name)
        if not vals:
            continue
        if axis.get("range") is None:
            problems.append(f"{name}: no explicit range (autorange counts shapes as log10 values)")
            continue
        lo, hi = axis["range"]
        dlo, dhi = math.log10(min(vals)), math.log10(max(vals))
        if lo > dlo + 1e-9 or hi < dhi - 1e-9:
            problems.append(f"{name}: range {lo:.2f}..{hi:.2f} does not span the data {dlo:.2f}..{dhi:.2f}")
        if lo < dlo - 1 or hi > dhi + 1:
            problems.append(
                f"{name}: range {lo:.2f}..{hi:.2f} is more than a decade beyond {dlo:.2f}..{dhi:.2f}"
            )
        ref = name[0] + name[5:]  # "xaxis2" -> "x2"
        for shape in layout.get("shapes", []):
            coord = name[0]
            if shape.get(f"{coord}ref") != ref:
                continue
            for key in (f"{coord}0", f"{coord}1"):
                if not lo <= float(shape[key]) <= hi:
                    problems.append(f"{name}: a shape at {shape[key]} (log units) outside {lo:.2f}..{hi:.2f}")
    return problems


def _sweep() -> compare.Sweep:
    ranks = np.array([1, 2, 4, 9, 21, 42, 84, 169])
    errors = {"exact": np.geomspace(0.5, 1e-6, 8), "linear": np.linspace(1.1, 0.9, 8)}
    return compare.Sweep(ranks, errors, "1 - cosine", 169)


def _spectra():
    rng = np.random.default_rng(0)
    return spectra.layer_spectra([rng.normal(size=(40, 16)) * np.geomspace(1, 1e-4, 16) for _ in range(3)])


FIGURES = {
    "spectra": lambda: plots.spectra_figure(_spectra(), ["a", "b", "c"]),
    "energy": lambda: plots.energy_figure(_spectra(), ["a", "b", "c"], spectra.THRESHOLDS),
    "fraction_vs_length": lambda: plots.fraction_vs_length_figure(
        [16, 64, 256, 1024], np.array([[0.6, 0.5, 0.3, 0.2]]), ["mean"], 384, 0.9
    ),
    "token_norms": lambda: plots.token_norms_figure(
        np.array([150.0, 3.0, 2.5, 4.0]), ["<s>", "a", "b", "c"], title="t"
    ),
    "sweep": lambda: plots.sweep_figure(_sweep(), current=84),
    # The Serving page's perplexity chart: linear-form values near 1e8 and the dense line at 10.65.
    "perplexity_grid": lambda: plots.rank_grid_figure(
        {"exact": [16, 32, 64, 128], "linear": [16, 32, 64, 128]},
        {"exact": [20.5, 17.5, 15.9, 14.4], "linear": [7.7e7, 1.0e8, 1.2e8, 1.4e8]},
        10.65,
        title="t",
        y_title="perplexity",
        log_y=True,
    ),
    "top1_grid": lambda: plots.rank_grid_figure(
        {"exact": [16, 128]}, {"exact": [0.44, 0.48]}, 0.53, title="t", y_title="top-1"
    ),
    "cost_scaling": lambda: plots.cost_scaling_figure(
        [512, 1024, 8192], {"dense": [5.0, 17.4, 1100.0], "ATP": [14.4, 19.6, 117.0]}, title="t", y_title="ms"
    ),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_log_axes_span_their_data(name):
    fig = FIGURES[name]()
    assert any(
        getattr(fig.layout, a) is not None and getattr(fig.layout, a).type == "log"
        for a in ("xaxis", "yaxis", "xaxis3", "yaxis3")
    ), "the figure has a log axis"
    assert not log_axes_problems(fig), log_axes_problems(fig)


@pytest.mark.parametrize("step", ["spectrum", "cost"])
def test_tour_log_axes_span_their_data(load, step):
    cap = capture(load("tiny-llama"), SENTENCE, attentions="none")
    data = tdata.tour_data(cap, 1, 0, 4)
    fig = tfig.spectrum_figure(data) if step == "spectrum" else tfig.cost_figure(data)
    assert not log_axes_problems(fig), log_axes_problems(fig)


def test_the_check_catches_a_shape_on_a_log_axis():
    """The check itself: Plotly's own add_hline on a log axis is flagged (the bug it guards against)."""
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[10.0, 100.0, 1000.0]))
    fig.update_yaxes(type="log")
    assert "no explicit range" in " ".join(log_axes_problems(fig))
    plots.fit_log_axes(fig)
    assert not log_axes_problems(fig)
    fig.add_hline(y=50.0)  # lands at 10^50
    assert "outside" in " ".join(log_axes_problems(fig))
