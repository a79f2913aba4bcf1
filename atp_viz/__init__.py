"""ATP Explorer: see why and when low-rank attention (Attention on Top Principal keys) works.

The library computes and plots (Plotly figures); it never imports Streamlit. The app (``app.py``,
``pages/``) arranges widgets around it.
"""

__version__ = "0.1.0"
