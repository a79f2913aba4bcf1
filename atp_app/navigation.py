"""Streamlit's legacy ``pages/`` routing switched off, so even the first session uses ``app.py``."""

from __future__ import annotations

import threading

import streamlit as st

_rerun_done = threading.Event()


def use_this_navigation() -> None:
    """Make even the first session after server start use app.py's ``st.navigation``.

    Streamlit decides once per server process, before any script runs, whether the app uses its
    legacy ``pages/`` folder routing (it sees our ``pages/`` folder), and routes that first session
    through an auto-generated navigation that runs a page file without app.py (no page config, a
    menu listing every file). ``st.navigation`` clears that flag for later sessions; clearing it here
    and rerunning gives the first visitor the real app too. Internal API: see
    ``streamlit/runtime/pages_manager.py`` (``PagesManager.uses_pages_directory``).

    Called explicitly by ``app.py`` and at the top of every page (a page is what the legacy routing
    runs), never on import. The rerun happens once per process, as the flag is cleared once in a real
    server; Streamlit's ``AppTest`` sets the flag again before every run, and a rerun there would
    swallow the widget events of the run (a clicked button).
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without this class: nothing to work around
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if not _rerun_done.is_set():
            _rerun_done.set()
            st.rerun()
