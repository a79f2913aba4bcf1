"""Training a run: peft LoRA adapters on a fresh copy of the model, with ATP in place.

The paper's accuracy figures come after fine-tuning "with the low-rank attention in place"
(QLoRA-style). Here: LoRA adapters on the attention and MLP projections the model's family declares
(:mod:`atp_viz.hf.families`), trained while every attention layer runs ATP at the chosen rank and
form (:mod:`.objectives`). The basis U_r is recomputed from the current activations at every step and
held constant for backpropagation (``atp_viz.core.basis.principal_basis`` detaches its input).

A run writes to its folder: ``adapter_model.safetensors`` + ``adapter_config.json`` (peft), and
``atp_tuning.json`` (settings, split, loss curve, skipped steps, metrics, times). Its metrics are
measured on the model *reloaded from that folder* (``load_model("tuned:<folder>")``), so loading it
again reproduces them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from atp_viz import forms
from atp_viz.analysis.finetune.config import Cancelled, TuneConfig, TuneResult, default_out_dir
from atp_viz.analysis.finetune.data import encoder_texts, token_windows, windows_of
from atp_viz.analysis.finetune.evaluation import evaluate, heldout_available
from atp_viz.analysis.finetune.objectives import (
    decoder_distillation,
    encoder_distillation,
    lora_target_regex,
    lora_targets,
)
from atp_viz.analysis.finetune.transfer import qk_parameters, transfer_loss
from atp_viz.core.basis import NonFiniteError
from atp_viz.core.progress import ProgressFn, within
from atp_viz.hf import families
from atp_viz.hf.model_info import TUNED_PREFIX, LoadedModel, ModelInfo
from atp_viz.hf.models import load_model
from atp_viz.hf.tuned import SETTINGS_FILE, save_params
from atp_viz.text.corpus import HELDOUT_MODULES

logger = logging.getLogger(__name__)

StepFn = Callable[[str, int, float], None]  # (stage, step, loss)


def _training_data(cfg: TuneConfig, loaded: LoadedModel, texts: Sequence[str] | None) -> list:
    """Windows of ``seq_len`` tokens (decoders) or texts (encoders) of the training split or ``texts``."""
    if loaded.info.is_decoder:
        data = (
            token_windows(cfg.train_modules, loaded.tokenizer, cfg.seq_len)
            if texts is None
            else windows_of("\n\n".join(texts), loaded.tokenizer, cfg.seq_len)
        )
        if not data:
            raise ValueError(f"The training text gives no window of {cfg.seq_len} tokens; lower seq_len.")
        return data
    data = (
        encoder_texts(cfg.train_modules, loaded.tokenizer, max_tokens=cfg.max_tokens)
        if texts is None
        else list(texts)
    )
    if not data:
        raise ValueError("No training texts.")
    return data


def _with_adapters(cfg: TuneConfig, loaded: LoadedModel):
    """The model wrapped by peft with fresh LoRA adapters (seeded from a private RNG stream: the app
    runs this in a thread next to other sessions, whose random bases must not depend on when a run
    starts)."""
    from peft import LoraConfig, get_peft_model

    # peft calls a transformers property that warns about its own rename on every wrap; not ours to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=lora_target_regex(loaded.model),
        fan_in_fan_out=families.family_of(loaded.model).lora_fan_in_fan_out,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(loaded.model, lcfg)
    peft_model.eval()  # no dropout: the objective is deterministic given the batch
    return peft_model


def _form_parameters(cfg: TuneConfig, loaded: LoadedModel) -> dict[int, dict[str, torch.nn.Parameter]]:
    """The form's per-head parameters, one set per layer, at their untrained values or where
    ``cfg.form_init`` says (trainable)."""
    form = forms.get(cfg.form)
    if cfg.attention == "dense":  # a control trains no ATP parameter
        return {}
    start = cfg.initial_params()
    return {
        layer: {
            k: torch.nn.Parameter((torch.full_like(v, start[k]) if k in start else v).to(loaded.device))
            for k, v in form.init_params(loaded.info.n_heads).items()
        }
        for layer in range(loaded.info.n_layers)
        if form.param_defaults
    }


def _item(tuned: LoadedModel, data, cfg: TuneConfig, rng: random.Random, order: list[int]):
    """The next training item: a window (decoders, each once per pass in a shuffled order) or a batch
    of texts drawn at random (encoders)."""
    if tuned.info.is_decoder:
        if not order:
            order.extend(rng.sample(range(len(data)), len(data)))
        return data[order.pop()]
    return rng.sample(data, min(cfg.batch, len(data)))


def _stage2_loss(cfg: TuneConfig, tuned: LoadedModel, item, params, teacher) -> torch.Tensor:
    if tuned.info.is_decoder:
        return decoder_distillation(
            tuned, item.to(tuned.device), cfg, params=params, kl_weight=cfg.kl_weight, teacher=teacher
        )
    atp = cfg.atp_config()
    return encoder_distillation(
        tuned, item, atp, cfg.max_tokens, params=params, hidden_weight=cfg.hidden_weight, teacher=teacher
    )


def _update(loss: torch.Tensor, params, opt, sched, step: int) -> bool:
    """Backpropagate and step; False (nothing changed) when the loss or the gradient is not finite."""
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        logger.warning("step %d: loss is %s; step skipped", step, loss.item())
        return False
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    if not torch.isfinite(norm):
        # An overflowing gradient would make clip_grad_norm_ scale every gradient by 1/inf = 0: the
        # step would silently change nothing. Count it as skipped instead (the linear form's
        # denominators near zero do this to SmolLM2).
        logger.warning("step %d: gradient norm is %s; step skipped", step, norm.item())
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    sched.step()  # the schedule counts updates made
    return True


def _run_stage(
    name: str, steps: int, lr: float, trainable, loss_fn, data, cfg, tuned, span, say, on_step, stop
):
    """One stage's loop: AdamW on ``trainable``, 10-step warm-up then linear decay to 10%. Returns the
    losses (NaN where the loss broke down) and the number of skipped steps."""
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / max(steps, 1))
    )
    rng, order = random.Random(cfg.seed), []
    losses, skipped = [], 0
    for step in range(steps):
        if stop is not None and stop():
            raise Cancelled(f"Cancelled in {name} after {step} of {steps} steps; nothing was saved.")
        try:
            loss = loss_fn(_item(tuned, data, cfg, rng, order))
        except NonFiniteError:
            # The linear form's denominator crossed zero somewhere in the batch: a later layer got
            # inf/NaN. Counted and reported (the run's JSON and the page show skipped steps).
            loss = torch.tensor(float("nan"))
        ok = _update(loss, trainable, opt, sched, step)
        value = float(loss.detach())  # NaN when the loss broke down; finite when only the gradient did
        skipped += not ok
        losses.append(value)
        if on_step:
            on_step(step, value)
        say(
            span[0] + (span[1] - span[0]) * (step + 1) / max(steps, 1),
            f"{name} step {step + 1} of {steps}: loss {value:.4f}",
        )
    return losses, skipped


def _fit(cfg: TuneConfig, loaded: LoadedModel, data, out: Path, say, on_step, stop) -> TuneResult:
    """Both stages on adapters over ``loaded.model``, then save to ``out`` (adapters, the form's
    per-head parameters). Returns the result without metrics."""
    peft_model = _with_adapters(cfg, loaded)
    tuned = LoadedModel(model=peft_model, tokenizer=loaded.tokenizer, info=loaded.info)
    params = _form_parameters(cfg, tuned)
    flat = [p for layer in params.values() for p in layer.values()]
    teacher = peft_model.disable_adapter  # the original model: adapters off (and ATP off by default)
    result = TuneResult(config=cfg, out_dir=out)
    t0 = time.perf_counter()
    split = 0.05 + 0.75 * cfg.transfer_steps / max(cfg.transfer_steps + cfg.steps, 1)
    step_fn = (lambda stage: lambda s, v: on_step(stage, s, v)) if on_step else (lambda stage: None)
    result.transfer_losses, result.transfer_skipped = _run_stage(
        "transfer", cfg.transfer_steps, cfg.transfer_lr, qk_parameters(peft_model) + flat,
        lambda item: transfer_loss(tuned, item, cfg, params, teacher), data, cfg, tuned,
        (0.05, split), say, step_fn("transfer"), stop,
    )  # fmt: skip
    trainable = [p for p in peft_model.parameters() if p.requires_grad] + flat
    result.losses, result.skipped = _run_stage(
        "tuning", cfg.steps, cfg.lr, trainable,
        lambda item: _stage2_loss(cfg, tuned, item, params, teacher), data, cfg, tuned,
        (split, 0.8), say, step_fn("tuning"), stop,
    )  # fmt: skip
    result.train_seconds = time.perf_counter() - t0
    say(0.8, f"Saving adapters to {out}...")
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    # peft also writes a model-card template ("More Information Needed" throughout); atp_tuning.json
    # is this run's real description, so the template is not kept.
    (out / "README.md").unlink(missing_ok=True)
    save_params(out, {cfg.form: params} if params else {})
    return result


def train(
    cfg: TuneConfig,
    out_dir: str | Path | None = None,
    *,
    progress: ProgressFn | None = None,
    on_step: StepFn | None = None,
    stop: Callable[[], bool] | None = None,
    texts: Sequence[str] | None = None,
    command: Sequence[str] | None = None,
) -> TuneResult:
    """Fine-tune a fresh copy of ``cfg.model`` with ATP in place, save, reload, evaluate.

    Stage 1 (``cfg.transfer_steps``, :mod:`.transfer`) trains the form's per-head parameters and the
    Q/K adapters layer by layer against the dense attention outputs; stage 2 (``cfg.steps``) trains
    every adapter (and the form's parameters) end to end (:mod:`.objectives`). The model is loaded anew
    (once more for the evaluation), so a model shared by the app is never touched. ``texts`` replaces
    the training split (the run's JSON then says so); held-out evaluation always uses the held-out
    modules. ``stop()`` returning True cancels: nothing is saved, :class:`Cancelled` is raised.
    ``on_step(stage, step, loss)``: stage is "transfer" or "tuning" (their losses differ in kind).
    ``command``: the command line that started the run, kept in its JSON.
    """
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    if (out / SETTINGS_FILE).exists():
        raise ValueError(f"{out} already holds a fine-tuning run; choose another output folder.")
    say = progress or (lambda f, m: None)
    say(0.0, f"Loading {cfg.model}...")
    loaded = load_model(cfg.model)
    check_fits(
        cfg, loaded.info
    )  # before the texts are prepared: a setting the model cannot take fails at once
    ignored = ignored_settings(cfg, loaded.info)
    if ignored:
        kind = "a decoder" if loaded.info.is_decoder else "an encoder"
        logger.warning("%s %s not read by %s: this run ignores them.", ", ".join(ignored),
                       "is" if len(ignored) == 1 else "are", kind)  # fmt: skip
    say(0.02, "Preparing the training texts (standard-library docstrings, by module)...")
    data = _training_data(cfg, loaded, texts)
    if not heldout_available(loaded, cfg):
        raise ValueError("The held-out split gives nothing to evaluate with these settings; lower seq_len.")
    targets = lora_targets(loaded.model)
    is_dec = loaded.info.is_decoder
    t0 = time.perf_counter()
    cfg = _choose_layer_ranks(cfg, loaded, within(say, 0.02, 0.05, "Choosing per-layer ranks: "))
    chosen_in = time.perf_counter() - t0
    result = _fit(cfg, loaded, data, out, say, on_step, stop)
    meta = _run_record(cfg, result, targets, n_train=len(data), custom=texts is not None, is_dec=is_dec)
    meta["command"] = list(command) if command else None
    if cfg.layer_ranks_from in ("measured", "spectrum"):  # not part of train_seconds, so said apart
        meta["layer_ranks_seconds"] = chosen_in
    _write_json(out / SETTINGS_FILE, meta)

    # Metrics on the model reloaded from disk, so loading the folder again reproduces them.
    say(0.82, "Evaluating dense, untuned ATP and tuned ATP on the held-out modules...")
    t1 = time.perf_counter()
    del loaded  # free the trained copy before loading two more
    gc.collect()
    result.metrics = evaluate(
        load_model(cfg.model), load_model(f"{TUNED_PREFIX}{out}"), cfg,
        progress=within(say, 0.82, 0.99, "Evaluating on the held-out split, "),
    )  # fmt: skip
    result.eval_seconds = time.perf_counter() - t1
    meta["metrics"] = result.metrics
    meta["eval_seconds"] = result.eval_seconds
    _write_json(out / SETTINGS_FILE, meta)
    say(1.0, "Done.")
    return result


ENCODER_ONLY = ("hidden_weight", "batch", "max_tokens", "eval_texts")  # TuneConfig fields per model kind
DECODER_ONLY = ("rank_mode", "kl_weight", "seq_len", "chunk", "eval_windows")


def ignored_settings(cfg: TuneConfig, info: ModelInfo) -> list[str]:
    """The settings given (other than their defaults) that only the other kind of model reads."""
    default = TuneConfig()
    other = ENCODER_ONLY if info.is_decoder else DECODER_ONLY
    return [name for name in other if getattr(cfg, name) != getattr(default, name)]


def check_trains(cfg: TuneConfig) -> None:
    """ValueError when a run would train nothing (0 + 0 steps): asked where a user starts a run (the page,
    the command line); ``train`` itself takes such a run, the base model with an evaluation."""
    if not (cfg.steps or cfg.transfer_steps):
        raise ValueError(
            "Both stages have 0 steps (stage 1, layer-wise transfer: --transfer-steps; stage 2, end to end: "
            "--steps): nothing would be trained."
        )


def check_fits(cfg: TuneConfig, info: ModelInfo) -> None:
    """The settings that only one kind of model takes (ValueError with a sentence otherwise); the
    Fine-tuning page asks before it starts a run."""
    is_dec = info.is_decoder
    if cfg.attention == "dense" and not is_dec:
        raise ValueError(
            "A dense control is for decoders: an encoder's objective distils toward its own dense "
            "embedding, which dense attention already matches (zero loss, nothing to learn)."
        )
    if not is_dec and (isinstance(cfg.rank, int) or cfg.window or cfg.basis_update != "recompute"):
        raise ValueError(
            "A fixed number of principal keys, an exact window and running-sum bases are for decoders (a "
            "past read in chunks); an encoder takes the rank as a share of each text."
        )
    if cfg.layer_ranks_from == "measured" and is_dec:
        raise ValueError(
            "Measured per-layer ranks are for encoders (the loss is the sentence embedding's cosine): a "
            "decoder takes them from the spectra, or as given."
        )
    if is_dec and cfg.seq_len > info.max_tokens:
        raise ValueError(
            f"{info.label} reads at most {info.max_tokens} tokens; seq_len {cfg.seq_len} is longer."
        )
    if cfg.layer_ranks and len(cfg.layer_ranks) != info.n_layers:
        raise ValueError(
            f"{len(cfg.layer_ranks)} per-layer ranks given; {cfg.model} has {info.n_layers} layers."
        )


def _choose_layer_ranks(cfg: TuneConfig, loaded: LoadedModel, say: ProgressFn) -> TuneConfig:
    """The config with its per-layer ranks chosen on training-split texts, if it asks for that."""
    if not cfg.layer_ranks_pending:
        return cfg
    from atp_viz.analysis.allocation import choose_layer_ranks

    shares, _ = choose_layer_ranks(
        cfg.layer_ranks_from, loaded, cfg.rank, form=cfg.form, basis_source=cfg.basis_from,
        centre_basis=cfg.centre_basis, progress=say,
    )  # fmt: skip
    logger.info("per-layer ranks (%s): %s", cfg.layer_ranks_from, shares)
    return replace(cfg, layer_ranks=shares)


def reevaluate(
    folder: str | Path, progress: ProgressFn | None = None, command: Sequence[str] | None = None
) -> dict:
    """Measure a finished run's held-out metrics again with the current code (after a fix in the
    evaluation) and write them into its ``atp_tuning.json``; the metrics they replace are kept under
    ``superseded_metrics`` and the JSON says when and by which command. Returns the new metrics."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not a fine-tuning run (no {SETTINGS_FILE}).")
    meta = json.loads(path.read_text())
    cfg = TuneConfig(**meta["settings"])
    t0 = time.perf_counter()
    metrics = evaluate(
        load_model(cfg.model), load_model(f"{TUNED_PREFIX}{Path(folder)}"), cfg,
        progress=within(progress or (lambda f, m: None), 0.0, 1.0, "Evaluating on the held-out split, "),
        cache=False,
    )  # fmt: skip
    meta.setdefault("superseded_metrics", []).append(meta.get("metrics"))
    meta["metrics"] = metrics
    meta["eval_seconds"] = time.perf_counter() - t0
    meta["reevaluated"] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": list(command) if command else None,
    }
    _write_json(path, meta)
    return metrics


