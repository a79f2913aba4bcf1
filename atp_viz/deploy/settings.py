"""Deployment settings: local use (the default) or *server mode* for a shared deployment.

Read from the environment and an optional TOML file:

- ``ATP_VIZ_SERVER_MODE=1`` turns server mode on (``0`` turns it off even when a config file says on;
  set but empty counts as not set);
- ``ATP_VIZ_CONFIG=/path/to/atp_viz.toml`` names a config file; giving one turns server mode on
  unless the file says ``server_mode = false``;
- ``ATP_VIZ_DEVICE_MAP=auto`` and ``ATP_VIZ_DTYPE=float16`` ask for bigger-model loading on GPUs
  (used only when CUDA is available, see :meth:`Settings.load_kwargs`).

Server mode enforces, in the library as well as in the UI: only the models in ``allowed_models``
load (the bundled ones by default; no local paths unless the operator lists one), uploads and texts
are capped (``max_upload_bytes``, ``max_tokens``). The memory guards (``max_map_tokens``,
``map_display_size``, ``max_heavy_jobs``) apply in both modes. Every refusal is a sentence for the
user, never an exception the app does not catch.

Example file (every key optional; unknown keys are an error so that typos do not pass silently)::

    server_mode = true
    allowed_models = ["minilm", "smollm2", "HuggingFaceTB/SmolLM2-360M-Instruct"]
    max_upload_bytes = 500_000
    max_tokens = 2048
    max_map_tokens = 2048
    map_display_size = 256
    max_heavy_jobs = 1
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from atp_viz.core.units import format_bytes

ENV_SERVER_MODE = "ATP_VIZ_SERVER_MODE"
ENV_CONFIG = "ATP_VIZ_CONFIG"
ENV_DEVICE_MAP = "ATP_VIZ_DEVICE_MAP"
ENV_DTYPE = "ATP_VIZ_DTYPE"

BUNDLED_KEYS = ("minilm", "smollm2")  # = models.BUNDLED's keys (not imported: this module stays light)
SERVER_MAX_TOKENS = 4096  # server mode's token cap when the config file does not set one
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named strategies
DTYPES = ("float32", "float16", "bfloat16")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """The environment or the config file is invalid; the message is meant for the operator, as is."""


@dataclass(frozen=True)
class Settings:
    """Limits and switches of one app process (a frozen, hashable value: usable as a cache key)."""

    server_mode: bool = False
    # Server mode: the only model keys / hub ids / folders that may be loaded. Tiny test models and
    # local folders load only if listed here. Ignored outside server mode (any model loads there).
    allowed_models: tuple[str, ...] = BUNDLED_KEYS
    # Uploaded files above this are refused (bytes). 1 MB holds a long essay; the token cap bites first.
    max_upload_bytes: int = 1_000_000
    # Tokens per text (None: each model's own limit). Longer texts are cut with a notice.
    # Server mode defaults to SERVER_MAX_TOKENS: an L x L attention pass grows with L^2.
    max_tokens: int | None = None
    # L x L attention maps are drawn only up to this many tokens (dense and ATP maps of one head and
    # layer cost about 3 x heads x L^2 floats to compute: 0.6 GB for 9 heads at 4096 tokens).
    max_map_tokens: int = 4096
    # Maps larger than this (per side) are block-averaged before drawing: the browser gets at most
    # map_display_size^2 cells per heatmap instead of L^2.
    map_display_size: int = 256
    # Heavy jobs (rank sweeps, perplexity, generation, benchmarks) running at once in this process,
    # across all sessions; one more is refused with a "try again" message instead of queueing.
    max_heavy_jobs: int = 1
    # Bigger models on GPUs: accelerate's device_map (e.g. "auto") and a torch dtype name; both are
    # used only when CUDA is available (see load_kwargs).
    device_map: str | None = None
    dtype: str | None = None
    source: str = "defaults"  # where these settings came from, in words (for the sidebar note)

    @property
    def token_limit(self) -> int | None:
        """The token cap in force: the configured one, else SERVER_MAX_TOKENS in server mode."""
        if self.max_tokens is not None:
            return self.max_tokens
        return SERVER_MAX_TOKENS if self.server_mode else None

    def model_refusal(self, key: str) -> str | None:
        """Why ``key`` may not be loaded under these settings, or None when it may."""
        key = (key or "").strip()
        if not self.server_mode or key in self.allowed_models:
            return None
        available = ", ".join(self.allowed_models) or "none"
        if _looks_like_path(key):
            return (
                f"Loading models from local paths ('{key}') is disabled on this server (server mode). "
                f"Models available here: {available}."
            )
        return (
            f"'{key}' is not one of this server's models (server mode). Models available here: {available}."
        )

    def map_refusal(self, n_tokens: int) -> str | None:
        """Why an L x L attention map of ``n_tokens`` tokens is not computed, or None when it is."""
        if n_tokens <= self.max_map_tokens:
            return None
        return (
            f"Attention maps are not drawn for this text: it has {n_tokens:,} tokens and the L x L maps are "
            f"limited to {self.max_map_tokens:,} tokens here (each would hold {n_tokens**2 / 1e6:,.0f} M "
            "values per head). Pick a shorter text or sample; every other view on this page still works."
        )

    def load_kwargs(self, cuda_available: bool | None = None) -> dict[str, Any]:
        """``device_map``/``dtype`` for :func:`atp_viz.models.load_model`: only on a CUDA machine
        (``cuda_available`` None: ask torch). Elsewhere the models load as usual, in float32."""
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            return {}
        out: dict[str, Any] = {}
        if self.device_map:
            out["device_map"] = self.device_map
        if self.dtype:
            out["dtype"] = self.dtype
        return out

    def describe(self) -> str:
        """One line for the sidebar: what server mode restricts."""
        limit = self.token_limit
        return (
            f"Server mode: models {', '.join(self.allowed_models)}; uploads up to "
            f"{format_bytes(self.max_upload_bytes)}"
            + (f"; texts up to {limit:,} tokens" if limit else "")
            + f"; {self.max_heavy_jobs} heavy job(s) at a time."
        )


def _looks_like_path(key: str) -> bool:
    if key.startswith(("/", ".", "~", "\\")) or (len(key) > 1 and key[1] == ":"):
        return True
    try:
        return Path(key).expanduser().exists()
    except OSError:
        return False


def _flag(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a switch; use 1 or 0.")


_INT_FIELDS = {
    "max_upload_bytes": 1,
    "max_tokens": 128,  # the Serving page asks for at least 64 tokens; leave room for a prompt
    "max_map_tokens": 2,
    "map_display_size": 16,
    "max_heavy_jobs": 1,
}


def _validate(values: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(Settings)} - {"source"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
        )
    out = dict(values)
    if "server_mode" in out and not isinstance(out["server_mode"], bool):
        raise SettingsError(f"{where}: server_mode must be true or false.")
    if "allowed_models" in out:
        models = out["allowed_models"]
        if (
            not isinstance(models, list | tuple)
            or not models
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            raise SettingsError(
                f"{where}: allowed_models must be a non-empty list of model keys or hub ids (strings)."
            )
        out["allowed_models"] = tuple(dict.fromkeys(m.strip() for m in models))
    for name, lowest in _INT_FIELDS.items():
        if name not in out or (name == "max_tokens" and out[name] is None):
            continue
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
            raise SettingsError(f"{where}: {name} must be a whole number >= {lowest}, got {v!r}.")
    if out.get("device_map") is not None and out["device_map"] not in DEVICE_MAPS:
        raise SettingsError(f"{where}: device_map must be one of {', '.join(DEVICE_MAPS)}.")
    if out.get("dtype") is not None and out["dtype"] not in DTYPES:
        raise SettingsError(f"{where}: dtype must be one of {', '.join(DTYPES)}.")
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The validated settings of one TOML file (keys as in :class:`Settings`)."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"{ENV_CONFIG} names {p}, which does not exist.") from None
    except OSError as err:
        raise SettingsError(f"Cannot read the config file {p}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"The config file {p} is not valid TOML: {err}") from None
    return _validate(raw, str(p))


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from ``env`` (the process environment by default) and the file it names.

    Raises :class:`SettingsError` for an invalid switch or file: a server must not start with a
    configuration it could not read (it would silently run unrestricted).
    """
    values: dict[str, Any] = {}
    sources = []
    path = (env.get(ENV_CONFIG) or "").strip()
    if path:
        values = read_config(path)
        values.setdefault("server_mode", True)
        sources.append(path)
    # Empty counts as not given (docker-compose's `ATP_VIZ_SERVER_MODE=` or `${VAR:-}`): it must not
    # override a config file that turns server mode on.
    raw_mode = (env.get(ENV_SERVER_MODE) or "").strip()
    if raw_mode:
        values["server_mode"] = _flag(ENV_SERVER_MODE, raw_mode)
        sources.append(f"{ENV_SERVER_MODE}={raw_mode}")
    for name, var in (("device_map", ENV_DEVICE_MAP), ("dtype", ENV_DTYPE)):
        if env.get(var):
            values[name] = env[var].strip()
            sources.append(f"{var}={env[var]}")
    values = _validate(values, ", ".join(sources) or "defaults")
    return replace(Settings(), **values, source=", ".join(sources) or "defaults")
