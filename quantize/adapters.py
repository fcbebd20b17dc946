"""Model adapters: what each tensor of a Hugging Face model folder is, without loading the model.

An adapter reads config.json and the safetensors headers, recognises the architecture (a table, `ARCHITECTURES`)
and the key layout (a table, `LAYOUTS`: the legacy Llava/Pixtral names, the newer transformers names, and plain
causal LMs), checks every tensor's shape against the config, and gives each tensor a role: a decoder linear to
quantize, a norm, the embedding, the head, or a vision-tower/projector tensor to copy untouched. It also serves the
language model's weights one decoder layer at a time, under the canonical names the forward in `modeling` uses.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from quantize.errors import ModelFormatError, UnsupportedArchitectureError
from quantize.safetensors_io import SafetensorsIndex, TensorEntry
from quantize.textconfig import TextConfig


class Role(StrEnum):
    """What the pipeline does with a tensor."""

    LINEAR = "linear"  # decoder attention/MLP weight: quantized
    LINEAR_BIAS = "linear_bias"  # bias of a decoder linear: kept beside its quantized weight, fp16
    NORM = "norm"  # RMSNorm weights: kept, fp16
    EMBEDDING = "embedding"  # token embedding: kept, fp16
    HEAD = "head"  # lm_head: quantized at the head bits
    VISION = "vision"  # vision tower: copied byte for byte
    PROJECTOR = "projector"  # multi-modal projector: copied byte for byte
    IGNORED = "ignored"  # derived buffers some old checkpoints carry (rotary inv_freq): not copied


KEPT_ROLES = frozenset({Role.VISION, Role.PROJECTOR})


@dataclass(frozen=True)
class ArchSpec:
    """An architecture the pipeline supports, as named in config.json's `architectures`."""

    name: str
    multimodal: bool
    text_types: frozenset[str]
    vision_types: frozenset[str] = frozenset()
    projector_bias_default: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("LlavaForConditionalGeneration", True, frozenset({"mistral", "llama"}), frozenset({"pixtral"}), True),
        ArchSpec("Mistral3ForConditionalGeneration", True, frozenset({"mistral", "llama"}), frozenset({"pixtral"})),
        ArchSpec("LlamaForCausalLM", False, frozenset({"llama"})),
        ArchSpec("MistralForCausalLM", False, frozenset({"mistral"})),
    )
}


@dataclass(frozen=True)
class KeyLayout:
    """Where the parts of a model live in its safetensors keys."""

    name: str
    lm_prefix: str  # followed by embed_tokens / layers.N / norm
    head_key: str
    vision_prefix: str | None = None
    projector_prefix: str | None = None


LAYOUTS: tuple[KeyLayout, ...] = (
    KeyLayout(
        "llava-legacy",
        "language_model.model.",
        "language_model.lm_head.weight",
        "vision_tower.",
        "multi_modal_projector.",
    ),
    KeyLayout(
        "transformers", "model.language_model.", "lm_head.weight", "model.vision_tower.", "model.multi_modal_projector."
    ),
    KeyLayout("causal-lm", "model.", "lm_head.weight"),
)

_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class TensorInfo:
    key: str
    role: Role
    dtype: str
    shape: tuple[int, ...]
    layer: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing (a model folder needs config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: not a JSON object")
    return config


def arch_spec(config: dict[str, Any], config_path: Path) -> ArchSpec:
    names = config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{config_path}: architecture {names or 'not given'} is not supported (supported: {supported})"
        )
    spec = ARCHITECTURES[names[0]]
    text = config.get("text_config", {}) if spec.multimodal else config
    text_type = text.get("model_type", "llama" if spec.multimodal else None)
    if text_type not in spec.text_types:
        raise UnsupportedArchitectureError(
            f"{config_path}: {spec.name} with a '{text_type}' language model is not supported "
            f"(supported: {', '.join(sorted(spec.text_types))})"
        )
    if spec.multimodal:
        vision_type = config.get("vision_config", {}).get("model_type")
        if vision_type not in spec.vision_types:
            raise UnsupportedArchitectureError(
                f"{config_path}: {spec.name} with a '{vision_type}' vision tower is not supported "
                f"(supported: {', '.join(sorted(spec.vision_types))})"
            )
    return spec


