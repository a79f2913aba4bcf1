"""Low-rank-aware fine-tuning: LoRA adapters trained with ATP in place (the paper's claim 4).

The paper's accuracy figures come after fine-tuning "with the low-rank attention in place"
(QLoRA-style). Here: peft LoRA adapters on the attention and MLP projections of a fresh copy of the
model, trained while every attention layer runs ATP at the chosen rank and form. The basis U_r is
recomputed from the current activations at every step and held constant for backpropagation
(``atp.principal_basis`` detaches its input).

Objectives, chosen so nothing leaks:

- encoders (MiniLM): distil toward the *dense* model's own sentence embedding of the same text
  (loss 1 - cosine), unlabeled text; ATP runs on each whole text, which is legitimate for an
  encoder (it sees the whole text anyway);
- decoders (SmolLM2): next-token cross-entropy in the strictly causal chunked mode of
  :func:`atp_viz.serving.chunked_logits` only (chunk c attends to the compressed past of chunks < c,
  basis from those past tokens alone, and to itself causally). A basis over the whole sequence would
  let position i read tokens after i through U_r and the model would learn to cheat.
  Loss and metrics cover the predictions made at positions whose past is compressed (chunk 1
  onwards): chunk 0 has no past to compress (in the exact form it is dense attention), so counting it
  would dilute the difference the compression makes.

Data: docstrings of Python's standard library (real text this project did not write), split by
module into :data:`TRAIN_MODULES` and :data:`HELDOUT_MODULES`, never both; the split is written
into each run's JSON.

A run writes to its folder: ``adapter_model.safetensors`` + ``adapter_config.json`` (peft), and
``atp_tuning.json`` (settings, split, loss curve, metrics, times). Its metrics are measured on the
model *reloaded from that folder* (:func:`load_tuned`), so loading it again reproduces them.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import logging
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from atp_viz import atp, backend, serving
from atp_viz.capture import mean_pool
from atp_viz.engine import ATPConfig, make_plan
from atp_viz.models import LoadedModel, ModelLoadError, cache_dir, load_model

logger = logging.getLogger(__name__)

SETTINGS_FILE = "atp_tuning.json"
TUNED_PREFIX = "tuned:"
Form = Literal["exact", "linear"]
ProgressFn = Callable[[float, str], None]
StepFn = Callable[[int, float], None]

# Split by module, so no module's text is in both. Held-out: ~88k characters (~22k SmolLM2 tokens).
HELDOUT_MODULES: tuple[str, ...] = (
    "difflib", "statistics", "fractions", "ipaddress", "calendar", "textwrap", "cmd", "graphlib",
    "heapq", "pprint",
)  # fmt: skip
TRAIN_MODULES: tuple[str, ...] = (
    "argparse", "logging", "typing", "inspect", "doctest", "pdb", "threading", "email.message",
    "unittest.case", "ast", "xml.etree.ElementTree", "smtplib", "codecs", "configparser", "ssl",
    "optparse", "imaplib", "shutil", "urllib.request", "subprocess", "http.client", "tarfile",
    "enum", "collections", "ftplib", "pydoc", "socket", "re", "json", "traceback", "zipfile",
    "mailbox", "asyncio.events", "uuid", "concurrent.futures._base", "platform", "pathlib", "wave",
    "random", "tempfile", "functools", "base64", "contextlib", "lzma", "itertools", "mimetypes",
    "pickle", "bz2", "queue", "array", "gzip", "locale", "selectors", "tokenize", "csv", "dataclasses",
    "numbers", "plistlib", "abc", "io", "weakref", "warnings", "trace", "hashlib", "sysconfig",
    "filecmp", "copy", "hmac",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def module_docstrings(name: str) -> list[str]:
    """Docstrings of one standard-library module: the module, its classes and their methods, its
    functions (defined in that module only, so no text is borrowed from another module)."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return []
    docs = [inspect.getdoc(mod) or ""]
    for _, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", "") != name:
            continue
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
            for _, meth in sorted(vars(obj).items()):
                if inspect.isfunction(meth) and meth.__doc__:
                    docs.append(inspect.cleandoc(meth.__doc__))
        elif inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    seen: set[str] = set()
    out = []
    for d in docs:
        d = d.strip()
        if d and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def docstrings(modules: Sequence[str]) -> list[str]:
    """The modules' docstrings. Any other split leaves out a docstring that also occurs in the held-out
    modules (generated ones such as namedtuple's or total_ordering's repeat across modules)."""
    docs = [d for m in modules for d in module_docstrings(m)]
    if tuple(modules) != HELDOUT_MODULES:
        held = {d for m in HELDOUT_MODULES for d in module_docstrings(m)}
        docs = [d for d in docs if d not in held]
    return docs


