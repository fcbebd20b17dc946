"""Tiny random models of every layout the adapters accept, written as real Hugging Face folders.

transformers builds and saves them (so the files are what real checkpoints look like); `write_layout` then
re-keys and re-shards them to cover the newer transformers key layout and shard sets with or without an index.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=16,
    patch_size=8,
    image_size=64,
    hidden_act="silu",
)

LEGACY_TO_TRANSFORMERS = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def build(kind: str, *, tied: bool = False, seed: int = 0, **text_overrides) -> transformers.PreTrainedModel:
    """A random model: kind is 'llava', 'mistral3', 'llama' or 'mistral'."""
    torch.manual_seed(seed)
    text = dict(TEXT, **text_overrides, tie_word_embeddings=tied)
    if kind in ("llama", "mistral"):
        cfg_cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
        model_cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.MistralForCausalLM
        return model_cls(cfg_cls(**text)).eval()
    text_cfg = transformers.MistralConfig(**text)
    vision_cfg = transformers.PixtralVisionConfig(**VISION)
    if kind == "llava":
        config = transformers.LlavaConfig(
            vision_config=vision_cfg,
            text_config=text_cfg,
            multimodal_projector_bias=False,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_token_index=TEXT["vocab_size"] - 1,
            tie_word_embeddings=tied,
        )
        return transformers.LlavaForConditionalGeneration(config).eval()
    if kind == "mistral3":
        config = transformers.Mistral3Config(
            vision_config=vision_cfg,
            text_config=text_cfg,
            image_token_index=TEXT["vocab_size"] - 1,
            tie_word_embeddings=tied,
        )
        return transformers.Mistral3ForConditionalGeneration(config).eval()
    raise ValueError(kind)


def save(
    model: transformers.PreTrainedModel, out: Path, *, layout: str = "saved", shards: int = 1, index: bool = True
) -> Path:
    """Save `model`, then rewrite its tensors in `layout` ('saved' keeps transformers' keys, 'transformers'
    renames legacy VLM keys to the newer layout) across `shards` files, with or without an index."""
    model.save_pretrained(out)
    state = {}
    for path in sorted(out.glob("*.safetensors")):
        state |= load_file(path)
        path.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if layout == "transformers":
        state = {_rename(k): v for k, v in state.items()}
    write_shards(state, out, shards=shards, index=index)
    return out


def _rename(key: str) -> str:
    for old, new in LEGACY_TO_TRANSFORMERS:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def write_shards(state: dict[str, torch.Tensor], out: Path, *, shards: int = 1, index: bool = True) -> None:
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, out / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, out / name)
        weight_map |= dict.fromkeys(part, name)
    if index:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
