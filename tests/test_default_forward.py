"""End to end on the built-in default model: streamed layer-by-layer forward and calibration image rows
give the same logits as transformers' own LlavaForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data

from calibration import CalibrationSpec, ImageContext, build_calibration, parse_source
from quantize.adapters import load_adapter
from quantize.modeling import LayerwiseLM
from quantize.vision import VisionEncoder, merge_image_features

pytestmark = pytest.mark.slow


def test_text_logits_equal_transformers(default_model_dir, default_tokenizer, default_vlm):
    adapter = load_adapter(default_model_dir)
    ids = default_tokenizer(
        ["Python lists are mutable sequences, typically used to store collections."], return_tensors="pt"
    ).input_ids
    ours = LayerwiseLM(adapter.text, adapter)(ids)
    with torch.no_grad():
        ref = default_vlm(input_ids=ids).logits
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.equal(ours[0].argmax(-1), ref[0].argmax(-1))


def test_calibration_image_row_logits_equal_transformers(default_model_dir, default_tokenizer, default_vlm, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(folder / "cat.png")
    (folder / "cat.txt").write_text("A tabby cat sits on a wooden floor, looking to the left.")
    spec = CalibrationSpec(sources=[parse_source(f"images:{folder}#max_edge=128")], rows=1, length=160, seed=0)
    context = ImageContext.from_model_dir(default_model_dir, tokenizer=default_tokenizer)
    calset = build_calibration(spec, default_tokenizer, image_context=context, cache_dir=tmp_path / "cache")
    row = calset.image_row(0)
    ids = calset.input_ids[row.row : row.row + 1]

    adapter = load_adapter(default_model_dir)
    encoder = VisionEncoder(adapter)
    lm = LayerwiseLM(adapter.text, adapter)
    features = encoder.image_features(row.pixel_values, row.image_sizes)
    assert sum(f.shape[0] for f in features) == len(row.image_token_positions)
    ours = lm(inputs_embeds=merge_image_features(lm.embed(ids), ids, encoder.image_token_id, features))
    with torch.no_grad():
        ref = default_vlm(
            input_ids=ids, pixel_values=row.pixel_values, image_sizes=torch.tensor(row.image_sizes)
        ).logits
    assert (ours - ref).abs().max().item() < 1e-4
    # The image changes what follows it: the text-only logits after the image block differ.
    after = row.span[1]
    assert (lm(ids)[0, after:] - ref[0, after:]).abs().max().item() > 1e-2
