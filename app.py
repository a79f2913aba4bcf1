"""ATP Explorer: Streamlit entry point. Run with `make run` (or `streamlit run app.py`).

Only arranges the pages; every computation lives in the `atp_viz` library. The app's shared code
(`atp_app`) is imported here, once, before the navigation runs any page: sessions that start at the
same moment then find those modules complete instead of importing them concurrently.
"""

import logging

import streamlit as st

from atp_app import navigation, runtime, sidebar, state, widgets  # noqa: F401 - imported once, here

navigation.use_this_navigation()
runtime.one_thread_per_call()

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

# A local icon: a Material icon as favicon would be fetched from a CDN, and the app must stay offline.
# A link in presenter mode (present=1) opens with the sidebar folded: the projector's width goes to the page.
st.set_page_config(
    page_title="ATP Explorer",
    page_icon="assets/icon.png",
    layout="wide",
    initial_sidebar_state="collapsed" if state.get("present") == "1" else "auto",
)

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/tour.py", title="How ATP works", icon=":material/school:", url_path="tour"),
    st.Page("pages/spectra.py", title="Low-rank spectra", icon=":material/insights:", url_path="spectra"),
    st.Page("pages/explorer.py", title="Rank explorer", icon=":material/tune:", url_path="explorer"),
    st.Page("pages/serving.py", title="Serving", icon=":material/bolt:", url_path="serving"),
    st.Page("pages/costs.py", title="Cost", icon=":material/speed:", url_path="costs"),
    st.Page("pages/finetune.py", title="Fine-tuning", icon=":material/model_training:", url_path="finetune"),
]

page = st.navigation(PAGES)
# The view (model, text, rank, form, layer, head, ...) goes into every page's link: a page switch drops
# the query string, and the view lives in the session (atp_app.state).
state.sync_url()
if state.get("present") == "1":
    widgets.presenter_css()
page.run()
