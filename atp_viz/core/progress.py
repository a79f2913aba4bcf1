"""The one progress-callback type of the library, and a helper to nest progress ranges.

Every long operation takes ``progress: ProgressFn | None`` and calls it with a fraction in [0, 1]
and a sentence for the user; the app turns it into a progress bar, the CLI into stderr lines.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[float, str], None]


def within(progress: ProgressFn | None, start: float, stop: float, prefix: str = "") -> ProgressFn | None:
    """A callback reporting a sub-task's 0..1 as ``start``..``stop`` of ``progress`` (None stays None)."""
    if progress is None:
        return None

    def sub(fraction: float, message: str) -> None:
        progress(start + (stop - start) * min(max(fraction, 0.0), 1.0), prefix + message)

    return sub
