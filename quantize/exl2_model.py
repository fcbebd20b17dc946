"""Reading an EXL2 quant folder back: the dequantized language model as a weights provider for the torch forward.

This is how quants are evaluated without CUDA: every quantized linear is unpacked and dequantized bit for bit as
exllamav2's `reconstruct` would (`quantize.format`), one layer at a time, and the layer-by-layer forward of
`quantize.modeling` runs on it. Keys are exllamav2's legacy names, which is what `quantize.compile` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantize.adapters import arch_spec
from quantize.errors import ModelFormatError
from quantize.format import dequantize_tensors
from quantize.safetensors_io import SafetensorsIndex
from quantize.textconfig import TextConfig

_Q_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


class Exl2Weights:
    """An EXL2 folder's language model, dequantized on demand; implements `quantize.modeling.TextWeights`."""

    def __init__(self, quant_dir: Path | str):
        self.quant_dir = Path(quant_dir)
        path = self.quant_dir / "config.json"
        try:
            self.config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{path}: unreadable ({exc})") from exc
        self.spec = arch_spec(self.config, path)
        text = self.config.get("text_config", {}) if self.spec.multimodal else self.config
        tie = bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        self.text = TextConfig.from_dict(text, tie_word_embeddings=tie)
        self.files = SafetensorsIndex(self.quant_dir)
        self.prefix = "language_model.model." if self.spec.multimodal else "model."
        self.head = "language_model.lm_head" if self.spec.multimodal else "lm_head"
        if f"{self.head}.q_weight" not in self.files:
            raise ModelFormatError(f"{self.quant_dir}: no '{self.head}.q_weight': not an EXL2 quant folder")

    def _plain(self, key: str) -> torch.Tensor:
        return self.files.get(key)

    def linear(self, module: str, out_features: int) -> torch.Tensor:
        """The dequantized fp16 weight [out, in] of one quantized linear."""
        tensors = {s: self.files.get(f"{module}.{s}") for s in _Q_SUFFIXES}
        return dequantize_tensors(tensors, out_features, key=module)

    def embed_tokens(self) -> torch.Tensor:
        return self._plain(f"{self.prefix}embed_tokens.weight")

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        base = f"{self.prefix}layers.{index}."
        weights = {
            "input_layernorm.weight": self._plain(f"{base}input_layernorm.weight"),
            "post_attention_layernorm.weight": self._plain(f"{base}post_attention_layernorm.weight"),
        }
        for linear, (n_out, _) in self.text.linear_shapes().items():
            weights[f"{linear}.weight"] = self.linear(base + linear, n_out)
            if f"{base}{linear}.bias" in self.files:
                weights[f"{linear}.bias"] = self._plain(f"{base}{linear}.bias")[:n_out]
        return weights

    def final_norm(self) -> torch.Tensor:
        return self._plain(f"{self.prefix}norm.weight")

    def lm_head(self) -> torch.Tensor:
        return self.linear(self.head, self.text.vocab_size)
