"""Rotary position embeddings for the language model, computed from a `TextConfig` alone.

Covers the scaling types Llama/Mistral-family checkpoints use (default, linear, dynamic NTK, llama3, yarn, longrope)
with the numerics of transformers' implementation (float32 throughout), so the layer-by-layer forward reproduces the
reference model's logits. Unlike transformers there is no cached state: the sequence-dependent types (dynamic,
longrope) look at the positions of the call they are given.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quantize.errors import UnsupportedArchitectureError
from quantize.textconfig import TextConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type(cfg: TextConfig) -> str:
    """The scaling type named by `cfg.rope_scaling` (`rope_type`, or the legacy `type` key); "default" if none."""
    scaling = cfg.rope_scaling or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def inv_freq_and_scale(cfg: TextConfig, *, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, head_dim/2 values) and the factor cos/sin are multiplied by.

    `seq_len` is the length the embeddings are for; only dynamic and longrope depend on it.
    """
    kind = rope_type(cfg)
    builders = {
        "default": _default,
        "linear": _linear,
        "dynamic": _dynamic,
        "llama3": _llama3,
        "yarn": _yarn,
        "longrope": _longrope,
    }
    if kind not in builders:
        raise UnsupportedArchitectureError(
            f"rope type {kind!r} is not supported; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = (cfg.rope_scaling or {}).get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise UnsupportedArchitectureError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    return builders[kind](cfg, seq_len)


def rotary_cos_sin(
    cfg: TextConfig,
    positions: int | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, [..., T, head_dim], for a length (positions 0..n-1) or a tensor of positions ([T] or [B, T]).

    Computed in float32 and cast to `dtype` at the end, as transformers does.
    """
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    positions = positions.to(device=device)
    # dynamic/longrope choose their frequencies from the furthest position, as transformers does per forward call.
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv_freq, scale = inv_freq_and_scale(cfg, seq_len=seq_len)
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the NEOX / HF Llama pairing of dims i and i + D/2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, both [B, heads, T, D], by cos/sin of shape [T, D] or [B, T, D]."""
    if cos.dim() == 3:
        # Per-row tables: add the heads axis so they broadcast over heads.
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _plain_inv_freq(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim))


def _original_max(cfg: TextConfig) -> int:
    # transformers falls back to max_position_embeddings when the scaling dict leaves this out.
    scaling = cfg.rope_scaling or {}
    value = scaling.get("original_max_position_embeddings")
    value = value or cfg.extra.get("original_max_position_embeddings") or cfg.max_position_embeddings
    return int(value)


def _scaling(cfg: TextConfig) -> dict[str, Any]:
    """`cfg.rope_scaling`, for the builders below: `rope_type` only picks a non-default type when it is set."""
    scaling = cfg.rope_scaling
    assert scaling is not None, "a scaled rope type needs rope_scaling"
    return scaling


def _default(cfg: TextConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return _plain_inv_freq(cfg.rope_theta, cfg.head_dim), 1.0


def _linear(cfg: TextConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    factor = float(_scaling(cfg)["factor"])
    return _plain_inv_freq(cfg.rope_theta, cfg.head_dim) / factor, 1.0


def _dynamic(cfg: TextConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling: the base grows with the sequence once it passes max_position_embeddings."""
    factor = float(_scaling(cfg)["factor"])
    dim, max_pos = cfg.head_dim, cfg.max_position_embeddings
    if seq_len is None or seq_len <= max_pos:
        return _plain_inv_freq(cfg.rope_theta, dim), 1.0
    # A float32 tensor, as transformers computes the grown base from the (tensor) sequence length.
    seq = torch.tensor(seq_len, dtype=torch.float32)
    base = cfg.rope_theta * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _plain_inv_freq(base, dim), 1.0


def _llama3(cfg: TextConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    scaling = _scaling(cfg)
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = _original_max(cfg)
    inv_freq = _plain_inv_freq(cfg.rope_theta, cfg.head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, blended, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(cfg: TextConfig, factor: float) -> float:
    scaling = _scaling(cfg)
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_ramp_bounds(cfg: TextConfig, dim: int, base: float) -> tuple[float, float]:
    """The dims between which YaRN blends from extrapolation (fast rotations) to interpolation (slow ones)."""
    scaling, old_len = _scaling(cfg), _original_max(cfg)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    return low, (high + 0.001 if low == high else high)


def _yarn(cfg: TextConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """YaRN: per-dim blend of original and interpolated frequencies, and a cos/sin (attention) scale."""
    scaling, dim, base = _scaling(cfg), cfg.head_dim, cfg.rope_theta
    factor = scaling.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / _original_max(cfg)
    factor = float(factor)
    pos_freqs = base ** _exponents(dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    low, high = _yarn_ramp_bounds(cfg, dim, base)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    return inv_freq, float(_yarn_attention_factor(cfg, factor))


def _longrope(cfg: TextConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-dim rescale factors, the long set once the sequence passes the original length."""
    scaling, old_len = _scaling(cfg), _original_max(cfg)
    factor = scaling.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / old_len
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    use_long = seq_len is not None and seq_len > old_len
    ext = torch.tensor(scaling["long_factor" if use_long else "short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (ext * cfg.rope_theta ** _exponents(cfg.head_dim))
    return inv_freq, float(attention_factor)
