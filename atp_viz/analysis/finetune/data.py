"""Training and held-out data for fine-tuning, from the docstring corpus (:mod:`atp_viz.text.corpus`):
encoder texts of whole paragraphs, decoder windows of a fixed number of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atp_viz.text.corpus import docstrings


def paragraph_texts(docs: Sequence[str], tokenizer, min_tokens: int = 24, max_tokens: int = 128) -> list[str]:
    """Docstrings with at least ``min_tokens`` tokens, each cut at a paragraph boundary to at most
    ``max_tokens`` tokens (so every text is whole paragraphs, not a cut mid-sentence)."""
    out = []
    for doc in docs:
        text = ""
        for para in doc.split("\n\n"):
            cand = f"{text}\n\n{para}" if text else para
            if len(tokenizer(cand, add_special_tokens=True, verbose=False)["input_ids"]) > max_tokens:
                break
            text = cand
        if text and len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]) >= min_tokens:
            out.append(text)
    return out


def encoder_texts(
    modules: Sequence[str], tokenizer, *, min_tokens: int = 24, max_tokens: int = 128
) -> list[str]:
    """Training texts: the modules' docstrings (near-duplicates of held-out ones left out) as
    :func:`paragraph_texts`."""
    return paragraph_texts(docstrings(modules), tokenizer, min_tokens, max_tokens)


def token_windows(modules: Sequence[str], tokenizer, seq_len: int) -> list[torch.Tensor]:
    """The modules' docstrings joined into one stream, cut into windows of ``seq_len`` tokens
    (the last partial window is dropped)."""
    return windows_of("\n\n".join(docstrings(modules)), tokenizer, seq_len)


def windows_of(text: str, tokenizer, seq_len: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    n = ids.shape[0] // seq_len
    return [ids[i * seq_len : (i + 1) * seq_len][None] for i in range(n)]