def _run_record(
    cfg: TuneConfig, result: TuneResult, targets, *, n_train: int, custom: bool, is_dec: bool
) -> dict:
    """What ``atp_tuning.json`` says about the run before its metrics are known."""
    split = {
        "source": f"Python {platform.python_version()} standard-library docstrings, split by module",
        "train_modules": "custom texts given to train()" if custom else list(cfg.train_modules),
        "heldout_modules": list(HELDOUT_MODULES),
        "n_train_items": n_train,
        "train_items": "windows of seq_len tokens" if is_dec else "texts of at most max_tokens tokens",
    }
    return {
        "base_model": cfg.model,
        "settings": asdict(cfg),
        "split": split,
        "lora_targets": targets,
        "losses": result.losses,
        "skipped_steps": result.skipped + result.transfer_skipped,
        "transfer_losses": result.transfer_losses,
        "transfer_skipped_steps": result.transfer_skipped,
        "train_seconds": result.train_seconds,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # others' work on a shared machine slows a run down: the load at its end says how busy it was
        "load_average_at_end_of_training": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _write_json(path: Path, obj: dict) -> None:
    # Plain floats, ints and strings only; a skipped step's loss is NaN, which Python's json reads back.
    path.write_text(json.dumps(obj, indent=2) + "\n")
