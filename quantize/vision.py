"""The full-precision vision tower and projector, for the image features that image calibration rows carry.

The vision tower and projector are never quantized: they are copied untouched, and here they run as transformers'
own modules built from the model's config and loaded from its shards (only these tensors, never the language
model). Their output replaces the embeddings at the image-token positions of a row, which is what the language
model really sees for an image prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers

from quantize.adapters import ModelAdapter, Role
from quantize.errors import ModelFormatError


def image_token_id(config: dict[str, Any]) -> int:
    """The `[IMG]` placeholder id of a VLM config (`image_token_index` in older files, `image_token_id` in newer)."""
    for key in ("image_token_id", "image_token_index"):
        if config.get(key) is not None:
            return int(config[key])
    raise ModelFormatError("config.json: a vision model needs image_token_index or image_token_id")


@dataclass
class _Projector:
    """Which transformers projector class an architecture uses, and whether it merges patches."""

    module: str
    cls: str
    takes_sizes: bool


PROJECTORS = {
    "LlavaForConditionalGeneration": _Projector(
        "transformers.models.llava.modeling_llava", "LlavaMultiModalProjector", False
    ),
    "Mistral3ForConditionalGeneration": _Projector(
        "transformers.models.mistral3.modeling_mistral3", "Mistral3MultiModalProjector", True
    ),
}


class VisionEncoder:
    """Vision tower + projector of one model, in full precision, turning processed images into LM embeddings."""

    def __init__(
        self, adapter: ModelAdapter, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        if not adapter.spec.multimodal:
            raise ModelFormatError(f"{adapter.model_dir}: {adapter.architecture} has no vision tower")
        self.adapter, self.device, self.dtype = adapter, torch.device(device), dtype
        self.config = transformers.AutoConfig.from_pretrained(adapter.model_dir)
        self.image_token_id = image_token_id(adapter.config)
        self.tower = transformers.AutoModel.from_config(self.config.vision_config)
        spec = PROJECTORS[adapter.architecture]
        module = __import__(spec.module, fromlist=[spec.cls])
        self.projector = getattr(module, spec.cls)(self.config)
        self.projector_takes_sizes = spec.takes_sizes
        self._load(self.tower, adapter.layout.vision_prefix or "", Role.VISION)
        self._load(self.projector, adapter.layout.projector_prefix or "", Role.PROJECTOR)

    def _load(self, module: torch.nn.Module, prefix: str, role: Role) -> None:
        keys = self.adapter.keys_with_role(role)
        state = {k[len(prefix) :]: self.adapter.files.get(k) for k in keys}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise ModelFormatError(f"{self.adapter.model_dir}: {role.value} tensors do not fit the config ({what})")
        module.to(device=self.device, dtype=self.dtype).eval()

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | list) -> list[torch.Tensor]:
        """Projected features per image, each [tokens, text hidden size], for `[IMG]` positions in reading order."""
        sizes = torch.as_tensor(image_sizes, dtype=torch.long)
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        out = self.tower(pixels, image_sizes=sizes, output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        if isinstance(layer, int):
            selected = out.hidden_states[layer]
        else:
            selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if getattr(self.config, "vision_feature_select_strategy", "full") == "default":
            selected = selected[:, 1:]
        if self.projector_takes_sizes:
            features = self.projector(selected.squeeze(0), sizes)
            ratio = self.patch_size * int(self.config.spatial_merge_size)
        else:
            features = self.projector(selected).squeeze(0)
            ratio = self.patch_size
        splits = (sizes // ratio).prod(dim=-1).tolist()
        return list(torch.split(features, splits))


def merge_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token: int, features: list[torch.Tensor]
) -> torch.Tensor:
    """Put image features, in order, at the `[IMG]` positions of a row's embeddings (a new tensor)."""
    mask = input_ids == image_token
    flat = (
        torch.cat(features).to(inputs_embeds.dtype) if features else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    )
    if int(mask.sum()) != flat.shape[0]:
        raise ModelFormatError(f"row has {int(mask.sum())} image tokens but the images give {flat.shape[0]} features")
    merged = inputs_embeds.clone()
    merged[mask] = flat.to(merged.device)
    return merged
