"""Pure maths of ATP: principal bases, ranks, the dense softmax reference, cost counts.

torch (and the standard library) only: nothing here knows about transformers, Plotly or Streamlit.
The attention forms that use this layer are in :mod:`atp_viz.forms`.
"""
