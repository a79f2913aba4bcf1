"""The library stays free of Streamlit: computing and plotting only (pages arrange widgets), and the
package's layers import downwards only (no import circles, imports inside functions included)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "atp_viz"


def _modules(pkg: Path) -> list[str]:
    out = []
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_module_of_the_library_imports_streamlit():
    paths = list(PKG.rglob("*.py"))
    assert len(paths) > 30  # every subpackage is walked
    for path in paths:
        assert not any(n.split(".")[0] == "streamlit" for n in _imports(path)), f"{path} imports streamlit"


def test_importing_the_library_does_not_load_streamlit():
    mods = _modules(PKG)
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    code += "assert 'streamlit' not in sys.modules, 'streamlit was loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT)


# The layers, lowest first: a module may import its own layer and the ones before it, never a later one.
LAYERS = (
    ("atp_viz.core", "atp_viz.forms", "atp_viz.text"),
    ("atp_viz.deploy",),
    ("atp_viz.hf",),
    ("atp_viz.analysis",),
    ("atp_viz.figures",),
    ("atp_viz.outputs",),
    ("atp_viz.cli",),
)


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_layers_import_downwards_only():
    """``core``/``forms``/``text`` (maths and text, torch only) < ``deploy`` < ``hf`` (transformers)
    < ``analysis`` < ``figures`` < ``outputs`` < ``cli``."""
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mine = _layer(module)
        if mine is None:
            continue
        for name in _imports(path):
            theirs = _layer(name)
            assert theirs is None or theirs <= mine, (
                f"{module} (layer {mine}) imports {name} (layer {theirs})"
            )


def test_the_maths_layer_needs_only_torch():
    allowed = {"torch", "atp_viz", "__future__"}
    for sub in ("core", "forms"):
        for path in (PKG / sub).rglob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{path} imports {name}"
