"""The library stays free of Streamlit: computing and plotting only (pages arrange widgets)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "atp_viz"


def test_no_module_of_the_library_imports_streamlit():
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "streamlit" for n in names), f"{path.name} imports streamlit"


def test_importing_the_library_does_not_load_streamlit():
    mods = ", ".join(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))
    code = f"import sys\nfrom atp_viz import {mods}\nassert 'streamlit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
