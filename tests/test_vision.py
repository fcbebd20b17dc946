"""The full-precision vision path: our streamed vision tower + projector equal transformers' own features."""

from __future__ import annotations

import pytest
import torch

from quantize.adapters import load_adapter
from quantize.errors import ModelFormatError
from quantize.vision import VisionEncoder, merge_image_features


def _pixels(seed=0, sizes=((32, 48), (24, 16))):
    g = torch.Generator().manual_seed(seed)
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    return torch.randn(len(sizes), 3, h, w, generator=g), torch.tensor(sizes)


@pytest.mark.parametrize(("kind", "layout"), [("llava", "saved"), ("llava", "transformers"), ("mistral3", "saved")])
def test_features_equal_transformers(tiny_dir, kind, layout):
    folder, model = tiny_dir(kind, layout=layout)
    encoder = VisionEncoder(load_adapter(folder))
    sizes = ((32, 48), (32, 16)) if kind == "mistral3" else ((32, 48), (24, 16))
    pixels, image_sizes = _pixels(sizes=sizes)
    ours = encoder.image_features(pixels, image_sizes)
    with torch.no_grad():
        kwargs = {"vision_feature_layer": -1}
        if kind == "llava":
            kwargs["vision_feature_select_strategy"] = "full"
        ref = model.get_image_features(pixel_values=pixels, image_sizes=image_sizes, **kwargs).pooler_output
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-5


def test_merge_places_features_in_order():
    embeds = torch.zeros(1, 6, 2)
    ids = torch.tensor([[5, 9, 9, 5, 9, 5]])
    merged = merge_image_features(embeds, ids, 9, [torch.tensor([[1.0, 1], [2, 2]]), torch.tensor([[3.0, 3]])])
    assert merged[0, :, 0].tolist() == [0, 1, 2, 0, 3, 0]
    with pytest.raises(ModelFormatError, match=r"row has 3 image tokens but the images give 2 features"):
        merge_image_features(embeds, ids, 9, [torch.ones(2, 2)])


def test_text_model_has_no_vision(tiny_dir):
    folder, _ = tiny_dir("llama")
    with pytest.raises(ModelFormatError, match=r"LlamaForCausalLM has no vision tower"):
        VisionEncoder(load_adapter(folder))
