"""Figures: Plotly builders that take arrays and return ``go.Figure``; the guided tour's steps."""
