"""The guided tour "How ATP works": one step per idea, each built live from a model's capture.

A step is a title, a short plain-language explanation (for students and teachers), a LaTeX formula
and a function that builds a Plotly figure from a :class:`~.data.TourData`: one layer, one query head
and a rank r of one captured text. :data:`STEPS` lists them in teaching order. The attention and cost
steps show every form in :mod:`atp_viz.forms`. Library code: no Streamlit here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import plotly.graph_objects as go

from atp_viz import forms
from atp_viz.core import costs
from atp_viz.figures.tour.data import TourData
from atp_viz.figures.tour.figures import (
    attention_figure,
    cost_figure,
    principal_kv_figure,
    principal_tokens_figure,
    spectrum_figure,
    tokens_figure,
    x_figure,
)
from atp_viz.figures.tour.positivity import positivity_figure
from atp_viz.figures.tour.toy import toy_figure


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    explanation: str  # markdown; {L}, {d}, {r}, ... are filled in from TourData.facts()
    formula: str  # LaTeX for st.latex (the encoder's, or every model's when causal_formula is None)
    build: Callable[[TourData], go.Figure]
    causal_formula: str | None = None  # LaTeX for decoders (causal attention), when it differs
    uses_maps: bool = False  # draws L x L attention maps (refused above TourData.max_map_tokens)

    def explain(self, data: TourData) -> str:
        return self.explanation.format(**data.facts())

    def latex(self, data: TourData) -> str:
        """The formula for ``data``'s model: the causal one for a decoder, where the step has one."""
        return self.causal_formula if data.causal and self.causal_formula else self.formula

    def refusal(self, data: TourData) -> str | None:
        """Why this step draws no figure for ``data`` (maps above the deployment's limit), or None."""
        return data.map_refusal if self.uses_maps else None


def _forms_formula(causal: bool) -> str:
    """Every registered form's formula, one line each (the causal ones for decoders)."""
    lines = [
        rf"\text{{{name}: }} " + (forms.get(name).latex_causal if causal else forms.get(name).latex)
        for name in forms.names()
    ]
    return r"\begin{gathered}" + r"\\[4pt]".join(lines) + r"\end{gathered}"


def _cost_formula() -> str:
    unit = costs.Geometry(1, 1, 1, 1)
    parts = [r"\text{dense: } " + costs.dense_cost(1, unit).formula]
    parts += [rf"\text{{{n}: }} " + forms.get(n).attention_cost(1, 1, unit).formula for n in forms.names()]
    return r"\qquad ".join(parts) + r"\ (+\ \text{basis})"


