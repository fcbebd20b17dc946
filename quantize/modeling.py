"""A Llama/Mistral language-model forward built from per-layer pure functions over explicit weight dicts.

The quantizer runs a very large model one decoder layer at a time with weights streamed from disk, so nothing here
holds the model: `decoder_layer(cfg, w, hidden, cos, sin)` takes one layer's weights as a dict with canonical names,
an optional `capture` records the input of every linear (for GPTQ Hessians), and substitute (quantized) weights are
just another dict. `LayerwiseLM` strings the pieces together over a `TextWeights` provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from quantize.errors import ModelFormatError, UnsupportedArchitectureError
from quantize.rope import apply_rotary, rotary_cos_sin
from quantize.textconfig import TextConfig

# One decoder layer's weights, keyed by the canonical names below (relative to `model.layers.{i}.`).
LayerWeights = dict[str, torch.Tensor]

# The input of linear NAME is reported as capture(NAME, tensor), or stored as capture[NAME] = tensor.
Capture = dict[str, torch.Tensor] | Callable[[str, torch.Tensor], None]

ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS

LAYER_WEIGHT_NAMES = (
    "input_layernorm.weight",
    *(f"{name}.weight" for name in ATTENTION_LINEARS),
    "post_attention_layernorm.weight",
    *(f"{name}.weight" for name in MLP_LINEARS),
)
ATTENTION_BIAS_NAMES = tuple(f"{name}.bias" for name in ATTENTION_LINEARS)
MLP_BIAS_NAMES = tuple(f"{name}.bias" for name in MLP_LINEARS)
# Some layouts bias q/k/v but not o_proj: its bias is used when the dict has it, never required.
OPTIONAL_WEIGHT_NAMES = ("self_attn.o_proj.bias",)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def layer_weight_names(cfg: TextConfig) -> list[str]:
    """Every tensor name of one decoder layer for this config, in the HF Llama/Mistral layout."""
    names = list(LAYER_WEIGHT_NAMES)
    if cfg.attention_bias:
        names += ATTENTION_BIAS_NAMES
    if cfg.mlp_bias:
        names += MLP_BIAS_NAMES
    return names


def check_layer_weights(cfg: TextConfig, w: Mapping[str, torch.Tensor], *, layer: int | None = None) -> None:
    """Raise ModelFormatError if `w` lacks a tensor the config calls for (o_proj's bias is optional)."""
    missing = [n for n in layer_weight_names(cfg) if n not in w and n not in OPTIONAL_WEIGHT_NAMES]
    if missing:
        where = "" if layer is None else f"layer {layer}: "
        raise ModelFormatError(f"{where}missing weights {', '.join(missing)}")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation function for a config's `hidden_act`."""
    if name not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"hidden_act {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF Llama: normalize in float32, cast back to x's dtype, then scale by `weight`."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def _record(capture: Capture | None, name: str, x: torch.Tensor) -> None:
    if capture is None:
        return
    if isinstance(capture, dict):
        capture[name] = x
    else:
        capture(name, x)


def _linear(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, capture: Capture | None) -> torch.Tensor:
    _record(capture, name, x)
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def attention(
    cfg: TextConfig,
    w: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    capture: Capture | None = None,
) -> torch.Tensor:
    """Causal grouped-query self-attention of normed x [B, T, hidden], o_proj included; returns [B, T, hidden]."""
    batch, seq, _ = x.shape
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = _linear(w, "self_attn.q_proj", x, capture).view(batch, seq, heads, head_dim).transpose(1, 2)
    k = _linear(w, "self_attn.k_proj", x, capture).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    v = _linear(w, "self_attn.v_proj", x, capture).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype))
    if kv_heads != heads:
        # Each KV head serves heads // kv_heads consecutive query heads; repeating them explicitly keeps every SDPA
        # backend (flash, memory-efficient) available, at the cost of a K/V copy the size of Q.
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    window = cfg.sliding_window
    if window is not None and seq > window:
        # Mistral-style sliding window: position i sees positions j with i - window < j <= i.
        pos = torch.arange(seq, device=q.device)
        offset = pos[:, None] - pos[None, :]
        mask = (offset >= 0) & (offset < window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim**-0.5)
    out = out.transpose(1, 2).reshape(batch, seq, heads * head_dim)
    return _linear(w, "self_attn.o_proj", out, capture)


def mlp(
    cfg: TextConfig, w: Mapping[str, torch.Tensor], x: torch.Tensor, *, capture: Capture | None = None
) -> torch.Tensor:
    """Gated MLP of normed x: down_proj(act(gate_proj(x)) * up_proj(x))."""
    act = activation(cfg.hidden_act)
    product = act(_linear(w, "mlp.gate_proj", x, capture)) * _linear(w, "mlp.up_proj", x, capture)
    return _linear(w, "mlp.down_proj", product, capture)


def attention_block(
    cfg: TextConfig,
    w: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    capture: Capture | None = None,
) -> torch.Tensor:
    """First half of a decoder layer: hidden + attention(input_layernorm(hidden))."""
    normed = rms_norm(hidden, w["input_layernorm.weight"], cfg.rms_norm_eps)
    return hidden + attention(cfg, w, normed, cos, sin, capture=capture)


