"""Input text: the bundled samples in ``data/``, uploads, validation and tokenisation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from atp_viz.core.units import format_bytes

MAX_UPLOAD_BYTES = 1_000_000
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class TextError(ValueError):
    """The text cannot be used; the message is meant for the user, as is."""


@dataclass(frozen=True)
class Sample:
    name: str  # file stem, e.g. "03_attention_explainer"
    title: str  # human-readable
    path: Path

    def read(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Tokenized:
    """One tokenised text. ``truncated`` says whether tokens past the model's limit were cut."""

    input_ids: torch.Tensor  # [1, L]
    attention_mask: torch.Tensor  # [1, L]
    tokens: tuple[str, ...]
    n_original: int  # tokens before truncation
    max_tokens: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def truncated(self) -> bool:
        return self.n_original > self.n_tokens

    @property
    def notice(self) -> str | None:
        if not self.truncated:
            return None
        return (
            f"The text has {self.n_original:,} tokens; the limit for this model here is {self.max_tokens:,} "
            f"(its context, or this server's token limit), so only the first {self.n_tokens:,} are used."
        )


def samples(data_dir: Path = DATA_DIR) -> list[Sample]:
    """The bundled sample texts, shortest first (files are numbered by length)."""
    out = []
    for p in sorted(data_dir.glob("*.txt")):
        stem = p.stem
        title = stem.split("_", 1)[1] if "_" in stem and stem.split("_", 1)[0].isdigit() else stem
        out.append(Sample(name=stem, title=title.replace("_", " "), path=p))
    return out


def decode_upload(data: bytes, name: str = "upload", *, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """Validate an uploaded file: at most ``max_bytes`` (1 MB unless a deployment sets another limit,
    see :class:`atp_viz.settings.Settings`), UTF-8 text, not binary."""
    if len(data) > max_bytes:
        raise TextError(
            f"{name} is {format_bytes(len(data))}; uploads are limited to {format_bytes(max_bytes)} here. "
            "Upload a shorter excerpt."
        )
    if b"\x00" in data[:8192]:
        raise TextError(f"{name} looks like a binary file (it contains NUL bytes). Upload a UTF-8 .txt file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TextError(
            f"{name} is not valid UTF-8 (byte {err.start}: {data[err.start : err.start + 1]!r}). "
            "Save it as UTF-8 text and upload again."
        ) from None
    return validate_text(text)


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file given on the command line, checked like an upload."""
    p = Path(path)
    if p.is_dir():
        raise TextError(f"{path} is a folder: give a text file.")
    if not p.is_file():
        raise TextError(f"No such text file: {path}" if not p.exists() else f"{path} is not a regular file.")
    return decode_upload(p.read_bytes(), p.name)


def validate_text(text: str | None) -> str:
    if text is None or not text.strip():
        raise TextError("The text is empty. Type or upload some text, or pick a sample.")
    return text


def tokenize(tokenizer, text: str, max_tokens: int, *, min_tokens: int = 2) -> Tokenized:
    """Tokenise one text, truncating to ``max_tokens`` (and saying so through ``Tokenized.notice``).

    A spectrum needs at least ``min_tokens`` tokens; one token gives a clear error instead.
    """
    text = validate_text(text)
    enc = tokenizer(text, return_tensors="pt", truncation=False, verbose=False)
    ids = enc["input_ids"]
    n_original = ids.shape[1]
    if n_original > max_tokens:
        ids = ids[:, :max_tokens]
        # Keep the closing special token of encoders ([SEP]) so truncated input looks like the model's input.
        sep = getattr(tokenizer, "sep_token_id", None)
        if sep is not None and enc["input_ids"][0, -1].item() == sep:
            ids[0, -1] = sep
    if ids.shape[1] < min_tokens:
        raise TextError(
            f"The text has {ids.shape[1]} token{'' if ids.shape[1] == 1 else 's'}; at least {min_tokens} are "
            "needed for a spectrum "
            "(a single token is a rank-1 matrix by definition). Type a longer text."
        )
    tokens = token_texts(tokenizer, ids[0].tolist())
    return Tokenized(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        tokens=tokens,
        n_original=n_original,
        max_tokens=max_tokens,
    )


def token_texts(tokenizer, ids: list[int]) -> tuple[str, ...]:
    """Each token's own text. A byte-level BPE vocabulary (GPT-2, SmolLM2: "Ġ" for a space, "Ã©" for é)
    writes every byte as a printable stand-in; its tokens are turned back into their bytes and read as
    UTF-8, so "Ã©" shows as é. A character whose bytes are split over two tokens (ü as "Ã" + "¼") cannot be
    shown by either alone: those bytes show as escapes (\\xc3, \\xbc), never as other letters. Other
    vocabularies (WordPiece, SentencePiece) are their tokens as they are."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None or "ByteLevel" not in repr(decoder):
        return tuple(tokens)
    to_byte = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    return tuple(
        t if t in special or any(ch not in to_byte for ch in t)
        else bytes(to_byte[ch] for ch in t).decode("utf-8", errors="backslashreplace")
        for t in tokens
    )  # fmt: skip


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet, stand-in character -> byte (transformers' own table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def readable_tokens(tokens: tuple[str, ...] | list[str]) -> list[str]:
    """Tokens as a person reads them: SentencePiece's space marker as a space, a newline, tab or carriage
    return as \\n, \\t, \\r (byte-level tokens are already text, :func:`token_texts`, so a real Ġ stays)."""
    out = []
    for t in tokens:
        t = t.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace("\u2581", " ")
        out.append(t)
    return out
