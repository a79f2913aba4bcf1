"""ATP Explorer: Streamlit entry point. Run with `make run` (or `streamlit run app.py`).

Only arranges the pages; every computation lives in the `atp_viz` library.
"""

import logging

import streamlit as st

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

st.set_page_config(page_title="ATP Explorer", page_icon=":material/scatter_plot:", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/spectra.py", title="Low-rank spectra", icon=":material/insights:", url_path="spectra"),
    st.Page("pages/explorer.py", title="Rank explorer", icon=":material/tune:", url_path="explorer"),
]

st.navigation(PAGES).run()