def encoder_texts(
    modules: Sequence[str], tokenizer, *, min_tokens: int = 24, max_tokens: int = 128
) -> list[str]:
    """Docstrings with at least ``min_tokens`` tokens, each cut at a paragraph boundary to at most
    ``max_tokens`` tokens (so every text is whole paragraphs, not a cut mid-sentence)."""
    out = []
    for doc in docstrings(modules):
        text = ""
        for para in doc.split("\n\n"):
            cand = f"{text}\n\n{para}" if text else para
            if len(tokenizer(cand, add_special_tokens=True, verbose=False)["input_ids"]) > max_tokens:
                break
            text = cand
        if text and len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]) >= min_tokens:
            out.append(text)
    return out


def token_windows(modules: Sequence[str], tokenizer, seq_len: int) -> list[torch.Tensor]:
    """The modules' docstrings joined into one stream, cut into windows of ``seq_len`` tokens
    (the last partial window is dropped)."""
    return _windows_of("\n\n".join(docstrings(modules)), tokenizer, seq_len)


def _windows_of(text: str, tokenizer, seq_len: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    n = ids.shape[0] // seq_len
    return [ids[i * seq_len : (i + 1) * seq_len][None] for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Settings and results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneConfig:
    """One fine-tuning run. Defaults are the ones the README's table was measured with."""

    model: str = "minilm"
    rank: float = 0.5  # share of L (encoders: of each text; decoders: of each chunk's past)
    form: Form = "exact"
    steps: int = 200
    lr: float = 1e-3  # AdamW on the adapters only; LoRA tolerates a high rate
    lora_r: int = 8  # adapter rank (not the ATP rank)
    lora_alpha: int = 16
    batch: int = 16  # encoder texts per step (decoders: one window per step)
    max_tokens: int = 128  # encoder: longest training / evaluation text
    seq_len: int = 512  # decoder: window length
    chunk: int = 128  # decoder: chunk size of the strictly causal mode
    eval_texts: int = 128  # encoder: held-out texts evaluated
    eval_windows: int = 8  # decoder: held-out windows evaluated
    seed: int = 0

    def __post_init__(self) -> None:
        if self.form not in ("exact", "linear"):
            raise ValueError(f"form must be 'exact' or 'linear', got {self.form!r}")
        if not (isinstance(self.rank, float) and 0.0 < self.rank <= 1.0):
            raise ValueError(f"rank must be a share of L in (0, 1], e.g. 0.5 or 0.25; got {self.rank!r}")
        if self.steps < 0 or self.batch < 1 or self.lora_r < 1:
            raise ValueError("steps must be >= 0, batch and lora_r >= 1")
        if self.eval_texts < 2 or self.eval_windows < 1:
            raise ValueError("eval_texts must be >= 2 (nearest neighbours need two) and eval_windows >= 1")
        if not self.lr > 0 or self.max_tokens < 8 or self.seq_len < 4:
            raise ValueError("lr must be > 0, max_tokens >= 8 and seq_len >= 4")
        if self.chunk >= self.seq_len:
            raise ValueError(f"chunk ({self.chunk}) must be smaller than seq_len ({self.seq_len})")

    def label(self) -> str:
        return f"ATP-tuned r={self.rank:g}L ({self.form})"


@dataclass
class TuneResult:
    config: TuneConfig
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    cancelled: bool = False
    skipped: int = 0  # steps whose loss or gradient was not finite (no update)


class Cancelled(Exception):
    """Raised inside training when the caller's ``stop()`` returns True."""


# ------------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------------


def _lora_targets(model) -> list[str]:
    """Attention and MLP projections by the names transformers uses (BERT / Llama-like)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if {"q_proj", "k_proj", "v_proj"} <= names:
        return [n for n in llama if n in names]
    if {"query", "key", "value"} <= names:
        # BERT: attention.output.dense, intermediate.dense and output.dense are all "dense"; the
        # pooler's dense layer is excluded by the regex below (embeddings are mean-pooled).
        return ["query", "key", "value", "dense"]
    raise ValueError("No attention projections found to put adapters on (expected q_proj/k_proj/v_proj).")


def _target_regex(model, names: list[str]) -> str:
    # peft accepts a regex; it keeps BERT's pooler (not used by mean pooling) out of training.
    alt = "|".join(names)
    return rf"^(?!.*pooler).*\.({alt})$"


def _encoder_embeddings(loaded: LoadedModel, texts: Sequence[str], config: ATPConfig | None, max_tokens: int):
    """Mean-pooled, normalised sentence embeddings [N, d] (with autograd if enabled)."""
    enc = loaded.tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
    )
    ids = enc["input_ids"].to(loaded.device)
    mask = enc["attention_mask"].to(loaded.device)
    plan = make_plan(config, loaded.info.n_layers)
    with backend.activate(loaded.model, atp=plan, key_mask=mask):
        out = loaded.model(input_ids=ids, attention_mask=mask)
    return mean_pool(out.last_hidden_state, mask)


def decoder_losses(loaded: LoadedModel, ids: torch.Tensor, rank, form: str, chunk: int):
    """The decoder objective: per-position next-token losses ``[L - chunk - 1]`` of the predictions
    made at positions chunk .. L-2 (entry j: the logits at position chunk + j, which attend to the
    compressed past, predict token chunk + j + 1), and the top-1 hits among them.

    Strictly causal (``serving.chunked_logits``); ``tests/test_finetune.py`` perturbs later tokens.
    """
    logits = serving.chunked_logits(loaded, ids, rank=rank, form=form, chunk=chunk)  # (L, V)
    target = ids[0, chunk + 1 :].to(logits.device)
    pred = logits[chunk:-1]  # logits at i predict token i + 1; i >= chunk has a compressed past
    losses = torch.nn.functional.cross_entropy(pred.float(), target, reduction="none")
    hits = int((pred.argmax(-1) == target).sum())
    return losses, hits


def _decoder_nll(loaded: LoadedModel, ids: torch.Tensor, rank, form: str, chunk: int):
    """(mean NLL, top-1 hits, count) over positions >= chunk (those whose past is compressed)."""
    losses, hits = decoder_losses(loaded, ids, rank, form, chunk)
    return losses.mean(), hits, losses.numel()


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def eval_encoder(
    dense_model: LoadedModel,
    models: dict[str, tuple[LoadedModel, ATPConfig | None]],
    texts: Sequence[str],
    max_tokens: int,
    batch: int = 32,
) -> dict[str, dict]:
    """Per setting: mean / min cosine of its embedding to the dense model's, and nearest-neighbour
    agreement (for each text, is its nearest other text the same as under the dense model).

    A text on which a setting breaks down (the linear form can send a layer's input to inf/NaN) gets a
    zero embedding: cosine 0 and no neighbour agreement, and ``n_broken`` counts such texts (the key
    is present only when some broke down).
    """

    def embed_batch(loaded, config, part):
        try:
            return _encoder_embeddings(loaded, part, config, max_tokens)
        except atp.NonFiniteError:
            if len(part) > 1:  # find which texts break down
                return torch.cat([embed_batch(loaded, config, [t]) for t in part])
            return torch.zeros(1, loaded.info.d_model, device=loaded.device)

    def embed(loaded, config):
        parts = [embed_batch(loaded, config, texts[i : i + batch]) for i in range(0, len(texts), batch)]
        e = torch.cat(parts).double().cpu()
        return torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0)

    ref = embed(dense_model, None)
    ref_nn = _nearest(ref)
    out = {}
    for name, (loaded, config) in models.items():
        e = ref if (loaded is dense_model and config is None) else embed(loaded, config)
        cos = (e * ref).sum(-1)  # both normalised (or zero where the setting broke down)
        row = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "nn_agreement": float((_nearest(e) == ref_nn).double().mean()),
            "n_texts": len(texts),
        }
        broken = int((e.abs().sum(-1) == 0).sum())
        if broken:
            row["n_broken"] = broken
        out[name] = row
    return out


def _nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


@torch.inference_mode()
def eval_decoder(
    models: dict[str, tuple[LoadedModel, float | None, str]],
    windows: Sequence[torch.Tensor],
    chunk: int,
) -> dict[str, dict]:
    """Per setting (model, rank or None for dense, form): next-token top-1 accuracy and perplexity
    over the windows' predictions from positions >= chunk, strictly causal.

    A window on which a setting breaks down (inf/NaN in a layer's input, possible with the linear
    form) is left out of that setting's figures and counted in ``n_broken`` (present only then).
    """
    out = {}
    for name, (loaded, rank, form) in models.items():
        nll_sum, hits, n, broken = 0.0, 0, 0, 0
        for w in windows:
            try:
                nll, h, c = _decoder_nll(loaded, w.to(loaded.device), rank, form, chunk)
            except atp.NonFiniteError:
                broken += 1
                continue
            nll_sum += float(nll) * c
            hits += h
            n += c
        row = {
            "top1": hits / n if n else float("nan"),
            "perplexity": math.exp(nll_sum / n) if n else float("nan"),
            "n_tokens": n,
        }
        if broken:
            row["n_broken"] = broken
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def default_out_dir(cfg: TuneConfig) -> Path:
    """``<cache>/tuned/<model>-r<rank>-<form>-<time>``: one folder per run, never reused (the app
    caches a loaded run by its folder, so a folder must not change under it)."""
    name = Path(cfg.model).name if "/" in cfg.model else cfg.model
    return cache_dir() / "tuned" / f"{name}-r{cfg.rank:g}-{cfg.form}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    then says so); held-out evaluation always uses :data:`HELDOUT_MODULES`. ``stop()`` returning
    True cancels: nothing is saved, :class:`Cancelled` is raised.
    """
    import warnings

    from peft import LoraConfig, get_peft_model

    # peft calls a transformers property that warns about its own rename on every wrap; not ours to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    if (out / SETTINGS_FILE).exists():
        raise ValueError(f"{out} already holds a fine-tuning run; choose another output folder.")
    say = progress or (lambda f, m: None)
    rng = random.Random(cfg.seed)
    say(0.0, f"Loading {cfg.model}...")
    loaded = load_model(cfg.model)
    is_dec = loaded.info.is_decoder
    atp_cfg = ATPConfig(rank=cfg.rank, form=cfg.form)

    say(0.02, "Preparing the training texts (standard-library docstrings, by module)...")
    if is_dec:
        train_data = (
            token_windows(TRAIN_MODULES, loaded.tokenizer, cfg.seq_len)
            if texts is None
            else _windows_of("\n\n".join(texts), loaded.tokenizer, cfg.seq_len)
        )
        if not train_data:
            raise ValueError(f"The training text gives no window of {cfg.seq_len} tokens; lower seq_len.")
    else:
        train_data = (
            encoder_texts(TRAIN_MODULES, loaded.tokenizer, max_tokens=cfg.max_tokens)
            if texts is None
            else list(texts)
        )
        if not train_data:
            raise ValueError("No training texts.")

    if not _heldout(loaded, cfg):
        raise ValueError("The held-out split gives nothing to evaluate with these settings; lower seq_len.")
    targets = _lora_targets(loaded.model)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=_target_regex(loaded.model, targets),
        bias="none",
    )
    # A private RNG stream for the adapters' initialisation: the app runs this in a thread next to
    # other sessions, whose random bases must not depend on when a run starts.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(loaded.model, lcfg)
    peft_model.eval()  # no dropout: the objective is deterministic given the batch
    tuned = LoadedModel(model=peft_model, tokenizer=loaded.tokenizer, info=loaded.info)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / max(cfg.steps, 1))
    )  # 10-step warm-up, then linear decay to 10%

    result = TuneResult(config=cfg, out_dir=out)
    t0 = time.perf_counter()
    order: list[int] = []
    for step in range(cfg.steps):
        if stop is not None and stop():
            result.cancelled = True
            raise Cancelled(f"Cancelled after {step} of {cfg.steps} steps; nothing was saved.")
        try:
            if is_dec:
                if not order:
                    order = rng.sample(range(len(train_data)), len(train_data))
                ids = train_data[order.pop()].to(tuned.device)
                loss, _, _ = _decoder_nll(tuned, ids, cfg.rank, cfg.form, cfg.chunk)
            else:
                batch = rng.sample(train_data, min(cfg.batch, len(train_data)))
                with torch.no_grad(), peft_model.disable_adapter():
                    target = _encoder_embeddings(tuned, batch, None, cfg.max_tokens)
                emb = _encoder_embeddings(tuned, batch, atp_cfg, cfg.max_tokens)
                loss = (1 - (emb * target).sum(-1)).mean()
        except atp.NonFiniteError:
            # The linear form's denominator crossed zero somewhere in the batch: a later layer got
            # inf/NaN. Counted and reported (the run's JSON and the page show skipped steps).
            loss = torch.tensor(float("nan"))
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            result.skipped += 1
            logger.warning("step %d: loss is %s; step skipped", step, float(loss))
            result.losses.append(float("nan"))
            if on_step:
                on_step(step, float("nan"))
            continue
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(norm):
            # An overflowing gradient would make clip_grad_norm_ scale every gradient by 1/inf = 0: the
            # step would silently change nothing. Count it as skipped instead (the linear form's
            # denominators near zero do this to SmolLM2).
            result.skipped += 1
            logger.warning("step %d: gradient norm is %s; step skipped", step, float(norm))
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
            sched.step()  # the schedule counts updates made
        value = float(loss.detach())
        result.losses.append(value)
        if on_step:
            on_step(step, value)
        say(0.05 + 0.75 * (step + 1) / max(cfg.steps, 1), f"step {step + 1} of {cfg.steps}: loss {value:.4f}")
    result.train_seconds = time.perf_counter() - t0

    say(0.8, f"Saving adapters to {out}...")
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    # peft also writes a model-card template ("More Information Needed" throughout); atp_tuning.json
    # is this run's real description, so the template is not kept.
    (out / "README.md").unlink(missing_ok=True)
    split = {
        "source": f"Python {platform.python_version()} standard-library docstrings, split by module",
        "train_modules": list(TRAIN_MODULES) if texts is None else "custom texts given to train()",
        "heldout_modules": list(HELDOUT_MODULES),
        "n_train_items": len(train_data),
        "train_items": "windows of seq_len tokens" if is_dec else "texts of at most max_tokens tokens",
    }
    meta = {
        "base_model": cfg.model,
        "settings": asdict(cfg),
        "split": split,
        "lora_targets": targets,
        "losses": result.losses,
        "skipped_steps": result.skipped,
        "train_seconds": result.train_seconds,
        "torch": torch.__version__,
    }
    _write_json(out / SETTINGS_FILE, meta)

    # Metrics on the model reloaded from disk, so loading the folder again reproduces them.
    say(0.82, "Evaluating dense, untuned ATP and tuned ATP on the held-out modules...")
    t1 = time.perf_counter()
    del peft_model, tuned, opt, sched, params, loaded  # free the trained copy before loading two more
    gc.collect()
    reference = load_model(cfg.model)
    reloaded = load_tuned(out)
    result.metrics = evaluate(reference, reloaded, cfg)
    result.eval_seconds = time.perf_counter() - t1
    meta["metrics"] = result.metrics
    meta["eval_seconds"] = result.eval_seconds
    _write_json(out / SETTINGS_FILE, meta)
    say(1.0, "Done.")
    return result


