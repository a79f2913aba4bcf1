"""ATP Explorer: Streamlit entry point. Run with `make run` (or `streamlit run app.py`).

Only arranges the pages; every computation lives in the `atp_viz` library. The app's shared code
(`atp_app`) is imported here, once, before the navigation runs any page: sessions that start at the
same moment then find those modules complete instead of importing them concurrently.
"""

import logging

import streamlit as st

from atp_app import navigation, runtime, sidebar, state, widgets  # noqa: F401 - imported once, here

navigation.use_this_navigation()

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

# A local icon: a Material icon as favicon would be fetched from a CDN, and the app must stay offline.
st.set_page_config(page_title="ATP Explorer", page_icon="assets/icon.png", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/tour.py", title="How ATP works", icon=":material/school:", url_path="tour"),
    st.Page("pages/spectra.py", title="Low-rank spectra", icon=":material/insights:", url_path="spectra"),
    st.Page("pages/explorer.py", title="Rank explorer", icon=":material/tune:", url_path="explorer"),
    st.Page("pages/serving.py", title="Serving", icon=":material/bolt:", url_path="serving"),
    st.Page("pages/costs.py", title="Cost", icon=":material/speed:", url_path="costs"),
    st.Page("pages/finetune.py", title="Fine-tuning", icon=":material/model_training:", url_path="finetune"),
]

st.navigation(PAGES).run()
