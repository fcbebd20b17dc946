"""Calibration states: the language model's input for every calibration row, and the blocks that move them.

Text rows are embedded; image rows get the full-precision vision tower's features at their `[IMG]` positions,
computed once. Measurement and quantization then run each decoder layer as two slots (attention, MLP) over
these states in row chunks, optionally capturing every linear's input into Hessian accumulators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from calibration import CalibrationSet
from quantize.adapters import ModelAdapter
from quantize.modeling import LayerwiseLM, attention_block, mlp_block
from quantize.textconfig import TextConfig

log = logging.getLogger(__name__)

# Above this many bytes of fp32 states, keep them in fp16 (as exllamav2 always does) to halve host memory.
FP32_STATES_LIMIT = 8 * 2**30
FP16_MAX = 65504.0


@dataclass(frozen=True)
class SlotSpec:
    """One half of a decoder layer: its exllamav2 module mode, linears, and whose input each linear's Hessian is."""

    mode: str  # "self_attn" | "mlp", as in measurement.json keys
    linears: tuple[str, ...]  # canonical names inside the layer, e.g. "self_attn.q_proj"
    hessian_of: Mapping[str, str]  # linear -> the linear whose captured input it shares (k/v use q's, gate up's)


SLOTS: tuple[SlotSpec, ...] = (
    SlotSpec(
        "self_attn",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        {
            "self_attn.q_proj": "self_attn.q_proj",
            "self_attn.k_proj": "self_attn.q_proj",
            "self_attn.v_proj": "self_attn.q_proj",
            "self_attn.o_proj": "self_attn.o_proj",
        },
    ),
    SlotSpec(
        "mlp",
        ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        {"mlp.gate_proj": "mlp.up_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"},
    ),
)


def state_dtype(rows: int, length: int, hidden: int) -> torch.dtype:
    size = rows * length * hidden * 4
    if size > FP32_STATES_LIMIT:
        log.info(
            "calibration states: fp16 (%.1f GiB in fp32 would exceed %d GiB)", size / 2**30, FP32_STATES_LIMIT >> 30
        )
        return torch.float16
    return torch.float32


def initial_states(adapter: ModelAdapter, calset: CalibrationSet, lm: LayerwiseLM) -> torch.Tensor:
    """Input embeddings of every row [rows, length, hidden] in host memory, image features in place."""
    ids = calset.input_ids
    vocab = adapter.text.vocab_size
    if int(ids.max()) >= vocab:
        # exllamav2 clamps ids past the embedding to 0; a tokenizer larger than the embedding is the usual cause.
        log.warning("calibration: %d ids >= vocab size %d clamped to 0", int((ids >= vocab).sum()), vocab)
        ids = torch.where(ids >= vocab, torch.zeros_like(ids), ids)
    dtype = state_dtype(ids.shape[0], ids.shape[1], adapter.text.hidden_size)
    states = torch.empty(*ids.shape, adapter.text.hidden_size, dtype=dtype)
    for start in range(0, ids.shape[0], 16):
        states[start : start + 16] = lm.embed(ids[start : start + 16]).to("cpu", dtype)
    if calset.image_rows:
        _insert_image_features(adapter, calset, states, lm.device)
    return states


def _insert_image_features(adapter: ModelAdapter, calset: CalibrationSet, states: torch.Tensor, device) -> None:
    from quantize.vision import VisionEncoder

    encoder = VisionEncoder(adapter, device=device)
    for image_row in calset.image_rows:
        features = torch.cat(encoder.image_features(image_row.pixel_values, image_row.image_sizes))
        positions = image_row.image_token_positions
        if features.shape[0] != positions.numel():
            raise ValueError(f"row {image_row.row}: {positions.numel()} image tokens, {features.shape[0]} features")
        states[image_row.row, positions] = features.to("cpu", states.dtype)
    log.info("calibration: image features of %d rows from the full-precision vision tower", len(calset.image_rows))


def slot_forward(
    cfg: TextConfig,
    slot: SlotSpec,
    weights: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    *,
    capture: Callable[[str, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One slot (residual included) over a chunk of rows already on the device, in the compute dtype."""
    if slot.mode == "self_attn":
        return attention_block(cfg, weights, hidden, *rope, capture=capture)
    return mlp_block(cfg, weights, hidden, capture=capture)


def to_state(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back to host memory in the states' dtype; fp16 states are clamped to the fp16 range, as exllamav2 does."""
    if dtype == torch.float16:
        x = x.clamp(-FP16_MAX, FP16_MAX)
    return x.to("cpu", dtype)


def row_chunks(rows: int, length: int) -> list[slice]:
    """Row chunks of about 8k tokens: big enough for efficient matmuls, small enough to bound activation memory."""
    step = max(1, 8192 // max(length, 1))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]