def evaluate(reference: LoadedModel, tuned: LoadedModel, cfg: TuneConfig) -> dict:
    """Held-out metrics: dense (original), dense with the tuned weights, untuned ATP, tuned ATP."""
    atp_cfg = ATPConfig(rank=cfg.rank, form=cfg.form)
    data = _heldout(reference, cfg)
    if reference.info.is_decoder:
        windows = data
        rows = eval_decoder(
            {
                "dense": (reference, None, "exact"),
                "dense_tuned_weights": (tuned, None, "exact"),
                "atp_untuned": (reference, cfg.rank, cfg.form),
                "atp_tuned": (tuned, cfg.rank, cfg.form),
            },
            windows,
            cfg.chunk,
        )
        note = f"next-token prediction at positions >= {cfg.chunk} of {len(windows)} windows of {cfg.seq_len}"
    else:
        texts = data
        rows = eval_encoder(
            reference,
            {
                "dense": (reference, None),
                "dense_tuned_weights": (tuned, None),
                "atp_untuned": (reference, atp_cfg),
                "atp_tuned": (tuned, atp_cfg),
            },
            texts,
            cfg.max_tokens,
        )
        note = f"sentence embeddings of {len(texts)} held-out texts, compared with the original dense model"
    return {"rank": cfg.rank, "form": cfg.form, "what": note, "rows": rows}


