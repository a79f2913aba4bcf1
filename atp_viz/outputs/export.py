"""Exports: figures as PNG / SVG / standalone HTML, tables as CSV / JSON, arrays as ``.npz``. No Streamlit.

Every function returns ``bytes`` (what a download button or a file write needs) and raises
:class:`ExportError` with a message meant for the user when it cannot.

Static images (PNG, SVG) are drawn by plotly.js itself inside a headless Chromium driven by kaleido
1.x, so they look exactly like the charts in the app. This must work offline, so:

- the browser is the system Chromium (``/usr/bin/chromium``, or ``$BROWSER_PATH`` when set), passed to
  kaleido explicitly: kaleido never searches for, or downloads, a browser of its own;
- plotly.js comes from the installed plotly package (kaleido's default) and MathJax is switched off
  (kaleido's default would load it from a CDN).

Starting Chromium takes about 2 s, so one kaleido instance is started on the first image and kept for
the life of the process (a Streamlit server serves every session with it); an image then takes a few
tenths of a second. Images are drawn one at a time (kaleido has one tab); each has its own time limit,
not counting the wait for its turn. A browser that fails to start, hangs or is closed is killed with
its process group and its temporary folders are removed: no Chromium outlives its use.
HTML, CSV, JSON and ``.npz`` need no browser and work when Chromium is missing.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from atp_viz.analysis.spectra import THRESHOLDS, Spectrum

logger = logging.getLogger(__name__)

SYSTEM_CHROMIUM = "/usr/bin/chromium"
RENDER_TIMEOUT_S = 60.0  # one image; a browser that hangs must not hang the app or the CLI
START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0  # a polite close; then the browser's process group is killed
MAX_SCALE = 10  # scale multiplies both sides: 10 gives 7000 x 4200 px for a 700 x 420 figure


class ExportError(RuntimeError):
    """An export could not be made; the message is meant for the user, as is."""


# ------------------------------------------------------------------------------------------------
# Static images through kaleido + the system Chromium
# ------------------------------------------------------------------------------------------------


def chromium_path() -> Path:
    """The browser static images use: ``$BROWSER_PATH`` (choreographer's variable) or the system one."""
    return Path(os.environ.get("BROWSER_PATH") or SYSTEM_CHROMIUM)


def static_export_problem() -> str | None:
    """None when PNG/SVG export can run; otherwise why not, in words (cheap: no browser is started)."""
    path = chromium_path()
    if not path.is_file() or not os.access(path, os.X_OK):
        return (
            f"PNG and SVG export need Chromium at {path}, which is missing. Install Debian's `chromium` "
            "package (`apt-get install chromium`, or `make test` as root), or set BROWSER_PATH to a "
            "Chromium executable. HTML, CSV, JSON and .npz exports work without it."
        )
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "PNG and SVG export need the kaleido package (pinned in requirements.txt): run `make install`."
    return None


class _RendererClosed(RuntimeError):
    """The renderer was closed (another image failed) while this call waited for its turn."""


class _Renderer:
    """One kaleido browser on its own event-loop thread, shared by every caller of this process.

    Not kaleido's ``start_sync_server``: its server thread dies silently when the browser fails to
    start (every later call then waits forever), it has no per-call timeout, and two threads calling
    it at once (two Streamlit sessions) can receive each other's images. Here each call is a future
    on one loop with a timeout, and renders take turns (``_render_lock``): kaleido's single tab draws
    one image at a time anyway, and this way an image's time limit counts its own drawing only, never
    the wait behind other sessions' images, and a timed-out image has no other image in the browser
    when it is closed.

    However a start or a close ends (a timeout included), :meth:`_shutdown` leaves nothing behind: the
    browser's process group is killed, kaleido's temporary folders are removed, the loop is stopped
    and closed. (choreographer's own close has no time limit, and stopping the loop under it would skip
    its kill step.)
    """

    def __init__(self, browser: Path) -> None:
        import kaleido

        self.browser = browser
        self.kaleido = None
        self._k = None  # the Kaleido object as soon as it exists: set before it starts Chromium
        self._singleton: Path | None = None
        self._render_lock = threading.Lock()
        self._closed = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kaleido", daemon=True)
        self.thread.start()

        async def _open():
            k = kaleido.Kaleido(n=1, path=str(browser), mathjax=False, timeout=RENDER_TIMEOUT_S)
            self._k = k  # before open(): a start that times out must still find the browser to kill
            await k.open()
            _release_logger_pipe(k)
            self._singleton = _singleton_dir(k)  # read now: choreographer's close removes the profile
            return k

        try:
            self.kaleido = self._wait(_open(), START_TIMEOUT_S, "start Chromium")
        except BaseException:
            self._shutdown()
            raise

    def _wait(self, coro, timeout: float, what: str):
        fut = asyncio.run_coroutine_threadsafe(_quiet_on_cancel(coro), self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise ExportError(
                f"Could not {what} within {timeout:.0f} s (Chromium at {self.browser})."
            ) from None

    def render(self, fig_dict: dict, opts: dict) -> bytes:
        with self._render_lock:  # the wait for a turn is not timed; the render itself is
            if self._closed:
                raise _RendererClosed
            return self._wait(
                self.kaleido.calc_fig(fig_dict, opts=opts), RENDER_TIMEOUT_S + 5, "draw the image"
            )

    def close(self) -> None:
        """Close the browser politely (``CLOSE_TIMEOUT_S`` at most), then :meth:`_shutdown`."""
        if self._closed:
            return
        self._closed = True  # images waiting for their turn go to a new renderer
        turn = self._render_lock.acquire(timeout=CLOSE_TIMEOUT_S)  # let an image being drawn finish
        try:
            if self.kaleido is not None:
                try:
                    self._wait(self.kaleido.close(), CLOSE_TIMEOUT_S, "close Chromium")
                except Exception as err:  # noqa: BLE001 - closing is best effort; _shutdown kills
                    logger.debug("closing kaleido: %s", err)
        finally:
            try:
                self._shutdown()
            finally:
                if turn:
                    self._render_lock.release()

    def _shutdown(self) -> None:
        """Stop the loop thread, kill the browser, close the loop (safe to call again)."""
        self._closed = True
        loop = self.loop
        if loop.is_closed():
            return
        if self.thread.is_alive():
            # Cancel what still runs on the loop (a start or close that timed out, kaleido's watchdog
            # and read loop) so that no task is left pending, then stop it.
            try:
                asyncio.run_coroutine_threadsafe(_cancel_tasks(), loop).result(5)
            except Exception as err:  # noqa: BLE001 - best effort; the kill below is what matters
                logger.debug("cancelling kaleido's tasks: %s", err)
            loop.call_soon_threadsafe(loop.stop)
            self.thread.join(5)
        self._kill()
        if self.thread.is_alive():
            logger.warning("kaleido's event loop thread did not stop; its loop is left open")
        else:
            loop.close()

    def _kill(self) -> None:
        """Kill the browser's process group if it still runs; remove kaleido's temporary folders."""
        k = self._k
        if k is None:
            return
        proc = getattr(k, "subprocess", None)  # set once Popen returned (choreographer's attribute)
        if proc is not None:
            if proc.poll() is None:
                # choreographer starts a wrapper in a new session (start_new_session=True) that starts
                # Chromium, which starts its helpers: one process group, killed as one.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, AttributeError):
                    proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                logger.warning("Chromium (pid %s) did not exit after SIGKILL", proc.pid)
            _release_logger_pipe(k)
        channel = getattr(k, "_channel", None)
        if channel is not None:
            try:
                channel.close()  # idempotent; frees the pipe's file descriptors
            except Exception as err:  # noqa: BLE001
                logger.debug("closing kaleido's pipe: %s", err)
        # choreographer's worker threads (idle or unblocked now that the process and pipe are gone).
        for ex in (
            getattr(k, "_process_executor", None),
            getattr(getattr(k, "_broker", None), "_executor", None),
        ):
            if ex is not None:
                try:
                    ex.shutdown(wait=False, cancel_futures=True)
                except Exception as err:  # noqa: BLE001
                    logger.debug("stopping choreographer's threads: %s", err)
        singleton = self._singleton or _singleton_dir(k)
        if singleton is not None and singleton.is_dir() and not singleton.is_symlink():
            shutil.rmtree(singleton, ignore_errors=True)
        impl = getattr(k, "_browser_impl", None)
        for tmp in (getattr(k, "_html_tmp_dir", None), getattr(impl, "tmp_dir", None)):
            if tmp is not None:
                try:
                    tmp.clean()
                except Exception as err:  # noqa: BLE001
                    logger.debug("removing kaleido's temporary folder: %s", err)


async def _quiet_on_cancel(coro):
    """``await coro``; when this task is being cancelled (its caller timed out), end as cancelled even
    if ``coro`` turned the cancellation into an error (choreographer's open does), so that asyncio does
    not log an exception nobody will retrieve."""
    try:
        return await coro
    except Exception:
        if asyncio.current_task().cancelling():
            raise asyncio.CancelledError from None
        raise


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=2)


def _singleton_dir(k: Any) -> Path | None:
    """The ``/tmp/org.chromium.Chromium.*`` folder that Chromium links from its profile
    (``SingletonSocket``), if there is one: Chromium removes it on a clean exit, not when killed."""
    profile = getattr(getattr(k, "_browser_impl", None), "tmp_dir", None)
    if profile is None:
        return None
    try:
        folder = Path(os.readlink(Path(profile.path) / "SingletonSocket")).parent
    except OSError:
        return None
    return folder if folder.name.startswith("org.chromium.") else None


def _release_logger_pipe(k: Any) -> None:
    """Close the parent's copy of Chromium's stderr pipe once Chromium has it (logistro's documented
    use), and mark it closed so that choreographer's close does not close the number a second time."""
    fd = getattr(k, "_logger_pipe", None)
    if fd:
        k._logger_pipe = None
        with contextlib.suppress(OSError):
            os.close(fd)


_renderer: _Renderer | None = None
_renderer_lock = threading.Lock()


def _get_renderer() -> _Renderer:
    global _renderer
    problem = static_export_problem()
    if problem:
        raise ExportError(problem)
    with _renderer_lock:
        if _renderer is not None and _renderer.browser != chromium_path():
            _renderer.close()  # BROWSER_PATH changed since the browser was started
            _renderer = None
        if _renderer is None:
            t0 = time.perf_counter()
            try:
                _renderer = _Renderer(chromium_path())
            except ExportError:
                raise
            except Exception as err:
                raise ExportError(
                    f"Could not start Chromium at {chromium_path()} for image export: {err}"
                ) from err
            logger.info("kaleido started with %s in %.1f s", chromium_path(), time.perf_counter() - t0)
        return _renderer


def shutdown() -> None:
    """Close the shared browser (it is started again on the next image)."""
    global _renderer
    with _renderer_lock:
        if _renderer is not None:
            _renderer.close()
            _renderer = None


atexit.register(shutdown)


def _check_figure(fig: Any) -> dict:
    if not isinstance(fig, go.Figure):
        raise ExportError(f"Expected a plotly Figure to export, got {type(fig).__name__}.")
    return fig.to_dict()


def _static(fig: go.Figure, fmt: str, scale: float) -> bytes:
    global _renderer
    spec = _check_figure(fig)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= MAX_SCALE:
        raise ExportError(f"The image scale must be a number in (0, {MAX_SCALE}], got {scale!r}.")
    for _ in range(3):
        renderer = _get_renderer()
        try:
            return renderer.render(spec, {"format": fmt, "scale": scale})
        except _RendererClosed:
            continue  # closed (another image failed) while this one waited its turn: take the new one
        except Exception as err:
            # A crashed or hung browser is started afresh on the next call rather than failing forever.
            # Renders take turns, so no other session's image is being drawn in this browser now.
            with _renderer_lock:
                if _renderer is renderer:
                    renderer.close()
                    _renderer = None
            if isinstance(err, ExportError):
                raise
            raise ExportError(f"Chromium could not draw the {fmt.upper()} image: {err}") from err
    raise ExportError("Chromium was restarted while this image waited for its turn; please try again.")


def figure_png(fig: go.Figure, scale: float = 2) -> bytes:
    """PNG of ``fig`` at its layout size (width 700 px unless set) times ``scale`` pixels per px."""
    return _static(fig, "png", scale)


def figure_svg(fig: go.Figure) -> bytes:
    """SVG of ``fig`` (vector, for papers). Heatmaps are embedded as raster images, as in plotly.js."""
    return _static(fig, "svg", 1)


def figure_html(fig: go.Figure) -> bytes:
    """A standalone interactive HTML page of ``fig``: plotly.js is inlined (about 4.8 MB), no CDN."""
    _check_figure(fig)
    return fig.to_html(include_plotlyjs=True, full_html=True, include_mathjax=False).encode("utf-8")


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """numpy scalars to Python ones; non-finite floats stay as they are (callers decide)."""
    return v.item() if isinstance(v, np.generic) else v


def _check_rows(rows: Any) -> list[dict]:
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or isinstance(rows, str | bytes):
        raise ExportError(f"Expected a list of rows (dicts) to export, got {type(rows).__name__}.")
    if not rows:
        raise ExportError("There are no rows to export.")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ExportError(f"Row {i} is a {type(row).__name__}, not a dict of column -> value.")
        out.append({str(k): _plain(v) for k, v in row.items()})
    return out


def table_csv(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """CSV (UTF-8, header row, columns in first-seen order). Missing cells and NaN are empty.

    Cells must be scalars: a list or dict has no single CSV spelling, so it is refused (use JSON).
    """
    import pandas as pd

    rows = _check_rows(rows)
    for i, row in enumerate(rows):
        for k, v in row.items():
            if isinstance(v, Mapping | list | tuple | set | np.ndarray):
                raise ExportError(
                    f"Column {k!r} of row {i} holds a {type(v).__name__}; CSV needs one value per cell. "
                    "Export this table as JSON instead."
                )
    return pd.DataFrame(rows).to_csv(index=False).encode("utf-8")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _finite(o: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them (json.dumps would write NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, np.generic):
        return _finite(o.item())
    return o


def table_json(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """JSON: a list of objects, one per row (NaN and infinities written as null)."""
    rows = _check_rows(rows)
    try:
        text = json.dumps(_finite(rows), indent=2, default=_json_default, allow_nan=False)
    except TypeError as err:
        raise ExportError(f"This table cannot be written as JSON: {err}.") from err
    return (text + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------
# Arrays (.npz)
# ------------------------------------------------------------------------------------------------


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    # Uncompressed: float activations barely compress and savez_compressed is several times slower.
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _strings(items: Sequence[str]) -> np.ndarray:
    # A fixed-width unicode array, so np.load reads it without allow_pickle.
    return np.array([str(s) for s in items], dtype=np.str_)


def capture_npz(capture: Any, *, attentions: bool = True) -> bytes:
    """A capture (``atp_viz.capture.Capture``) as ``.npz``, names like TransformerLens's cache.

    Per layer i: ``blocks.i.x`` [L, d], ``blocks.i.q`` [H, L, dh], ``blocks.i.k`` / ``blocks.i.v``
    [Hkv, L, dh], ``blocks.i.attn`` [H, L, L] (only for layers whose maps were kept, and only with
    ``attentions``), ``blocks.i.output`` and ``blocks.i.resid`` [L, d]. Also ``tokens``, ``input_ids``,
    ``final_hidden``, ``embedding`` (encoders) or ``next_token_logits`` (decoders), ``text``, ``notes``,
    ``attn_layers`` (which layers have a map) and ``model_info`` (JSON text of ``ModelInfo``).
    """
    for attr in ("layers", "tokens", "info", "input_ids"):
        if not hasattr(capture, attr):
            raise ExportError(f"Expected a Capture to export, got {type(capture).__name__}.")
    arrays: dict[str, np.ndarray] = {
        "tokens": _strings(capture.tokens),
        "input_ids": np.asarray(capture.input_ids),
        "final_hidden": np.asarray(capture.final_hidden),
        "text": np.array(capture.text, dtype=np.str_),
        "notes": _strings(capture.notes),
        "model_info": np.array(json.dumps(dataclasses.asdict(capture.info)), dtype=np.str_),
    }
    if capture.embedding is not None:
        arrays["embedding"] = np.asarray(capture.embedding)
    if capture.next_token_logits is not None:
        arrays["next_token_logits"] = np.asarray(capture.next_token_logits)
    kept = []
    for layer in capture.layers:
        p = f"blocks.{layer.index}."
        for name in ("x", "q", "k", "v", "output", "resid"):
            arrays[p + name] = np.asarray(getattr(layer, name))
        if attentions and layer.attn is not None:
            arrays[p + "attn"] = np.asarray(layer.attn)
            kept.append(layer.index)
    arrays["attn_layers"] = np.array(kept, dtype=np.int64)
    return _npz(arrays)


def spectra_npz(
    spectra: Sequence[Spectrum],
    labels: Sequence[str] | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> bytes:
    """Spectra as ``.npz``: ``sv_i`` (singular values of spectrum i, descending), ``labels``,
    ``n_rows``, ``n_cols``, ``centered``, ``effective_rank``, ``thresholds`` and ``rank_for``
    ``[n_spectra, n_thresholds]`` (components needed for each energy threshold)."""
    spectra = list(spectra)
    if not spectra:
        raise ExportError("There are no spectra to export.")
    if not all(isinstance(sp, Spectrum) for sp in spectra):
        raise ExportError("Expected a list of atp_viz.spectra.Spectrum to export.")
    labels = [f"{i}" for i in range(len(spectra))] if labels is None else list(labels)
    if len(labels) != len(spectra):
        raise ExportError(f"Got {len(labels)} labels for {len(spectra)} spectra.")
    arrays = {f"sv_{i}": np.asarray(sp.singular_values) for i, sp in enumerate(spectra)}
    arrays.update(
        labels=_strings(labels),
        n_rows=np.array([sp.n_rows for sp in spectra], dtype=np.int64),
        n_cols=np.array([sp.n_cols for sp in spectra], dtype=np.int64),
        centered=np.array([sp.centered for sp in spectra], dtype=bool),
        effective_rank=np.array([sp.effective_rank for sp in spectra]),
        thresholds=np.asarray(thresholds, dtype=np.float64),
        rank_for=np.array([[sp.rank_for(t) for t in thresholds] for sp in spectra], dtype=np.int64),
    )
    return _npz(arrays)


def capture_nbytes(capture: Any, *, attentions: bool = True) -> int:
    """About the size of :func:`capture_npz`'s file, without making it (to warn before a big download)."""
    total = capture.final_hidden.nbytes + capture.input_ids.nbytes
    for layer in capture.layers:
        total += sum(getattr(layer, n).nbytes for n in ("x", "q", "k", "v", "output", "resid"))
        if attentions and layer.attn is not None:
            total += layer.attn.nbytes
    return int(total)


def spectra_rows(
    spectra: Sequence[Spectrum], labels: Sequence[str], thresholds: Sequence[float] = THRESHOLDS
) -> list[dict]:
    """One flat row per spectrum (for CSV / JSON): effective rank and components needed per threshold."""
    if len(labels) != len(spectra):
        raise ExportError(f"Got {len(labels)} labels for {len(spectra)} spectra.")
    rows = []
    for label, sp in zip(labels, spectra, strict=True):
        row = {
            "matrix": label,
            "tokens": sp.n_rows,
            "features": sp.n_cols,
            "effective_rank": sp.effective_rank,
        }
        for t in thresholds:
            row[f"rank_for_{t:.0%}_energy"] = sp.rank_for(t)
            row[f"fraction_of_L_for_{t:.0%}"] = sp.rank_for(t) / sp.n_rows
        rows.append(row)
    return rows


def sweep_rows(sweep: Any) -> list[dict]:
    """A rank sweep (``atp_viz.analysis.compare.Sweep``) as one row per rank, one column per form."""
    rows = []
    for i, r in enumerate(sweep.ranks):
        row: dict[str, Any] = {"rank": int(r), "fraction_of_L": int(r) / sweep.n_tokens}
        row.update({f"{name}_form_error": float(errs[i]) for name, errs in sweep.errors.items()})
        row["metric"] = sweep.metric
        rows.append(row)
    return rows


def metric_rows(metrics: Mapping[str, Any]) -> list[dict]:
    """A nested dict of metrics (e.g. ``Comparison.as_dict()``) as flat ``{"metric", "value"}`` rows.

    Nested keys are joined with dots and list items get their index (``layer_relative_error.3``), so
    every value keeps its own row; an empty list or dict gets one row with an empty value.
    """
    if not isinstance(metrics, Mapping):
        raise ExportError(f"Expected a dict of metrics, got {type(metrics).__name__}.")
    rows: list[dict] = []

    def walk(name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, Mapping):
            items = [(f"{name}.{k}" if name else str(k), v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            items = [(f"{name}.{i}", v) for i, v in enumerate(value)]
        else:
            rows.append({"metric": name, "value": _plain(value)})
            return
        if not items:
            rows.append({"metric": name, "value": None})
        for k, v in items:
            walk(k, v)

    walk("", metrics)
    return rows