class ModelAdapter:
    """One model folder: its architecture, key layout, language-model config and every tensor's role.

    It implements the weights-provider protocol of `quantize.modeling` (`embed_tokens`, `layer`, `final_norm`,
    `lm_head`), reading one layer's tensors at a time from the shards.
    """

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        self.config = read_config(self.model_dir)
        self.spec = arch_spec(self.config, self.model_dir / "config.json")
        self.files = SafetensorsIndex(self.model_dir)
        self.layout = self._detect_layout()
        self.text = self._text_config()
        self.tensors = {key: self._classify(key) for key in self.files}
        self._check_shapes()

    # --- recognition -------------------------------------------------------------------------------------------

    def _detect_layout(self) -> KeyLayout:
        candidates = [lay for lay in LAYOUTS if (lay.vision_prefix is not None) == self.spec.multimodal]
        for layout in candidates:
            if f"{layout.lm_prefix}embed_tokens.weight" in self.files:
                return layout
        expected = " or ".join(f"'{lay.lm_prefix}embed_tokens.weight'" for lay in candidates)
        raise ModelFormatError(
            f"{self.model_dir}: no token embedding found ({expected}); not a {self.spec.name} checkpoint"
        )

    def _text_config(self) -> TextConfig:
        text = self.config.get("text_config", {}) if self.spec.multimodal else self.config
        tie = self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        if self.layout.head_key in self.files:
            tie = False  # a stored head is used as it is, whatever the flag says
        elif not tie:
            raise ModelFormatError(
                f"{self.model_dir}: config says tie_word_embeddings false, but there is no '{self.layout.head_key}'"
            )
        try:
            return TextConfig.from_dict(text, tie_word_embeddings=bool(tie))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(
                f"{self.model_dir / 'config.json'}: language-model config incomplete ({exc})"
            ) from exc

    def _classify(self, key: str) -> TensorInfo:
        entry = self.files.entry(key)
        role, layer = self._role(key)
        return TensorInfo(key, role, entry.dtype, entry.shape, layer)

    def _role(self, key: str) -> tuple[Role, int | None]:
        lay = self.layout
        if key == lay.head_key:
            return Role.HEAD, None
        if lay.vision_prefix and key.startswith(lay.vision_prefix):
            return Role.VISION, None
        if lay.projector_prefix and key.startswith(lay.projector_prefix):
            return Role.PROJECTOR, None
        if key.startswith(lay.lm_prefix):
            name = key[len(lay.lm_prefix) :]
            if name == "embed_tokens.weight":
                return Role.EMBEDDING, None
            if name == "norm.weight":
                return Role.NORM, None
            match = _LAYER_KEY.fullmatch(name)
            if match:
                role = self._layer_role(match.group(2))
                if role is not None:
                    return role, int(match.group(1))
        raise ModelFormatError(
            f"{self.files.entry(key).file}: unexpected tensor '{key}' for a {self.spec.name} in the {lay.name} layout"
        )

    @staticmethod
    def _layer_role(name: str) -> Role | None:
        if name in _LAYER_NORMS:
            return Role.NORM
        module, _, param = name.rpartition(".")
        if module in _LINEARS + _MLP_LINEARS:
            return {"weight": Role.LINEAR, "bias": Role.LINEAR_BIAS}.get(param)
        if name.endswith("rotary_emb.inv_freq"):
            return Role.IGNORED
        return None

    # --- validation --------------------------------------------------------------------------------------------

    def expected_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical per-layer tensor names -> shapes the config implies (biases only where the config has them)."""
        t = self.text
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (t.hidden_size,),
            "post_attention_layernorm.weight": (t.hidden_size,),
        }
        for linear, (n_out, k_in) in t.linear_shapes().items():
            shapes[f"{linear}.weight"] = (n_out, k_in)
            if t.linear_has_bias(linear):
                shapes[f"{linear}.bias"] = (n_out,)
        return shapes

    def _check_shapes(self) -> None:
        t, lay = self.text, self.layout
        expected = {
            f"{lay.lm_prefix}embed_tokens.weight": (t.vocab_size, t.hidden_size),
            f"{lay.lm_prefix}norm.weight": (t.hidden_size,),
        }
        if not t.tie_word_embeddings:
            expected[lay.head_key] = (t.vocab_size, t.hidden_size)
        for i in range(t.num_hidden_layers):
            expected |= {
                f"{lay.lm_prefix}layers.{i}.{name}": shape for name, shape in self.expected_layer_shapes().items()
            }
        for key, info in self.tensors.items():
            if info.role not in KEPT_ROLES | {Role.IGNORED} and key not in expected:
                raise ModelFormatError(self._contradiction(key, info))
        for key, shape in expected.items():
            if key not in self.tensors:
                raise ModelFormatError(f"{self.model_dir}: tensor '{key}' {list(shape)} is missing from the shards")
            if self.tensors[key].shape != shape:
                raise ModelFormatError(
                    f"{self.files.entry(key).file}: tensor '{key}' has shape {list(self.tensors[key].shape)}, "
                    f"config.json implies {list(shape)}"
                )
        self._check_projector_bias()

    def _contradiction(self, key: str, info: TensorInfo) -> str:
        file = self.files.entry(key).file
        if info.layer is not None and info.layer >= self.text.num_hidden_layers:
            layers = self.text.num_hidden_layers
            return f"{file}: tensor '{key}' is for layer {info.layer}, but config.json has {layers} layers"
        if info.role is Role.LINEAR_BIAS:
            return f"{file}: tensor '{key}' is a bias, but config.json says the model has none"
        return f"{file}: tensor '{key}' is not expected by config.json"

    def _check_projector_bias(self) -> None:
        if not self.spec.multimodal:
            return
        has_bias = bool(self.config.get("multimodal_projector_bias", self.spec.projector_bias_default))
        prefix = self.layout.projector_prefix or ""
        linears = [k for k in self.tensors if k.startswith(prefix) and re.search(r"linear_\d\.weight$", k)]
        if not linears:
            raise ModelFormatError(f"{self.model_dir}: no projector tensors '{prefix}linear_N.weight' in the shards")
        for weight in linears:
            bias = weight[: -len("weight")] + "bias"
            if has_bias and bias not in self.tensors:
                raise ModelFormatError(
                    f"{self.model_dir}: config.json says multimodal_projector_bias true, but '{bias}' is missing"
                )
            if not has_bias and bias in self.tensors:
                raise ModelFormatError(
                    f"{self.files.entry(bias).file}: tensor '{bias}' present, "
                    "but config.json says multimodal_projector_bias false"
                )

    # --- queries -----------------------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return self.spec.name

    def keys_with_role(self, *roles: Role) -> list[str]:
        return [k for k, info in self.tensors.items() if info.role in roles]

    def entry(self, key: str) -> TensorEntry:
        return self.files.entry(key)

    @cached_property
    def component_params(self) -> dict[str, int]:
        """Parameter counts per component: the decoder linears, norms, embedding, head, vision tower, projector."""
        counts: Counter[str] = Counter()
        for info in self.tensors.values():
            counts[info.role.value] += info.numel
        return dict(counts)

    def lm_key(self, name: str) -> str:
        """Stored key of a canonical language-model tensor name (`layers.3.mlp.up_proj.weight`, `norm.weight`)."""
        if name == "lm_head.weight":
            return (
                self.layout.head_key
                if not self.text.tie_word_embeddings
                else f"{self.layout.lm_prefix}embed_tokens.weight"
            )
        return f"{self.layout.lm_prefix}{name}"

    # --- the weights provider used by the layer-by-layer forward ----------------------------------------------

    def embed_tokens(self) -> torch.Tensor:
        return self.files.get(self.lm_key("embed_tokens.weight"))

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.text.num_hidden_layers:
            raise IndexError(f"layer {index} out of range 0..{self.text.num_hidden_layers - 1}")
        prefix = f"layers.{index}."
        names = [
            k[len(self.layout.lm_prefix) + len(prefix) :]
            for k in self.tensors
            if k.startswith(self.layout.lm_prefix + prefix)
        ]
        return {name: self.files.get(self.lm_key(prefix + name)) for name in names if not name.endswith("inv_freq")}

    def final_norm(self) -> torch.Tensor:
        return self.files.get(self.lm_key("norm.weight"))

    def lm_head(self) -> torch.Tensor:
        return self.files.get(self.lm_key("lm_head.weight"))


def load_adapter(model_dir: Path | str) -> ModelAdapter:
    """Recognise and check a model folder; raises a one-line ModelFormatError / UnsupportedArchitectureError."""
    return ModelAdapter(model_dir)