STEPS: tuple[Step, ...] = (
    Step(
        "tokens",
        "Tokens",
        "The model first cuts the text into **tokens**: words or pieces of words. This text has **{L} "
        "tokens** (call that number L). Inside the model every token is a list of {d} numbers, its "
        "vector. The colour shows how long each token's vector is at layer {layer}; hover a cell to read "
        "its token.",
        r"\text{text} \;\to\; t_1, t_2, \dots, t_L \;\to\; x_1, x_2, \dots, x_L \in \mathbb{R}^{d}",
        tokens_figure,
    ),
    Step(
        "matrix",
        "The matrix X",
        "Stack the {L} token vectors as rows and you get one table of numbers: the matrix **X**, {L} rows "
        "(tokens) by {d} columns (features). This is exactly what attention at layer {layer} receives: "
        "its queries, keys and values are all computed from X. Vertical stripes (features that behave "
        "alike across many tokens) are a first hint that X holds much less information than its size "
        "suggests.",
        r"X = \begin{bmatrix} x_1^\top \\ \vdots \\ x_L^\top \end{bmatrix} \in \mathbb{R}^{L \times d}",
        x_figure,
    ),
    Step(
        "svd",
        "Its SVD and spectrum",
        "The singular value decomposition (SVD) writes X as a sum of simple layers, from the most to the "
        "least important. Each bar is a singular value: how much of X one layer carries. The orange curve "
        "is the **cumulative energy**, the share of X captured by the first k layers. ATP keeps the top "
        "**r = {r}** (marked), which hold **{energy}** of the energy here; X has at most min(L, d) = {m} "
        "of them. A spectrum that falls fast means a few directions describe almost all tokens: the "
        "observation ATP is built on.",
        r"X = U S V^\top = \sum_{i} \sigma_i\, u_i v_i^\top,\qquad "
        r"E(r) = \frac{\sigma_1^2 + \dots + \sigma_r^2}{\sum_i \sigma_i^2}",
        spectrum_figure,
    ),
    Step(
        "toy",
        "Principal directions in 2-D (toy example)",
        "The same idea with only 2 numbers per token, so it can be drawn. Each dot is a token. The SVD "
        "finds the direction along which the tokens spread most (orange arrow, its length set by the "
        "singular value) and the one across it. Keeping rank 1 moves each token onto the first direction "
        "(open circles): ATP does the same with r directions. The direction starts at the origin and "
        "points into the cloud, because ATP decomposes X itself, not X minus its average. On the right "
        "the basis vector is flipped: the SVD cannot tell u from -u, and the ATP output (stars) does not "
        "change, because its linear form never depends on that sign.",
        r"X \approx u_1 \sigma_1 v_1^\top,\qquad x'_1 = u_1^\top X = \sigma_1 v_1^\top,\qquad "
        r"u_1 \to -u_1:\ \text{output unchanged}",
        lambda data: toy_figure(),
    ),
    Step(
        "principal_tokens",
        "Principal tokens",
        "Instead of the {L} real tokens, ATP works with r = {r} **principal tokens**. Each principal token "
        "is a weighted mix of all real tokens (right: one column of weights U_r per principal token), and "
        "together they summarise X (left: X' has {rows}{instead}). They come out ordered: the "
        "first principal tokens carry the most energy, so the rows of X' fade from top to bottom. Mixing "
        "them back with the same weights, U_r X', gives the best possible rank-r copy of X.",
        r"X' = U_r^\top X = S_r V_r^\top \in \mathbb{R}^{r \times d},\qquad X \approx U_r X'",
        principal_tokens_figure,
    ),
    Step(
        "principal_kv",
        "Principal keys and values",
        "Attention compares each query with the **keys** and averages the **values**. ATP mixes keys and "
        "values with the same weights as the tokens: K' = U_r^T K gives {keys} and V' = "
        "U_r^T V gives {values}, each with {dh} numbers (one attention head). Shown: key/value "
        "head {kv_head} of layer {layer}. {rope_note} {gqa_note}",
        r"K' = U_r^\top K,\qquad V' = U_r^\top V \;\in\; \mathbb{R}^{r \times d_h}",
        principal_kv_figure,
    ),
    Step(
        "attention",
        "Attention over r principal keys vs L tokens",
        "Dense attention lets each of the {L} queries look at all {L} keys: an L x L map (left). ATP's "
        "**linear form**, the paper's, lets each query look at only {keys}: an L x r map, so "
        "the work grows like L times r instead of L squared. It gets there by replacing the softmax's "
        "exp(s) with 1 + s. The **exact form** is a reference: the ordinary softmax, on keys rebuilt from "
        "the r principal keys; its error is the cost of dropping components alone. The forms shown: "
        "{forms_note}. The panel titles give each form's output error for this head. A pretrained model is "
        "not trained for any of them: the paper fine-tunes with ATP in place before measuring accuracy, so "
        "large errors here are expected, above all for the linear form. {causal_note}",
        _forms_formula(causal=False),
        attention_figure,
        causal_formula=_forms_formula(causal=True),
        uses_maps=True,
    ),
    Step(
        "positivity",
        "Why 1 + s breaks, and how positivity fixes it",
        "The softmax weighs token j by exp(s), always positive, and divides by their sum. The paper's linear "
        "form replaces exp(s) by **1 + s** so that sums can be taken once over the r principal keys; but "
        "1 + s is **negative** for every score below -1, and a pretrained model's scores reach far below "
        "that. Then the sum under the fraction, the **normaliser**, can come close to zero or change sign: "
        "the output is divided by almost nothing and flips (left, red). No fine-tuning repairs a formula "
        "that divides by zero, and training makes it worse (the gradients overflow). The **second-order "
        "form** keeps one more term, 1 + x + x^2/2 = ((1 + x)^2 + 1) / 2 with x = t s - m: never below 1/2, "
        "so every normaliser is at least half the number of keys (left, blue). Positive is not yet faithful: "
        "untrained, the parabola also weighs the *least* similar keys (very negative scores) heavily "
        "(right), so each head learns a scale t and an expansion point m (x = t s - m) that keep x where "
        "the curve follows exp; that is the first stage of fine-tuning. It still sums over principal keys "
        "only, at a cost of L r^2 d_h instead of L r d_h.",
        r"1 + s < 0 \text{ for } s < -1,\qquad 1 + x + \tfrac{1}{2}x^2 = \tfrac{1}{2}\big((1 + x)^2 + 1\big)"
        r" \ge \tfrac{1}{2}",
        positivity_figure,
        uses_maps=True,
    ),
    Step(
        "cost",
        "What it costs",
        "Counting multiply-adds for one layer: dense attention needs about 2 H L^2 d_h, ATP's linear form "
        "about 2 (H + H_kv) L r d_h plus the cost of finding the basis. The attention scores held in "
        "memory drop from L^2 to L r per head. With r a fixed number, ATP's work grows in proportion to "
        "L and its advantage grows with the length of the text; with r a fixed fraction of L (such as L/2) "
        "both grow like L^2 and the saving is a constant factor at best, or none (right panel).",
        _cost_formula(),
        cost_figure,
    ),
)
