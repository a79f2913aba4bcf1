"""Loading models: the one entry point, :func:`load_model`, for every kind of model key.

Every model is loaded with this package's attention backend (``attn_implementation="atp_viz"``,
see :mod:`atp_viz.hf.backend`). With no ATP settings active for the current call that backend computes
exactly transformers' eager attention, so one loaded model serves both the dense reference and ATP;
which one runs is decided per call, never by mutating the shared model.

Keys: ``minilm`` and ``smollm2`` (bundled, offline), ``tiny-*`` (random, for tests), a local folder or
``.gguf`` file, a hub id (:mod:`atp_viz.hf.checkpoints`), or ``tuned:<folder>`` for a fine-tuning run
(:mod:`atp_viz.hf.tuned`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from atp_viz.core.progress import ProgressFn
from atp_viz.deploy.settings import Settings
from atp_viz.hf import checkpoints, tuned
from atp_viz.hf.model_info import TUNED_PREFIX, LoadedModel, ModelLoadError

logger = logging.getLogger(__name__)


def load_model(
    key: str,
    *,
    device: str | None = None,
    progress: ProgressFn | None = None,
    settings: Settings | None = None,
    device_map: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a bundled model, a tiny random one, a local folder, a hub id or a tuned run (``tuned:DIR``).

    Raises :class:`ModelLoadError` with a user-facing message for anything that cannot be loaded and,
    with ``settings`` in server mode, for any model not on the server's list (local paths included).
    ``settings`` also caps ``info.max_tokens`` at the deployment's token limit.

    ``device_map`` ("auto": accelerate places the layers over the GPUs) and ``dtype`` (e.g.
    ``torch.float16`` or "float16") are for bigger models on a CUDA machine; the default is float32
    on ``device`` (else CUDA when present, else CPU). Tiny random models take ``dtype`` only.
    """
    key = (key or "").strip()
    if not key:
        raise ModelLoadError("No model given. Pick a bundled model or enter a local folder / hub id.")
    if settings is not None:
        refusal = settings.model_refusal(key)
        if refusal:
            raise ModelLoadError(refusal)
    place = checkpoints.placement(device, device_map, dtype)
    t0 = time.perf_counter()
    if key.startswith(TUNED_PREFIX):
        loaded = tuned.load_tuned(key.removeprefix(TUNED_PREFIX), place, device=device, progress=progress)
    else:
        loaded = checkpoints.load_checkpoint(key, place, device=device, progress=progress)
    logger.info("load_model(%s) took %.2f s", key, time.perf_counter() - t0)
    limit = settings.token_limit if settings is not None else None
    if limit is not None and limit < loaded.info.max_tokens:
        # The deployment's token limit: every page and the generation length obey info.max_tokens.
        loaded = replace(loaded, info=replace(loaded.info, max_tokens=limit))
    return loaded
