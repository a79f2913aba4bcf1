"""The one corpus of real text this project did not write: docstrings of Python's standard library.

Deterministic for a given Python version, needs no download, and splits naturally by module, which
gives a train / held-out split with no shared text. Three named uses read it:

- :data:`TRAIN_MODULES` / :data:`HELDOUT_MODULES`: fine-tuning and its held-out evaluation;
- :data:`PERPLEXITY_MODULES`: the text of ``python -m atp_viz perplexity`` and the Serving page's grid;
- :data:`BENCH_MODULES`: the text of the whole-model benchmark.

:func:`module_docstrings` is the one extractor; the named uses differ only in the modules they read and
in whether methods and private names are included (kept as they were when their README numbers were
measured).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence

# Split by module, so no module's text is in both. Held-out: ~88k characters (~22k SmolLM2 tokens).
HELDOUT_MODULES: tuple[str, ...] = (
    "difflib", "statistics", "fractions", "ipaddress", "calendar", "textwrap", "cmd", "graphlib",
    "heapq", "pprint",
)  # fmt: skip
TRAIN_MODULES: tuple[str, ...] = (
    "argparse", "logging", "typing", "inspect", "doctest", "pdb", "threading", "email.message",
    "unittest.case", "ast", "xml.etree.ElementTree", "smtplib", "codecs", "configparser", "ssl",
    "optparse", "imaplib", "shutil", "urllib.request", "subprocess", "http.client", "tarfile",
    "enum", "collections", "ftplib", "pydoc", "socket", "re", "json", "traceback", "zipfile",
    "mailbox", "asyncio.events", "uuid", "concurrent.futures._base", "platform", "pathlib", "wave",
    "random", "tempfile", "functools", "base64", "contextlib", "lzma", "itertools", "mimetypes",
    "pickle", "bz2", "queue", "array", "gzip", "locale", "selectors", "tokenize", "csv", "dataclasses",
    "numbers", "plistlib", "abc", "io", "weakref", "warnings", "trace", "hashlib", "sysconfig",
    "filecmp", "copy", "hmac",
)  # fmt: skip
PERPLEXITY_MODULES: tuple[str, ...] = (
    "collections", "functools", "itertools", "json", "re", "pathlib", "typing", "dataclasses",
    "argparse", "logging", "subprocess", "threading", "asyncio", "unittest", "inspect", "textwrap",
    "string", "decimal", "fractions", "statistics", "heapq", "bisect", "contextlib", "enum",
    "shutil", "tempfile", "datetime", "calendar", "csv", "sqlite3", "email", "http.client",
)  # fmt: skip
BENCH_MODULES: tuple[str, ...] = (
    "collections", "functools", "itertools", "json", "re", "os", "pathlib", "typing", "argparse",
    "dataclasses", "inspect", "logging", "threading", "subprocess", "textwrap", "string", "heapq",
    "bisect", "contextlib", "decimal", "fractions", "statistics", "datetime", "enum", "abc",
)  # fmt: skip


def module_docstrings(
    name: str, *, methods: bool = True, private: bool = True, unique: bool = True
) -> list[str]:
    """Docstrings of one standard-library module, in a fixed order: the module's, then for each name
    defined in that module (sorted; none borrowed from another module) a class's and, with ``methods``,
    its methods', or a function's. ``private=False`` skips names starting with ``_``. Empty docstrings
    are left out, and with ``unique`` repeated ones (stripped). An absent module gives ``[]``."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return []
    docs = [inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", "") != name or (not private and attr.startswith("_")):
            continue
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
            if methods:
                for _, meth in sorted(vars(obj).items()):
                    if inspect.isfunction(meth) and meth.__doc__:
                        docs.append(inspect.cleandoc(meth.__doc__))
        elif inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    if not unique:
        return [d for d in docs if d]
    seen: set[str] = set()
    out = []
    for d in docs:
        d = d.strip()
        if d and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def docstrings(modules: Sequence[str]) -> list[str]:
    """The modules' docstrings (with methods). Any other split than :data:`HELDOUT_MODULES` leaves out a
    docstring that also occurs in the held-out modules (generated ones such as namedtuple's repeat)."""
    docs = [d for m in modules for d in module_docstrings(m)]
    if tuple(modules) != HELDOUT_MODULES:
        held = {d for m in HELDOUT_MODULES for d in module_docstrings(m)}
        docs = [d for d in docs if d not in held]
    return docs


def perplexity_text(min_chars: int = 60_000) -> tuple[str, list[str]]:
    """Text for the perplexity grid: whole modules of :data:`PERPLEXITY_MODULES` (no methods) until at
    least ``min_chars`` characters. Returns (text, modules used)."""
    parts, used = [], []
    for name in PERPLEXITY_MODULES:
        text = "\n\n".join(module_docstrings(name, methods=False, unique=False))
        if text:
            parts.append(text)
            used.append(name)
        if sum(len(p) for p in parts) >= min_chars:
            break
    return "\n\n".join(parts), used


def bench_text() -> str:
    """Text for the whole-model benchmark: public names of :data:`BENCH_MODULES`, no methods."""
    return "\n\n".join(
        d for m in BENCH_MODULES for d in module_docstrings(m, methods=False, private=False, unique=False)
    )