def mlp_block(
    cfg: TextConfig, w: Mapping[str, torch.Tensor], hidden: torch.Tensor, *, capture: Capture | None = None
) -> torch.Tensor:
    """Second half of a decoder layer: hidden + mlp(post_attention_layernorm(hidden))."""
    normed = rms_norm(hidden, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return hidden + mlp(cfg, w, normed, capture=capture)


def decoder_layer(
    cfg: TextConfig,
    w: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    capture: Capture | None = None,
) -> torch.Tensor:
    """One pre-norm decoder layer, [B, T, hidden] -> [B, T, hidden].

    With `capture`, the input of each linear in LINEAR_NAMES is reported under its name: q/k/v share one tensor
    (post-norm activations), o_proj gets the attention output, gate/up share the post-norm activations, down_proj
    gets the gated product.
    """
    hidden = attention_block(cfg, w, hidden, cos, sin, capture=capture)
    return mlp_block(cfg, w, hidden, capture=capture)


@runtime_checkable
class TextWeights(Protocol):
    """Where a layer-wise forward gets its tensors; each call may load from disk, the caller moves and casts them."""

    def embed_tokens(self) -> torch.Tensor:
        """[vocab, hidden] embedding matrix."""
        ...

    def layer(self, index: int) -> LayerWeights:
        """Decoder layer `index`'s tensors under the canonical names (see layer_weight_names)."""
        ...

    def final_norm(self) -> torch.Tensor:
        """[hidden] weight of the norm before the head."""
        ...

    def lm_head(self) -> torch.Tensor:
        """[vocab, hidden] output projection (the embedding matrix when tied)."""
        ...


class StateDictTextWeights:
    """A TextWeights over an in-memory HF state dict (`model.embed_tokens.weight`, `model.layers.0....`, ...).

    `tie=None` ties the head to the embeddings only when `head_key` is absent.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        prefix: str = "model.",
        head_key: str = "lm_head.weight",
        tie: bool | None = None,
    ) -> None:
        self._sd = state_dict
        self._prefix = prefix
        self._head_key = head_key
        self._tie = head_key not in state_dict if tie is None else tie

    def embed_tokens(self) -> torch.Tensor:
        return self._sd[f"{self._prefix}embed_tokens.weight"]

    def layer(self, index: int) -> LayerWeights:
        start = f"{self._prefix}layers.{index}."
        names = LAYER_WEIGHT_NAMES + ATTENTION_BIAS_NAMES + MLP_BIAS_NAMES
        return {name: self._sd[start + name] for name in names if start + name in self._sd}

    def final_norm(self) -> torch.Tensor:
        return self._sd[f"{self._prefix}norm.weight"]

    def lm_head(self) -> torch.Tensor:
        return self.embed_tokens() if self._tie else self._sd[self._head_key]


class LayerwiseLM:
    """The language model's forward, one layer's weights on the device at a time.

    Hidden states stay on whatever device they are passed on; `run_layers` moves `rows_per_chunk` rows at a time
    to `device` (all rows when None), so calibration states can live in host memory.
    """

    def __init__(
        self,
        cfg: TextConfig,
        weights: TextWeights,
        *,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        rows_per_chunk: int | None = None,
    ) -> None:
        activation(cfg.hidden_act)  # fail on an unknown activation before any weight is read
        self.cfg = cfg
        self.weights = weights
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.rows_per_chunk = rows_per_chunk

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.compute_dtype)

    def layer_weights(self, index: int) -> LayerWeights:
        """Layer `index`'s weights, checked, on the device in the compute dtype."""
        w = self.weights.layer(index)
        check_layer_weights(self.cfg, w, layer=index)
        return {name: self._to_device(t) for name, t in w.items()}

    def position_embeddings(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..seq_len-1, on the device in the compute dtype."""
        return rotary_cos_sin(self.cfg, seq_len, device=self.device, dtype=self.compute_dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden [B, T, hidden] on the device, compute dtype."""
        table = self.weights.embed_tokens()
        # Gather rows where the table lives, then cast only those: the full table can be gigabytes.
        rows = F.embedding(input_ids.to(table.device), table)
        return self._to_device(rows)

    def run_layers(self, hidden: torch.Tensor, *, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run decoder layers start..end-1 over hidden [B, T, hidden]; returns a new tensor on hidden's device."""
        end = self.cfg.num_hidden_layers if end is None else end
        hidden = hidden.to(dtype=self.compute_dtype, copy=True)
        cos, sin = self.position_embeddings(hidden.shape[1])
        chunk = self.rows_per_chunk or max(hidden.shape[0], 1)
        for index in range(start, end):
            w = self.layer_weights(index)
            for row in range(0, hidden.shape[0], chunk):
                rows = hidden[row : row + chunk].to(self.device)
                hidden[row : row + chunk] = decoder_layer(self.cfg, w, rows, cos, sin).to(hidden.device)
            del w  # drop this layer's device copy before the next one loads
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: hidden [B, T, hidden] -> logits [B, T, vocab] on the device."""
        hidden = self._to_device(hidden)
        normed = rms_norm(hidden, self._to_device(self.weights.final_norm()), self.cfg.rms_norm_eps)
        return F.linear(normed, self._to_device(self.weights.lm_head()))

    def forward(
        self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for full-length rows (positions 0..T-1), from token ids or from embeddings."""
        if input_ids is not None and inputs_embeds is None:
            hidden = self.embed(input_ids)
        elif inputs_embeds is not None and input_ids is None:
            hidden = self._to_device(inputs_embeds)
        else:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.head(self.run_layers(hidden))

    __call__ = forward
