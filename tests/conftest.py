"""Shared fixtures: models are loaded once per test session (the bundled ones take seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ("tiny-bert", "tiny-llama", "tiny-qwen2", "tiny-gpt2")
BUNDLED = ("minilm", "smollm2")


@pytest.fixture(scope="session")
def load():
    """``load(key)`` -> LoadedModel, cached for the session."""
    from atp_viz.hf.models import load_model

    cache = {}

    def _load(key: str):
        if key not in cache:
            cache[key] = load_model(key, device="cpu")
        return cache[key]

    return _load


SENTENCE = "Attention on top principal keys keeps the few directions that carry most of the energy."


@pytest.fixture(scope="module")
def browser():
    """One headless Debian Chromium per browser-test module (Playwright's own download does not work
    offline)."""
    from browser_kit import CHROMIUM, FLAGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()
