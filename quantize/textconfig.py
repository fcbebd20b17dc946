"""The language model's hyper-parameters, read once from config.json (top level or `text_config`).

Every model layout the adapters accept (Llava/Pixtral, Mistral3, plain Llama/Mistral) reduces to this one record,
which the layer-by-layer forward and, later, the quantizer work from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, text: dict[str, Any], *, tie_word_embeddings: bool | None = None) -> TextConfig:
        """Build from a text config dict (Llama/Mistral keys). `tie_word_embeddings` overrides the dict's."""
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        head_dim = text.get("head_dim") or hidden // heads
        rope_scaling = text.get("rope_scaling")
        rope_theta = text.get("rope_theta")
        # transformers 5 moved rope settings into `rope_parameters` (theta and scaling type together).
        params = text.get("rope_parameters")
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        tie = text.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
        return cls(
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(text["vocab_size"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=int(text.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(text.get("attention_bias", False)),
            mlp_bias=bool(text.get("mlp_bias", False)),
            hidden_act=str(text.get("hidden_act", "silu")),
            sliding_window=int(text["sliding_window"]) if text.get("sliding_window") else None,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Each decoder linear's canonical name -> nn.Linear weight shape (out_features, in_features)."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "self_attn.q_proj": (q, self.hidden_size),
            "self_attn.k_proj": (kv, self.hidden_size),
            "self_attn.v_proj": (kv, self.hidden_size),
            "self_attn.o_proj": (self.hidden_size, q),
            "mlp.gate_proj": (self.intermediate_size, self.hidden_size),
            "mlp.up_proj": (self.intermediate_size, self.hidden_size),
            "mlp.down_proj": (self.hidden_size, self.intermediate_size),
        }

    def linear_has_bias(self, linear: str) -> bool:
        return self.attention_bias if linear.startswith("self_attn.") else self.mlp_bias
