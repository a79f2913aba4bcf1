"""The one corpus of real text this project did not write: docstrings of Python's standard library.

Deterministic for a given Python version, needs no download, and splits naturally by module, which
gives a train / held-out split with no shared text. Three named uses read it:

- :data:`TRAIN_MODULES` / :data:`HELDOUT_MODULES`: fine-tuning and its held-out evaluation
  (:data:`WIDER_TRAIN_MODULES`: more varied training text, the same held-out split);
- :data:`PERPLEXITY_MODULES`: the text of ``python -m atp_viz perplexity`` and the Serving page's grid;
- :data:`BENCH_MODULES`: the text of the whole-model benchmark.

:func:`module_docstrings` is the one extractor; the named uses differ only in the modules they read and
in whether methods and private names are included (kept as they were when their README numbers were
measured).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence

# Split by module, so no module's text is in both. The first ten were the held-out set of the runs made
# before the evaluation protocol (their JSONs say so); the rest, none of them ever trained on, make the
# held-out stream long enough (about 71k SmolLM2 tokens) that the 95% interval of a top-1 difference is
# near +-0.5 points (see atp_viz.analysis.protocol).
HELDOUT_MODULES: tuple[str, ...] = (
    "difflib", "statistics", "fractions", "ipaddress", "calendar", "textwrap", "cmd", "graphlib",
    "heapq", "pprint",
    "http.cookiejar", "unittest.mock", "http.server", "urllib.parse", "socketserver", "email.policy",
    "asyncio.tasks", "importlib.metadata", "timeit", "email.header", "asyncio.streams", "xmlrpc.client",
    "wsgiref.handlers", "wsgiref.simple_server", "email.headerregistry", "poplib", "code", "dis",
    "zipimport", "json.encoder", "email.utils", "pyclbr", "json.decoder", "pstats", "sched", "profile",
    "codeop", "rlcompleter", "getopt", "asyncio.queues", "xml.dom.minidom",
)  # fmt: skip
# Docstrings shorter than this (normalised) are not checked for containment in the other split: short
# generic ones ("Return self.") would match everywhere.
NEAR_DUPLICATE_MIN_CHARS = 80
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
# More varied training text (``finetune --train-text wider``): every other standard-library module with at
# least 2,000 characters of docstrings (no private, test, GUI, codec or ctypes module), none of them held
# out. The held-out split is the same, so runs on either training text are scored on the same texts.
WIDER_TRAIN_MODULES: tuple[str, ...] = TRAIN_MODULES + (
    "aifc", "asyncio.base_events", "asyncio.futures", "asyncio.locks", "asyncio.protocols",
    "asyncio.runners", "asyncio.selector_events", "asyncio.sslproto", "asyncio.timeouts",
    "asyncio.transports", "asyncio.unix_events", "bdb", "cgi", "chunk", "collections.abc", "compileall",
    "concurrent.futures.process", "email.charset", "email.generator", "email.parser", "email.quoprimime",
    "fileinput", "http.cookies", "imp", "importlib.abc", "importlib.util", "logging.config",
    "logging.handlers", "multiprocessing.managers", "multiprocessing.shared_memory", "nntplib", "ntpath",
    "os", "pickletools", "pipes", "pkgutil", "py_compile", "runpy", "shelve", "site", "smtpd", "sunau",
    "symtable", "telnetlib", "unittest.loader", "wsgiref.headers", "wsgiref.validate",
    "xml.dom.expatbuilder", "xml.sax.handler", "xml.sax.xmlreader", "xmlrpc.server",
)  # fmt: skip
# The training texts ``finetune`` offers, by name.
TRAIN_TEXTS: dict[str, tuple[str, ...]] = {"docstrings": TRAIN_MODULES, "wider": WIDER_TRAIN_MODULES}
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


def normalise(text: str) -> str:
    """Lowercase letters and digits separated by single spaces: what a near-duplicate check compares."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _paragraphs(text: str, min_chars: int) -> set[str]:
    return {p for p in (normalise(x) for x in re.split(r"\n\s*\n", text)) if len(p) >= min_chars}


def near_duplicates(
    docs: Sequence[str], reference: Sequence[str], min_chars: int = NEAR_DUPLICATE_MIN_CHARS
) -> list[bool]:
    """For each doc, whether it nearly duplicates a reference doc: the same normalised text (case,
    punctuation and spacing ignored), one normalised text containing the other (the shorter at least
    ``min_chars`` long), or a shared normalised paragraph of at least ``min_chars`` characters."""
    ref_norm = [normalise(r) for r in reference]
    ref_set = set(ref_norm)
    ref_long = [r for r in ref_norm if len(r) >= min_chars]
    ref_paras = set().union(*(_paragraphs(r, min_chars) for r in reference)) if reference else set()
    out = []
    for d in docs:
        n = normalise(d)
        dup = n in ref_set or bool(_paragraphs(d, min_chars) & ref_paras)
        if not dup and len(n) >= min_chars:
            dup = any(n in r or (r in n) for r in ref_long)
        elif not dup:
            dup = any(n == r for r in ref_long)
        out.append(dup)
    return out


def docstrings(modules: Sequence[str]) -> list[str]:
    """The modules' docstrings (with methods). Any other split than :data:`HELDOUT_MODULES` leaves out
    every docstring that nearly duplicates one of the held-out modules' (:func:`near_duplicates`;
    generated ones such as namedtuple's, or a class documented in two modules, repeat)."""
    docs = [d for m in modules for d in module_docstrings(m)]
    if tuple(modules) != HELDOUT_MODULES:
        held = [d for m in HELDOUT_MODULES for d in module_docstrings(m)]
        docs = [d for d, dup in zip(docs, near_duplicates(docs, held), strict=True) if not dup]
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
