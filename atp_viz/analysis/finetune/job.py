"""A fine-tuning run in a background thread: what the app's Fine-tuning page polls."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from atp_viz.analysis.finetune.config import Cancelled, TuneConfig, TuneResult, default_out_dir
from atp_viz.analysis.finetune.training import train
from atp_viz.deploy.jobs import BusyError

logger = logging.getLogger(__name__)


class TuneJob:
    """:func:`train` in a daemon thread, with its progress, loss curve, result or error readable at any
    time and a :meth:`cancel` that stops it at the next step (nothing is saved then).

    Plain threading, no Streamlit: a page keeps the job in its session state and redraws from
    :meth:`snapshot` every second, so the page stays responsive while the run goes on.
    ``guard`` (optional): a context manager factory held for the whole run, e.g. the app's cap on
    concurrent heavy jobs; if entering it raises, the job ends at once with that error.
    """

    def __init__(self, cfg: TuneConfig, out_dir: str | Path | None = None, *, guard=None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else default_out_dir(cfg)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fraction, self.message = 0.0, "Starting..."
        self.losses: list[float] = []  # stage 2 (end-to-end tuning)
        self.transfer_losses: list[float] = []  # stage 1 (layer-wise attention transfer)
        self.result: TuneResult | None = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._guard = guard
        self._thread = threading.Thread(target=self._run, name=f"finetune-{cfg.model}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._guard() if self._guard else nullcontext():
                res = train(
                    self.cfg,
                    self.out_dir,
                    progress=self._progress,
                    on_step=self._step,
                    stop=self._stop.is_set,
                )
            with self._lock:
                self.result = res
        except (Cancelled, BusyError) as err:  # a user's cancel, or the cap on heavy jobs: no failure
            with self._lock:
                self.error = str(err)
        except Exception as err:  # noqa: BLE001 - shown to the user; the app keeps running
            logger.exception("fine-tuning failed")
            with self._lock:
                self.error = f"{type(err).__name__}: {err}"
        finally:
            with self._lock:
                self.finished = time.time()

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self.fraction, self.message = fraction, message

    def _step(self, stage: str, step: int, loss: float) -> None:
        with self._lock:
            (self.transfer_losses if stage == "transfer" else self.losses).append(loss)

    def cancel(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "fraction": self.fraction,
                "message": self.message,
                "losses": list(self.losses),
                "transfer_losses": list(self.transfer_losses),
                "result": self.result,
                "error": self.error,
                "elapsed": (self.finished or time.time()) - self.started,
                "running": self._thread.is_alive(),
                "cancelling": self._stop.is_set(),
            }
