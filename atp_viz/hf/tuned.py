"""Fine-tuned runs on disk: a folder with peft LoRA adapters and ``atp_tuning.json``.

``load_model("tuned:<folder>")`` (:mod:`atp_viz.hf.models`) loads the run's base model with the
adapters merged in, so every page and the ATP backend work on it unchanged. The sidebar lists the
finished runs found by :func:`find_runs` (the cache's ``tuned/`` folder and the repository's
``data/tuned/``). Writing runs is :mod:`atp_viz.analysis.finetune`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from atp_viz import forms
from atp_viz.core.progress import ProgressFn
from atp_viz.core.ranks import describe_layer_shares, describe_window
from atp_viz.hf import checkpoints
from atp_viz.hf.model_info import TUNED_PREFIX, LoadedModel, ModelLoadError, cache_dir, short_name

SETTINGS_FILE = "atp_tuning.json"
PARAMS_FILE = "atp_params.safetensors"  # trained per-head parameters of the attention form, if any


def save_params(folder: Path, params: dict[str, dict[int, dict]]) -> None:
    """Write form -> layer -> name -> [H] tensors as ``form/layer/name`` entries of one safetensors file."""
    from safetensors.torch import save_file

    flat = {
        f"{form}/{layer}/{name}": t.detach().float().cpu().contiguous()
        for form, layers in params.items()
        for layer, named in layers.items()
        for name, t in named.items()
    }
    if flat:
        save_file(flat, str(folder / PARAMS_FILE))


def load_params(folder: Path) -> dict[str, dict[int, dict]]:
    from safetensors.torch import load_file

    path = folder / PARAMS_FILE
    out: dict[str, dict[int, dict]] = {}
    if path.is_file():
        for key, t in load_file(str(path)).items():
            form, layer, name = key.split("/")
            out.setdefault(form, {}).setdefault(int(layer), {})[name] = t
    return out


REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "data" / "tuned"


def run_folder(folder: str | Path) -> Path:
    """A run's folder as a user or a link names it: a relative path that is not there from the current
    folder is read from the repository's root, so ``tuned:data/tuned/NAME`` works from anywhere."""
    path = Path(folder).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def run_key(folder: str | Path) -> str:
    """The model key that names a run in links and lists: ``tuned:data/tuned/NAME`` for a shipped run (the
    same on every checkout, and no server path in a shared link), its resolved absolute path otherwise
    (a cache's runs), so two spellings of one folder are one key."""
    path = run_folder(folder)
    try:
        return f"{TUNED_PREFIX}{path.resolve().relative_to(REPO_ROOT)}"
    except ValueError:  # outside the repository (the cache's runs): its own path, however it was written
        return f"{TUNED_PREFIX}{path.resolve()}"


