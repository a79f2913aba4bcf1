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
import platform
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from atp_viz.analysis.finetune.config import Cancelled, TuneConfig, TuneResult, default_out_dir
from atp_viz.analysis.finetune.data import encoder_texts, token_windows, windows_of
from atp_viz.analysis.finetune.evaluation import evaluate, heldout
from atp_viz.analysis.finetune.objectives import (
    decoder_nll,
    encoder_embeddings,
    lora_target_regex,
    lora_targets,
)
from atp_viz.core.basis import NonFiniteError
from atp_viz.core.progress import ProgressFn
from atp_viz.hf.engine import ATPConfig
from atp_viz.hf.model_info import TUNED_PREFIX, LoadedModel
from atp_viz.hf.models import load_model
from atp_viz.hf.tuned import SETTINGS_FILE
from atp_viz.text.corpus import HELDOUT_MODULES, TRAIN_MODULES

logger = logging.getLogger(__name__)

StepFn = Callable[[int, float], None]


def _training_data(cfg: TuneConfig, loaded: LoadedModel, texts: Sequence[str] | None) -> list:
    """Windows of ``seq_len`` tokens (decoders) or texts (encoders) of the training split or ``texts``."""
    if loaded.info.is_decoder:
        data = (
            token_windows(TRAIN_MODULES, loaded.tokenizer, cfg.seq_len)
            if texts is None
            else windows_of("\n\n".join(texts), loaded.tokenizer, cfg.seq_len)
        )
        if not data:
            raise ValueError(f"The training text gives no window of {cfg.seq_len} tokens; lower seq_len.")
        return data
    data = (
        encoder_texts(TRAIN_MODULES, loaded.tokenizer, max_tokens=cfg.max_tokens)
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
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(loaded.model, lcfg)
    peft_model.eval()  # no dropout: the objective is deterministic given the batch
    return peft_model


def _loss(cfg: TuneConfig, tuned: LoadedModel, peft_model, item, atp_cfg: ATPConfig) -> torch.Tensor:
    """One step's loss: a window's strictly causal next-token loss, or a batch's 1 - cosine to the
    dense embeddings of the same texts (adapters off). NaN when a layer's input broke down."""
    try:
        if tuned.info.is_decoder:
            return decoder_nll(tuned, item.to(tuned.device), cfg.rank, cfg.form, cfg.chunk)[0]
        with torch.no_grad(), peft_model.disable_adapter():
            target = encoder_embeddings(tuned, item, None, cfg.max_tokens)
        emb = encoder_embeddings(tuned, item, atp_cfg, cfg.max_tokens)
        return (1 - (emb * target).sum(-1)).mean()
    except NonFiniteError:
        # The linear form's denominator crossed zero somewhere in the batch: a later layer got
        # inf/NaN. Counted and reported (the run's JSON and the page show skipped steps).
        return torch.tensor(float("nan"))


def _update(loss: torch.Tensor, params, opt, sched, step: int) -> bool:
    """Backpropagate and step; False (nothing changed) when the loss or the gradient is not finite."""
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        logger.warning("step %d: loss is %s; step skipped", step, float(loss))
        return False
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    if not torch.isfinite(norm):
        # An overflowing gradient would make clip_grad_norm_ scale every gradient by 1/inf = 0: the
        # step would silently change nothing. Count it as skipped instead (the linear form's
        # denominators near zero do this to SmolLM2).
        logger.warning("step %d: gradient norm is %s; step skipped", step, float(norm))
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    sched.step()  # the schedule counts updates made
    return True


def _run_steps(cfg, tuned, peft_model, data, result: TuneResult, say, on_step, stop) -> None:
    """The training loop: AdamW on the adapters, 10-step warm-up then linear decay to 10%."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / max(cfg.steps, 1))
    )
    atp_cfg = ATPConfig(rank=cfg.rank, form=cfg.form)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    for step in range(cfg.steps):
        if stop is not None and stop():
            result.cancelled = True
            raise Cancelled(f"Cancelled after {step} of {cfg.steps} steps; nothing was saved.")
        if tuned.info.is_decoder:
            if not order:
                order = rng.sample(range(len(data)), len(data))
            item = data[order.pop()]
        else:
            item = rng.sample(data, min(cfg.batch, len(data)))
        loss = _loss(cfg, tuned, peft_model, item, atp_cfg)
        ok = _update(loss, params, opt, sched, step)
        value = float(loss.detach())  # NaN when the loss broke down; finite when only the gradient did
        result.skipped += not ok
        result.losses.append(value)
        if on_step:
            on_step(step, value)
        say(0.05 + 0.75 * (step + 1) / max(cfg.steps, 1), f"step {step + 1} of {cfg.steps}: loss {value:.4f}")


def train(
    cfg: TuneConfig,
    out_dir: str | Path | None = None,
    *,
    progress: ProgressFn | None = None,
    on_step: StepFn | None = None,
    stop: Callable[[], bool] | None = None,
    texts: Sequence[str] | None = None,
) -> TuneResult:
    """Fine-tune adapters on a fresh copy of ``cfg.model`` with ATP in place, save, reload, evaluate.

    The model is loaded anew (twice: one copy is trained, one stays dense as the reference), so a
    model shared by the app is never touched. ``texts`` replaces the training split (the run's JSON
    then says so); held-out evaluation always uses the held-out modules. ``stop()`` returning True
    cancels: nothing is saved, :class:`Cancelled` is raised.
    """
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    if (out / SETTINGS_FILE).exists():
        raise ValueError(f"{out} already holds a fine-tuning run; choose another output folder.")
    say = progress or (lambda f, m: None)
    say(0.0, f"Loading {cfg.model}...")
    loaded = load_model(cfg.model)
    say(0.02, "Preparing the training texts (standard-library docstrings, by module)...")
    data = _training_data(cfg, loaded, texts)
    if not heldout(loaded, cfg):
        raise ValueError("The held-out split gives nothing to evaluate with these settings; lower seq_len.")
    targets = lora_targets(loaded.model)
    peft_model = _with_adapters(cfg, loaded)
    tuned = LoadedModel(model=peft_model, tokenizer=loaded.tokenizer, info=loaded.info)
    result = TuneResult(config=cfg, out_dir=out)
    t0 = time.perf_counter()
    _run_steps(cfg, tuned, peft_model, data, result, say, on_step, stop)
    result.train_seconds = time.perf_counter() - t0

    say(0.8, f"Saving adapters to {out}...")
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    # peft also writes a model-card template ("More Information Needed" throughout); atp_tuning.json
    # is this run's real description, so the template is not kept.
    (out / "README.md").unlink(missing_ok=True)
    meta = _run_record(
        cfg, result, targets, n_train=len(data), custom=texts is not None, is_dec=tuned.info.is_decoder
    )
    _write_json(out / SETTINGS_FILE, meta)

    # Metrics on the model reloaded from disk, so loading the folder again reproduces them.
    say(0.82, "Evaluating dense, untuned ATP and tuned ATP on the held-out modules...")
    t1 = time.perf_counter()
    del peft_model, tuned, loaded  # free the trained copy before loading two more
    gc.collect()
    result.metrics = evaluate(load_model(cfg.model), load_model(f"{TUNED_PREFIX}{out}"), cfg)
    result.eval_seconds = time.perf_counter() - t1
    meta["metrics"] = result.metrics
    meta["eval_seconds"] = result.eval_seconds
    _write_json(out / SETTINGS_FILE, meta)
    say(1.0, "Done.")
    return result


def _run_record(
    cfg: TuneConfig, result: TuneResult, targets, *, n_train: int, custom: bool, is_dec: bool
) -> dict:
    """What ``atp_tuning.json`` says about the run before its metrics are known."""
    split = {
        "source": f"Python {platform.python_version()} standard-library docstrings, split by module",
        "train_modules": "custom texts given to train()" if custom else list(TRAIN_MODULES),
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
        "skipped_steps": result.skipped,
        "train_seconds": result.train_seconds,
        "torch": torch.__version__,
    }


def _write_json(path: Path, obj: dict) -> None:
    # Plain floats, ints and strings only; a skipped step's loss is NaN, which Python's json reads back.
    path.write_text(json.dumps(obj, indent=2) + "\n")
