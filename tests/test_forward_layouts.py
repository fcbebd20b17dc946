"""The layer-by-layer forward, fed from an adapter's streamed shards, equals transformers on every layout."""

from __future__ import annotations

import pytest
import torch

import tiny_models
from quantize.adapters import load_adapter
from quantize.modeling import LayerwiseLM
from quantize.vision import VisionEncoder, merge_image_features

LAYOUTS = [
    ("llava", "saved", False, 1),
    ("llava", "transformers", False, 3),
    ("llava", "transformers", True, 2),
    ("mistral3", "saved", False, 2),
    ("mistral3", "transformers", True, 1),
    ("llama", "saved", True, 3),
    ("llama", "saved", False, 1),
    ("mistral", "saved", False, 2),
]


def _ids(seed=0, rows=2, length=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tiny_models.TEXT["vocab_size"] - 1, (rows, length), generator=g)


@pytest.mark.parametrize(("kind", "layout", "tied", "shards"), LAYOUTS)
def test_text_logits_equal_transformers(tiny_dir, kind, layout, tied, shards):
    folder, model = tiny_dir(kind, layout=layout, tied=tied, shards=shards)
    adapter = load_adapter(folder)
    ids = _ids()
    ours = LayerwiseLM(adapter.text, adapter)(ids)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_sliding_window_matches_mistral(tiny_dir):
    folder, model = tiny_dir("mistral", sliding_window=8)
    adapter = load_adapter(folder)
    assert adapter.text.sliding_window == 8
    ids = _ids(length=20)
    ours = LayerwiseLM(adapter.text, adapter)(ids)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize(("kind", "layout"), [("llava", "saved"), ("llava", "transformers"), ("mistral3", "saved")])
def test_image_prompt_logits_equal_transformers(tiny_dir, kind, layout):
    folder, model = tiny_dir(kind, layout=layout)
    adapter = load_adapter(folder)
    encoder = VisionEncoder(adapter)
    # One 32x48 image: 4x6 patches of 8 pixels (Mistral3 merges 2x2 patches: 2x3 tokens).
    merge = 2 if kind == "mistral3" else 1
    tokens = (32 // 8 // merge) * (48 // 8 // merge)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 32, 48, generator=g)
    sizes = torch.tensor([[32, 48]])
    image = encoder.image_token_id
    ids = torch.cat([_ids(rows=1, length=5), torch.full((1, tokens), image), _ids(seed=2, rows=1, length=7)], dim=1)
    lm = LayerwiseLM(adapter.text, adapter)
    embeds = merge_image_features(lm.embed(ids), ids, image, encoder.image_features(pixels, sizes))
    ours = lm(inputs_embeds=embeds)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    assert (ours - ref).abs().max().item() < 1e-4
    # The image really changed the logits after it (the test would not pass with the features ignored).
    text_only = lm(ids)
    assert (text_only[0, -1] - ref[0, -1]).abs().max().item() > 1e-3
