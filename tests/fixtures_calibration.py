"""Small offline fixtures for the calibration tests: a tiny byte-level BPE tokenizer trained on Python's own
documentation text, a tiny Llava/Pixtral model folder around it, skimage images and text files."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import numpy as np
from PIL import Image

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Renders an image content part as the literal [IMG] placeholder, like the built-in model's ChatML template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{% if p.type == 'image' %}[IMG]{% else %}{{ p.text }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SKIMAGE_NAMES = ("astronaut", "chelsea", "coffee", "camera", "coins", "rocket")


def doc_texts() -> list[str]:
    """Python's help topics: about 80 documents, 460 kB of English and code, always installed."""
    return [topics[k] for k in sorted(topics)]


def train_tokenizer(*, merges: int = 300, chat_template: str | None = CHAT_TEMPLATE, image_tokens: bool = True) -> Any:
    """A PreTrainedTokenizerFast with <s>/</s> and (optionally) the three image tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", *(IMAGE_TOKENS if image_tokens else [])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(specials) + merges,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(doc_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if image_tokens:
        fast.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def write_model_dir(
    folder: Path, tokenizer: Any, *, longest_edge: int = 128, vision: bool = True, patch: int = 16, merge: int = 0
) -> Path:
    """A Llava/Pixtral model folder without weights: config.json, preprocessor_config.json, tokenizer files.
    `merge` > 0 writes a Mistral3-style config with that `spatial_merge_size`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    config: dict[str, Any] = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {"model_type": "mistral", "hidden_size": 64, "vocab_size": len(tokenizer)},
    }
    if vision:
        config["image_token_index"] = tokenizer.convert_tokens_to_ids("[IMG]")
        config["vision_config"] = {"model_type": "pixtral", "patch_size": patch, "image_size": longest_edge}
    if merge:
        config.update(
            architectures=["Mistral3ForConditionalGeneration"], model_type="mistral3", spatial_merge_size=merge
        )
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    preprocessor = {
        "image_processor_type": "PixtralImageProcessor",
        "patch_size": {"height": patch, "width": patch},
        "size": {"longest_edge": longest_edge},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255,
        "resample": 3,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    return folder


def skimage_image(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array)


def write_image_folder(folder: Path, names: tuple[str, ...] = SKIMAGE_NAMES[:4], *, captions: bool = True) -> Path:
    """PNG files of skimage images, each with a same-stem .txt caption when `captions`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        skimage_image(name).save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.txt").write_text(f"A picture called {name}.")
    return folder


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_tiny_vlm(folder: Path, side: Path) -> Path:
    """A tiny Llava/Pixtral model in `folder` (float32 language model, bf16 vision tower, two shards) with a real
    tokenizer, image processor config and chat template (built in `side`, then copied in)."""
    import shutil

    import torch

    import tiny_models

    model = tiny_models.build("llava", seed=3)
    model.model.vision_tower.to(torch.bfloat16)
    tiny_models.save(model, folder, shards=2)
    tokenizer = train_tokenizer(merges=40)
    assert len(tokenizer) <= tiny_models.TEXT["vocab_size"]
    for path in write_model_dir(side, tokenizer, patch=8, longest_edge=32).iterdir():
        if path.name != "config.json":
            shutil.copy(path, folder / path.name)
    tiny_models.edit_config(folder, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    return folder