def read_settings(folder: str | Path) -> dict:
    if not str(folder).strip():
        raise ModelLoadError("No run folder given after 'tuned:' (e.g. tuned:data/tuned/RUN).")
    path = run_folder(folder) / SETTINGS_FILE
    if not path.parent.is_dir():
        raise ModelLoadError(f"No such run folder: {folder}.")
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not an ATP fine-tuning run (no {SETTINGS_FILE}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


def base_model_of(key: str) -> str | None:
    """The base model a ``tuned:<folder>`` key was fine-tuned from (None for any other key)."""
    if not key.startswith(TUNED_PREFIX):
        return None
    return read_settings(key[len(TUNED_PREFIX) :])["base_model"]


def settings_of(key: str) -> dict:
    """The training settings of a ``tuned:<folder>`` model ({} for any other model)."""
    if not key.startswith(TUNED_PREFIX):
        return {}
    return read_settings(key[len(TUNED_PREFIX) :])["settings"]


def as_tuned(key: str) -> dict:
    """How a tuned model was tuned, as the defaults every command and page reads it with (one place, so
    that they agree): {"form", "basis_from", "centre_basis", "rank", "rank_mode", "seq_len", "chunk",
    "sinks", "window", "basis_update", "layer_ranks", "attention"}. ``rank`` is None for any other model,
    which gets the usual defaults (the default form, "input" basis, plain, zeros, "recompute", no per-layer
    shares, "atp"); a setting an older run did not record is None. ``attention`` "dense": a control, which
    trained no ATP setting."""
    s = settings_of(key)
    return {
        "form": s.get("form", forms.DEFAULT),
        "basis_from": s.get("basis_from", "input"),
        "centre_basis": bool(s.get("centre_basis", False)),
        "rank": s.get("rank"),
        "rank_mode": s.get("rank_mode"),
        "seq_len": s.get("seq_len"),
        "chunk": s.get("chunk"),
        "sinks": s.get("sinks", 0),
        "window": s.get("window", 0),
        "basis_update": s.get("basis_update", "recompute"),
        "layer_ranks": tuple(s.get("layer_ranks") or ()),
        "attention": s.get("attention", "atp"),
    }


def trained_setting(s: dict) -> str:
    """How a run's settings read in a sentence: 'r = 0.5 L', or for a fixed rank behind an exact window
    'r = 128 principal keys of the middle, exact window 512 + 4 sinks'."""
    if s.get("layer_ranks"):
        return f"r = {s['rank']:g} L on average, per layer ({describe_layer_shares(s['layer_ranks'])})"
    if not isinstance(s["rank"], int):
        return f"r = {s['rank']:g} L"
    if not s.get("window"):
        return f"r = {s['rank']} principal keys of the past"
    return f"r = {s['rank']} principal keys of the middle, {describe_window(s['window'], s.get('sinks', 0))}"


def tuned_label(meta: dict) -> str:
    s = meta["settings"]
    basis = "" if s.get("basis_from", "input") == "input" else f", basis from {s['basis_from']}"
    basis += ", centred" if s.get("centre_basis") else ""
    if s.get("window"):  # trained behind an exact window: the rank counts the middle's principal keys
        basis += f", {describe_window(s['window'], s.get('sinks', 0))}, {s.get('basis_update', 'recompute')}"
    if s.get("attention", "atp") == "dense":
        # It trained no ATP parameter, so the rank and form are only the default of its ATP rows (any
        # rank can be compared against it): the label leads with what it is.
        what = f"trained without ATP; ATP rows default to r={s['rank']:g}, {s['form']}{basis}"
        return f"{short_name(s['model'])} + dense-tuned control ({what})"
    if s.get("layer_ranks"):
        basis += f", per-layer ranks ({s.get('layer_ranks_from', 'given')})"
    return f"{short_name(s['model'])} + ATP-tuned r={s['rank']:g} ({s['form']}{basis})"


def load_tuned(
    folder: str | Path,
    place: dict[str, Any],
    *,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """The base model with the run's adapters merged in (a plain transformers model again)."""
    from peft import PeftModel

    folder = run_folder(folder)
    meta = read_settings(folder)
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{folder} has no adapter_config.json (an unfinished or cancelled run?).")
    loaded = checkpoints.load_checkpoint(meta["base_model"], place, device=device, progress=progress)
    model = PeftModel.from_pretrained(loaded.model, folder).merge_and_unload()
    model.eval()
    info = replace(
        loaded.info,
        key=run_key(folder),  # tuned:data/tuned/NAME for a shipped run: no server path in records
        label=tuned_label(meta),
        source=f"{loaded.info.source} + LoRA adapters from {folder}",
    )
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, info=info, atp_params=load_params(folder))


def find_runs(roots: Sequence[Path] | None = None) -> list[tuple[Path, dict]]:
    """Finished runs (with metrics) under the default places: ``<cache>/tuned`` and ``data/tuned``."""
    if roots is None:
        roots = [cache_dir() / "tuned", SHIPPED_DIR]
    runs = []
    for root in roots:
        if not root.is_dir():
            continue
        for sub in sorted(root.iterdir()):
            try:
                meta = read_settings(sub)
            except ModelLoadError:
                continue
            if "metrics" in meta and (sub / "adapter_config.json").is_file():
                runs.append((sub, meta))
    return runs
