"""The one progress-callback type of the library, and a helper to nest progress ranges.

Every long operation takes ``progress: ProgressFn | None`` and calls it with a fraction in [0, 1]
and a sentence for the user; the app turns it into a progress bar, the CLI into stderr lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

ProgressFn = Callable[[float, str], None]
T = TypeVar("T")


def within(progress: ProgressFn | None, start: float, stop: float, prefix: str = "") -> ProgressFn | None:
    """A callback reporting a sub-task's 0..1 as ``start``..``stop`` of ``progress`` (None stays None)."""
    if progress is None:
        return None

    def sub(fraction: float, message: str) -> None:
        progress(start + (stop - start) * min(max(fraction, 0.0), 1.0), prefix + message)

    return sub


def stderr_progress(every: float = 10.0) -> ProgressFn:
    """Progress lines on stderr: every new phase (a message whose first word changes) at once, repeats
    of one phase ("step 3 of 200 ...") at most one every ``every`` seconds, the end always."""
    t0 = time.perf_counter()
    last = [-every, ""]

    def progress(fraction: float, message: str) -> None:
        now = time.perf_counter() - t0
        phase = message.split(" ", 1)[0]
        if now - last[0] >= every or fraction >= 1.0 or phase != last[1]:
            last[0], last[1] = now, phase
            print(f"[{now:6.0f} s] {fraction:4.0%} {message}", file=sys.stderr, flush=True)

    return progress


def steps(progress: ProgressFn | None, items: Iterable[T], describe: Callable[[T], str] = str) -> Iterator[T]:
    """``items`` one by one, each announced before its work as "<describe(item)> (i of n)" at the share
    done so far; the end (1.0) after the last. For loops whose steps take about the same time."""
    items = list(items)
    for i, item in enumerate(items):
        if progress:
            progress(i / len(items), f"{describe(item)} ({i + 1} of {len(items)})")
        yield item
    if progress:
        progress(1.0, f"done ({len(items)} of {len(items)})")
