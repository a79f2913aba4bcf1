"""Figures: Plotly builders that take arrays and return ``go.Figure`` (``plots``), attention maps with
colour scales that show structure (``maps``), per-token views of one query (``tokens``), and the guided
tour's steps (``tour``)."""
