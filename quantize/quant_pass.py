"""The quantize pass: GPTQ every decoder linear with its strategy config, layer by layer, then the head.

Each slot's Hessians come from running the still-full-precision slot on the current states, which already carry
the quantization error of every layer upstream (unlike measurement); each linear is quantized, packed and saved
as its own safetensors file; the slot is then rerun with the dequantized weights (bit-identical to what exllamav2
reconstructs) to give the next slot's input. Only one layer's weights and the calibration states are in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from calibration import CalibrationSet
from quantize.adapters import ModelAdapter
from quantize.candidates import head_config
from quantize.checkpoint import LayerCheckpoint, resume_or_start
from quantize.format import pack, total_bits
from quantize.gptq import HessianAccumulator, gptq_quantize, prepare
from quantize.measure import LayerContext, capture_hessians, exl2_prefix, layer_weights, relative_error
from quantize.memory import release_memory
from quantize.modeling import LayerwiseLM, rms_norm
from quantize.progress import NullProgress, Progress
from quantize.qparams import QParams
from quantize.states import SLOTS, SlotSpec, initial_states, row_chunks

log = logging.getLogger(__name__)


@dataclass
class QuantStats:
    """What the pass measured: exact bits and elements of the decoder linears and the head, per-slot errors."""

    linear_bits: int = 0
    linear_numel: int = 0
    head_bits: int = 0
    head_numel: int = 0
    slot_errors: dict[str, float] = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        """Decoder-linear bits per weight, scales, groups and permutation included (exllamav2's -b)."""
        return self.linear_bits / self.linear_numel

    @property
    def head_bpw(self) -> float:
        return self.head_bits / self.head_numel if self.head_numel else 0.0


def module_file(tensors_dir: Path, module: str) -> Path:
    return tensors_dir / f"{module}.safetensors"


def save_module(tensors_dir: Path, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """One linear's packed tensors under `<module>.<suffix>`, written to a temp name and renamed."""
    path = module_file(tensors_dir, module)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({f"{module}.{suffix}": t.contiguous().cpu() for suffix, t in tensors.items()}, tmp)
    tmp.replace(path)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any, qp: QParams, module: str, tensors_dir: Path
) -> tuple[torch.Tensor, int]:
    """GPTQ one linear, save its packed tensors; returns its dequantized weight and its exact size in bits."""
    quantized, dequantized = gptq_quantize(weight, prepared, qp, bias=bias)
    save_module(tensors_dir, module, pack(quantized))
    n_out, k_in = weight.shape
    return dequantized.to(weight.dtype), total_bits(qp, k_in, n_out, bias_numel=0 if bias is None else bias.numel())


def quantize_slot(
    ctx: LayerContext,
    slot: SlotSpec,
    weights: dict[str, torch.Tensor],
    states: torch.Tensor,
    *,
    index: int,
    configs: Mapping[str, QParams],
    tensors_dir: Path,
    stats: QuantStats,
) -> torch.Tensor:
    """Quantize one slot's linears from Hessians of the current states; returns the slot's quantized outputs."""
    reference, hessians = capture_hessians(ctx, slot, weights, states)
    for linear in slot.linears:
        short = linear.split(".")[-1]
        module = ctx.adapter.lm_key(f"layers.{index}.{linear}.weight")[: -len(".weight")]
        weight, bias = weights[f"{linear}.weight"], weights.get(f"{linear}.bias")
        weights[f"{linear}.weight"], bits = quantize_linear(
            weight, bias, hessians[slot.hessian_of[linear]], configs[short], module, tensors_dir
        )
        stats.linear_bits += bits
        # exllamav2's budget counts output features padded to a multiple of 32.
        stats.linear_numel += weight.shape[1] * (-(-weight.shape[0] // 32) * 32)
    key = f"{exl2_prefix(ctx.adapter)}layers.{index}.{slot.mode}"
    out = torch.empty_like(states)
    stats.slot_errors[key] = relative_error(ctx, slot, weights, states, reference, outputs=out)
    return out


def slot_configs(strategy: Mapping[str, Mapping[str, Any]], key: str, slot: SlotSpec) -> dict[str, QParams]:
    """The strategy's chosen config of each linear of one slot (entries in exllamav2's measurement form)."""
    if key not in strategy:
        raise KeyError(f"strategy has no entry for {key}")
    entry = strategy[key]
    return {linear.split(".")[-1]: QParams.from_dict(entry[linear.split(".")[-1]]) for linear in slot.linears}


def quantize_head(
    ctx: LayerContext, states: torch.Tensor, head_bits: int, tensors_dir: Path, stats: QuantStats
) -> None:
    """GPTQ the head at `head_bits` with Hessians from the final-norm output of the quantized states."""
    adapter, lm = ctx.adapter, ctx.lm
    norm = adapter.final_norm().half().to(lm.device, lm.compute_dtype)
    weight = adapter.lm_head().half().to(lm.device, lm.compute_dtype)
    accumulator = HessianAccumulator(weight.shape[1], device=lm.device)
    for rows in row_chunks(states.shape[0], states.shape[1]):
        hidden = states[rows].to(lm.device, lm.compute_dtype)
        accumulator.add(rms_norm(hidden, norm, adapter.text.rms_norm_eps))
    module = adapter.layout.head_key[: -len(".weight")]
    qp = head_config(head_bits)
    _, bits = quantize_linear(weight, None, prepare(accumulator.hessian()), qp, module, tensors_dir)
    stats.head_bits, stats.head_numel = bits, weight.numel()


def quantize_model(
    adapter: ModelAdapter,
    calset: CalibrationSet,
    strategy: Mapping[str, Mapping[str, Any]],
    *,
    head_bits: int,
    tensors_dir: Path,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    checkpoint: LayerCheckpoint | None = None,
) -> QuantStats:
    """Quantize every decoder linear and the head into `tensors_dir` (one file per linear); with `checkpoint`,
    resumed from its last save (the linears of finished layers are already in `tensors_dir`)."""
    progress = progress or NullProgress()
    tensors_dir.mkdir(parents=True, exist_ok=True)
    lm = LayerwiseLM(adapter.text, adapter, device=device)
    ctx = LayerContext(adapter, lm, lm.position_embeddings(calset.length))
    prefix, layers = exl2_prefix(adapter), adapter.text.num_hidden_layers
    progress.start("quantize", layers * len(SLOTS) + 1)
    resume = resume_or_start(checkpoint, lambda: initial_states(adapter, calset, lm), progress=progress,
                             task="quantize", steps_per_layer=len(SLOTS))  # fmt: skip
    stats, states = QuantStats(**resume.record), resume.states
    for index in range(resume.next_layer, layers):
        weights = layer_weights(lm, index)
        for slot in SLOTS:
            key = f"{prefix}layers.{index}.{slot.mode}"
            configs = slot_configs(strategy, key, slot)
            states = quantize_slot(
                ctx, slot, weights, states, index=index, configs=configs, tensors_dir=tensors_dir, stats=stats
            )
            progress.advance("quantize", layer=index, slot=slot.mode, rel_error=round(stats.slot_errors[key], 6))
            release_memory()
        del weights
        if checkpoint and index + 1 < layers:
            checkpoint.after_layer(index + 1, asdict(stats), states)
    quantize_head(ctx, states, head_bits, tensors_dir, stats)
    progress.advance("quantize", module="lm_head", head_bpw=round(stats.head_bpw, 4))
    progress.finish("quantize", bpw=round(stats.bpw, 4))
    return stats
