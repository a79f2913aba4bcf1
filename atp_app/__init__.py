"""The app's shared Streamlit code (next to ``pages/``, which holds one file per view).

Importing any module here has no side effect: ``app.py`` imports them all once, before the first
session's script runs, so concurrent sessions never see a half-initialised module. What runs at start
(the navigation fix) is a function ``app.py`` calls.

- :mod:`.runtime`: deployment settings, the heavy-job slot, cached models, captures and dense runs;
- :mod:`.state`: the view in the URL (read on a session's first run, written back on every change);
- :mod:`.sidebar`: the model and text pickers every page shows;
- :mod:`.widgets`: progress bars, download buttons, highlighted text;
- :mod:`.navigation`: Streamlit's legacy pages-folder routing switched off.
"""
