"""Image calibration rows: the model's image processor, expanded image tokens, image folders and image datasets."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from fixtures_calibration import skimage_image, train_tokenizer, write_image_folder, write_model_dir

from calibration import (
    CalibrationSpec,
    ImageContext,
    ImageTokenIds,
    build_calibration,
    expand_image_tokens,
    parse_source,
)
from quantize.errors import CalibrationError

LENGTH = 256


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return write_model_dir(tmp_path_factory.mktemp("model"), tok)


@pytest.fixture(scope="module")
def image_ctx(model_dir, tok):
    return ImageContext.from_model_dir(model_dir, tokenizer=tok)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def _grid_counts(row: torch.Tensor, ids: ImageTokenIds) -> tuple[int, int, int]:
    values = row.tolist()
    return values.count(ids.image), values.count(ids.brk), values.count(ids.end)


def test_image_context_from_model_dir(image_ctx, tok):
    assert image_ctx.token_ids == ImageTokenIds(*tok.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]))
    assert (image_ctx.patch_size, image_ctx.merge_size) == (16, 1)
    assert type(image_ctx.image_processor).__name__ == "PixtralImageProcessorPil"


def test_expand_image_tokens():
    ids = ImageTokenIds(7, 8, 9)
    assert expand_image_tokens((32, 48), patch=16, ids=ids) == [7, 7, 7, 8, 7, 7, 7, 9]
    assert expand_image_tokens((28, 28), patch=28, ids=ids) == [7, 9]  # Mistral3: patch 14 × merge 2
    with pytest.raises(CalibrationError, match="does not tile"):
        expand_image_tokens((30, 32), patch=16, ids=ids)


def test_process_image_matches_processor_sizes(image_ctx):
    processed = image_ctx.process_image(skimage_image("chelsea"))  # 300×451 → longest edge 128
    height, width = processed.image_size
    assert processed.pixel_values.shape == (1, 3, height, width)
    assert (height, width) == (96, 128)
    assert processed.grid == (6, 8)
    assert len(processed.token_ids) == 6 * 8 + 6
    assert image_ctx.process_image(skimage_image("camera"), max_edge=64).image_size == (64, 64)  # grayscale


def test_mistral3_spatial_merge(tmp_path, tok):
    ctx = ImageContext.from_model_dir(write_model_dir(tmp_path / "m3", tok, patch=14, merge=2), tokenizer=tok)
    assert ctx.effective_patch == 28
    processed = ctx.process_image(skimage_image("coffee"))  # 400×600 → 85×128 → tiles of 28
    assert processed.image_size == (112, 140) and processed.grid == (4, 5)
    assert len(processed.token_ids) == 4 * 6


def test_image_folder_rows(image_dir, image_ctx, tok):
    spec = CalibrationSpec.from_strings([f"images:{image_dir}"], rows=3, length=LENGTH)
    calset = build_calibration(spec, tok, image_context=image_ctx)
    assert calset.input_ids.shape == (3, LENGTH)
    assert [r.row for r in calset.image_rows] == [0, 1, 2]
    ids = image_ctx.token_ids
    for image_row in calset.image_rows:
        row = calset.input_ids[image_row.row]
        height, width = image_row.image_sizes[0]
        rows, cols = height // 16, width // 16
        assert image_row.pixel_values.shape == (1, 3, height, width)
        assert _grid_counts(row, ids) == (rows * cols, rows - 1, 1)
        assert len(image_row.image_token_positions) == rows * cols
        assert bool((row[image_row.image_token_positions] == ids.image).all())
        start, end = image_row.span
        assert end - start == rows * (cols + 1) and int(row[end - 1]) == ids.end
        text = tok.decode(row[end:].tolist())
        assert text.startswith("Describe this image.") and "A picture called" in text  # prompt, then the caption


def test_captions_jsonl_and_prompt(tmp_path, image_ctx, tok):
    folder = write_image_folder(tmp_path / "pics", ("coffee", "rocket"), captions=False)
    lines = [{"file": "coffee.png", "text": "Coffee in a cup.", "question": "What drink is this?"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    spec = CalibrationSpec.from_strings([f"images:{folder}#prompt=Say what you see."], rows=2, length=LENGTH)
    calset = build_calibration(spec, tok, image_context=image_ctx)
    texts = [tok.decode(calset.input_ids[r.row, r.span[1] :].tolist()) for r in calset.image_rows]
    assert texts[0].startswith("What drink is this?") and "Coffee in a cup." in texts[0]
    assert texts[1].startswith("Say what you see.")


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (None, "the tokenizer has no chat template"),
        ("{% for m in messages %}{{ m.role }}{% endfor %}", "the chat template renders 0 [IMG] tokens for one image"),
        ("{{ raise_exception('text only') }}", "the chat template cannot render an image part"),
    ],
)
def test_chat_template_fallback_is_logged(tmp_path, image_dir, caplog, template, reason):
    tok = train_tokenizer(chat_template=template)
    ctx = ImageContext.from_model_dir(write_model_dir(tmp_path / "m", tok), tokenizer=tok)
    spec = CalibrationSpec.from_strings([f"images:{image_dir}"], rows=2, length=LENGTH)
    with caplog.at_level(logging.WARNING, logger="calibration"):
        calset = build_calibration(spec, tok, image_context=ctx)
    assert f"without the chat template: {reason}" in caplog.text
    assert caplog.text.count("without the chat template") == 1  # once per source, not per row
    row = calset.input_ids[0].tolist()
    assert row[:2] == [tok.bos_token_id, ctx.token_ids.image]


def test_hf_dataset_with_image_column(tmp_path, image_ctx, tok, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    names = ["astronaut", "coins", "chelsea"]
    ds = datasets.Dataset.from_dict(
        {"picture": [skimage_image(n) for n in names], "caption": [f"It is {n}." for n in names]}
    ).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "imgs"))
    spec = CalibrationSpec.from_strings([f"hf-images:{tmp_path / 'imgs'}#picture,text=caption"], rows=2, length=LENGTH)
    calset = build_calibration(spec, tok, image_context=image_ctx)
    assert calset.input_ids.shape == (2, LENGTH) and len(calset.image_rows) == 2
    for image_row in calset.image_rows:
        assert image_row.pixel_values.shape[:2] == (1, 3)
        assert "It is " in tok.decode(calset.input_ids[image_row.row, image_row.span[1] :].tolist())
    with pytest.raises(CalibrationError, match=r"has no image column 'image' \(columns: picture, caption\)"):
        build_calibration(
            CalibrationSpec.from_strings([f"hf-images:{tmp_path / 'imgs'}"], rows=2, length=LENGTH),
            tok,
            image_context=image_ctx,
        )


def test_images_mixed_with_text_rows(image_dir, image_ctx, tok):
    spec = CalibrationSpec.from_strings(["exl2-default#weight=3", f"images:{image_dir}"], rows=8, length=LENGTH)
    calset = build_calibration(spec, tok, image_context=image_ctx)
    assert [(s.kind, s.rows, s.image_rows) for s in calset.sources_summary] == [
        ("exl2-default", 6, 0),
        ("images", 2, 2),
    ]
    assert [r.row for r in calset.image_rows] == [6, 7]
    assert calset.image_row(6) is calset.image_rows[0] and calset.image_row(0) is None
    text_ids = set(calset.input_ids[:6].flatten().tolist())
    assert image_ctx.token_ids.image not in text_ids


def test_image_errors(tmp_path, image_dir, image_ctx, tok):
    rows_of = lambda n, length=LENGTH: CalibrationSpec.from_strings([f"images:{image_dir}"], rows=n, length=length)  # noqa: E731
    with pytest.raises(CalibrationError, match=r"has 4 images; 5 image rows need one each"):
        build_calibration(rows_of(5), tok, image_context=image_ctx)
    with pytest.raises(
        CalibrationError, match=r"image '.*' is \d+×\d+ patches = \d+ image tokens .* rows are 32 tokens"
    ):
        build_calibration(rows_of(1, 32), tok, image_context=image_ctx)
    with pytest.raises(CalibrationError, match="has image rows; build it with the model's image_context"):
        build_calibration(rows_of(1), tok)


def test_model_without_vision_or_image_tokens(tmp_path, tok):
    with pytest.raises(CalibrationError, match=r"has no vision_config in config\.json"):
        ImageContext.from_model_dir(write_model_dir(tmp_path / "text-only", tok, vision=False), tokenizer=tok)
    plain = train_tokenizer(image_tokens=False)
    folder = write_model_dir(tmp_path / "no-tokens", tok)
    with pytest.raises(CalibrationError, match=r"lacks the image tokens \[IMG\], \[IMG_BREAK\], \[IMG_END\]"):
        ImageContext.from_model_dir(folder, tokenizer=plain)


def test_sample_images_source(image_ctx, tok):
    from calibration.sample_images import SAMPLE_IMAGES

    spec = CalibrationSpec.from_strings(["sample-images#max_edge=64"], rows=3, length=LENGTH, seed=1)
    assert spec.sources[0].label == "sample-images#max_edge=64" and spec.has_images
    assert parse_source(spec.sources[0].label) == spec.sources[0]
    calset = build_calibration(spec, tok, image_context=image_ctx)
    assert len(calset.image_rows) == 3
    descriptions = {s.description for s in SAMPLE_IMAGES}
    for image_row in calset.image_rows:
        row = calset.input_ids[image_row.row]
        assert max(image_row.image_sizes[0]) <= 64
        text = tok.decode(row[image_row.span[1] :].tolist())
        # The row holds a sample's own prompt and description after its image block.
        assert any(d[:20] in text for d in descriptions), text
    with pytest.raises(CalibrationError, match=r"sample-images takes no argument"):
        parse_source("sample-images:foo")
    with pytest.raises(CalibrationError, match=r"has 16 images; 17 image rows need one each"):
        build_calibration(spec.model_copy(update={"rows": 17}), tok, image_context=image_ctx)
