"""A process-wide cap on heavy jobs (rank sweeps, perplexity grids, generation, benchmarks).

Streamlit runs every browser session's script in its own thread of one process, so two users who
start a sweep at once would each get half the CPU (or GPU memory) and both wait twice as long. A
heavy job asks :func:`heavy_job` for a slot; when none is free it fails *at once* with
:class:`BusyError` (a message for the user) instead of queueing behind the others.

The lock below guards only the counter, for microseconds: it is never held while a job runs, so
light work (page reruns, cached views, small forward passes) of other sessions is never blocked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 1  # = settings.Settings.max_heavy_jobs's default

_lock = threading.Lock()
_running: list[str] = []  # names of the heavy jobs running now, in start order


class BusyError(RuntimeError):
    """No slot for another heavy job right now; the message is meant for the user, as is."""


def running() -> tuple[str, ...]:
    """Names of the heavy jobs running now (a snapshot)."""
    with _lock:
        return tuple(_running)


@contextmanager
def heavy_job(name: str, limit: int = DEFAULT_LIMIT) -> Iterator[None]:
    """Run the block as one of at most ``limit`` concurrent heavy jobs of this process.

    Non-blocking: raises :class:`BusyError` immediately when ``limit`` jobs are running. The slot
    is released when the block ends, by return or by exception.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    with _lock:
        if len(_running) >= limit:
            busy = ", ".join(_running)
            raise BusyError(
                f"Another heavy job is running ({busy}; {limit} allowed at a time), so the {name} was not "
                "started. Try again in a moment."
            )
        _running.append(name)
    logger.info("heavy job started: %s", name)
    try:
        yield
    finally:
        with _lock:
            _running.remove(name)
        logger.info("heavy job ended: %s", name)