def _heldout(loaded: LoadedModel, cfg: TuneConfig) -> list:
    """The held-out evaluation data: windows (decoders) or texts (encoders), first ones in order."""
    if loaded.info.is_decoder:
        return token_windows(HELDOUT_MODULES, loaded.tokenizer, cfg.seq_len)[: cfg.eval_windows]
    return encoder_texts(HELDOUT_MODULES, loaded.tokenizer, max_tokens=cfg.max_tokens)[: cfg.eval_texts]


def _write_json(path: Path, obj: dict) -> None:
    # Plain floats, ints and strings only; a skipped step's loss is NaN, which Python's json reads back.
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Loading tuned runs
# ------------------------------------------------------------------------------------------------


def read_settings(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / SETTINGS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not an ATP fine-tuning run (no {SETTINGS_FILE}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


def tuned_label(meta: dict) -> str:
    s = meta["settings"]
    return f"{s['model'].upper()} + ATP-tuned r={s['rank']:g} ({s['form']})"


def load_tuned(folder: str | Path) -> LoadedModel:
    """The base model with the run's adapters merged in (a plain transformers model again, so every
    page and the ATP backend work on it unchanged)."""
    from peft import PeftModel

    folder = Path(folder).expanduser()
    meta = read_settings(folder)
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{folder} has no adapter_config.json (an unfinished or cancelled run?).")
    loaded = load_model(meta["base_model"])
    model = PeftModel.from_pretrained(loaded.model, folder).merge_and_unload()
    model.eval()
    info = loaded.info.__class__(
        **{
            **asdict(loaded.info),
            "key": f"{TUNED_PREFIX}{folder}",
            "label": tuned_label(meta),
            "source": f"{loaded.info.source} + LoRA adapters from {folder}",
        }
    )
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, info=info)


def find_runs(roots: Sequence[Path] | None = None) -> list[tuple[Path, dict]]:
    """Finished runs (with metrics) under the default places: ``<cache>/tuned`` and ``data/tuned``."""
    if roots is None:
        roots = [cache_dir() / "tuned", Path(__file__).resolve().parent.parent / "data" / "tuned"]
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


def metrics_table(meta: dict) -> list[dict]:
    """The run's metrics as rows (one per setting) for display and export."""
    m = meta["metrics"]
    rows = []
    for name, vals in m["rows"].items():
        rows.append({"setting": name, "rank": m["rank"], "form": m["form"], **vals})
    return rows


# ------------------------------------------------------------------------------------------------
# Command line: python -m atp_viz finetune
# ------------------------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be a share of L such as 0.5, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"rank must lie in (0, 1] (a share of L), got {value}")
    return value


def register(subparsers):
    """Add the ``finetune`` subcommand to an argparse subparsers object."""
    d = TuneConfig()
    f = subparsers.add_parser(
        "finetune",
        help="low-rank-aware fine-tuning (LoRA with ATP in place) and held-out evaluation",
        description=(
            "Train LoRA adapters on the attention and MLP projections while ATP runs at the given rank and "
            "form, on Python standard-library docstrings (split by module into train / held-out), then "
            "evaluate dense, untuned ATP and tuned ATP on the held-out modules."
        ),
    )
    f.add_argument("--model", default=d.model, help="minilm | smollm2 | tiny-* | folder | hub id")
    f.add_argument("--rank", type=_fraction, default=d.rank, help="ATP rank as a share of L (0.5, 0.25)")
    f.add_argument("--form", choices=["exact", "linear"], default=d.form)
    f.add_argument("--steps", type=int, default=d.steps)
    f.add_argument("--lr", type=float, default=d.lr)
    f.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank")
    f.add_argument("--batch", type=int, default=d.batch, help="encoder texts per step")
    f.add_argument("--max-tokens", type=int, default=d.max_tokens, help="encoder: longest text")
    f.add_argument("--seq-len", type=int, default=d.seq_len, help="decoder: window length")
    f.add_argument("--chunk", type=int, default=d.chunk, help="decoder: chunk of the strictly causal mode")
    f.add_argument("--eval-texts", type=int, default=d.eval_texts)
    f.add_argument("--eval-windows", type=int, default=d.eval_windows)
    f.add_argument("--seed", type=int, default=d.seed)
    f.add_argument("--out", help="output folder (default: <cache>/tuned/<model>-r<rank>-<form>)")
    f.set_defaults(func=_cmd_finetune)
    return f


def _cmd_finetune(args) -> int:
    import sys

    cfg = TuneConfig(
        model=args.model, rank=args.rank, form=args.form, steps=args.steps, lr=args.lr, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, batch=args.batch, max_tokens=args.max_tokens, seq_len=args.seq_len,
        chunk=args.chunk, eval_texts=args.eval_texts, eval_windows=args.eval_windows, seed=args.seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    last = [-1.0]

    def progress(frac: float, msg: str) -> None:
        now = time.perf_counter() - t0
        if "step" not in msg or now - last[0] >= 10 or frac >= 0.8:  # a line every 10 s while training
            last[0] = now
            print(f"[{now:6.0f} s] {frac:4.0%} {msg}", file=sys.stderr)

    res = train(cfg, args.out, progress=progress)
    rows = res.metrics["rows"]
    print(f"\n{res.metrics['what']}; rank {cfg.rank:g} L, {cfg.form} form", file=sys.stderr)
    keys = list(next(iter(rows.values())).keys())
    print("setting               " + "  ".join(f"{k:>12}" for k in keys), file=sys.stderr)
    for name, vals in rows.items():
        cells = [f"{v:12.4f}" if isinstance(v, float) else f"{v:>12}" for v in vals.values()]
        print(f"{name:22}" + "  ".join(cells), file=sys.stderr)
    print(
        f"train {res.train_seconds:.0f} s, evaluation {res.eval_seconds:.0f} s; wrote {res.out_dir}",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------------------------
# A run in a background thread (the app's Fine-tuning page polls it)
# ------------------------------------------------------------------------------------------------


class TuneJob:
    """:func:`train` in a daemon thread, with its progress, loss curve, result or error readable at any
    time and a :meth:`cancel` that stops it at the next step (nothing is saved then).

    Plain threading, no Streamlit: a page keeps the job in its session state and redraws from
    :meth:`snapshot` every second, so the page stays responsive while the run goes on.
    ``guard`` (optional): a context manager factory held for the whole run, e.g. the app's cap on
    concurrent heavy jobs; if entering it raises, the job ends at once with that error.
    """

    def __init__(self, cfg: TuneConfig, out_dir: str | Path | None = None, *, guard=None) -> None:
        import threading

        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else default_out_dir(cfg)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fraction, self.message = 0.0, "Starting..."
        self.losses: list[float] = []
        self.result: TuneResult | None = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._guard = guard
        self._thread = threading.Thread(target=self._run, name=f"finetune-{cfg.model}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from contextlib import nullcontext

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
        except Cancelled as err:
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

    def _step(self, step: int, loss: float) -> None:
        with self._lock:
            self.losses.append(loss)

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
                "result": self.result,
                "error": self.error,
                "elapsed": (self.finished or time.time()) - self.started,
                "running": self._thread.is_alive(),
                "cancelling": self._stop.is_set(),
            }


def summary_rows(runs: Sequence[tuple[Path, dict]]) -> list[dict]:
    """One row per finished run: its setting and the held-out headline metric before and after tuning
    (encoders: mean cosine to dense; decoders: next-token top-1, with dense's for reference)."""
    rows = []
    for path, meta in runs:
        s, m = meta["settings"], meta["metrics"]["rows"]
        key = "cosine_mean" if "cosine_mean" in m["dense"] else "top1"
        rows.append(
            {
                "run": tuned_label(meta),
                "steps": s["steps"],
                "skipped steps": meta.get("skipped_steps", 0),
                "metric": "cosine to dense" if key == "cosine_mean" else "next-token top-1",
                "dense": m["dense"][key],
                "untuned ATP": m["atp_untuned"][key],
                "tuned ATP": m["atp_tuned"][key],
                "tuned weights, dense attention": m["dense_tuned_weights"][key],
                "training minutes": meta["train_seconds"] / 60,
                "folder": str(path),
            }
        )
    return rows
