"""The registry of ATP attention forms: ``forms.names()``, ``forms.get(name)``.

In the spirit of transformers' ``AttentionInterface``: one small module per form, each an
:class:`~atp_viz.forms.base.AttentionForm` with one signature, registered here by name. The CLI
choices, the pages' widgets, URL-state validation, the tour, the cost counts, serving and
fine-tuning all read this registry; none of them names a form.

Adding a form: write ``atp_viz/forms/<name>.py`` with a subclass of ``AttentionForm`` and a module-level
``FORM`` instance, and add its module name to ``_BUILTIN`` below. ``tests/test_forms.py`` then runs the
shared property checks on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from atp_viz.forms.base import AttentionForm, PrincipalPast, compress

__all__ = ["AttentionForm", "PrincipalPast", "compress", "get", "names", "register", "registered"]

# Module names under atp_viz.forms, in the order the app lists them (the default first).
_BUILTIN = ("exact", "linear", "taylor2", "pksoftmax")
_REGISTRY: dict[str, AttentionForm] = {}


def register(form: AttentionForm) -> AttentionForm:
    """Add a form under ``form.name`` (a second form with the same name is an error)."""
    if not isinstance(form, AttentionForm):
        raise TypeError(f"register() takes an AttentionForm, got {type(form).__name__}")
    if form.name in _REGISTRY and _REGISTRY[form.name] is not form:
        raise ValueError(f"An attention form named {form.name!r} is already registered.")
    _REGISTRY[form.name] = form
    return form


@contextmanager
def registered(*extra: AttentionForm) -> Iterator[None]:
    """Forms registered for the block only (a measurement's diagnostic variants): the app and any later
    measurement in the same process never list them."""
    added = [f for f in extra if f.name not in _REGISTRY]
    for f in added:
        register(f)
    try:
        yield
    finally:
        for f in added:
            _REGISTRY.pop(f.name, None)


for _module in _BUILTIN:
    register(importlib.import_module(f"atp_viz.forms.{_module}").FORM)


def names() -> tuple[str, ...]:
    """The registered forms' names, the default first."""
    return tuple(_REGISTRY)


def get(name: str) -> AttentionForm:
    """The form called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown attention form {name!r}; registered: {', '.join(_REGISTRY)}.") from None


DEFAULT = names()[0]
