"""Measurement: how much each decoder slot's output suffers under every candidate config, once per model.

For each layer and each slot (attention, MLP), the full-precision slot runs over all calibration states while
every linear's input is folded into its Hessian; GPTQ then quantizes each linear once per distinct candidate config,
and every candidate row (the exllamav2 tables in `quantize.candidates`) is scored by the relative error of the
slot's output: accuracy = max(1e-6, 1 - mean over rows of ||y_q - y||_F / ||y||_F). States carry to the next slot
unquantized, as in exllamav2. The result is `measurement.json` in exllamav2's schema, so either tool's measurement
drives the other's optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from calibration import CalibrationSet
from quantize import candidates as cand
from quantize.adapters import ModelAdapter
from quantize.checkpoint import LayerCheckpoint, resume_or_start
from quantize.format import total_bits
from quantize.gptq import HessianAccumulator, PreparedHessian, gptq_quantize, prepare
from quantize.memory import release_memory
from quantize.modeling import LayerwiseLM, check_layer_weights
from quantize.progress import NullProgress, Progress
from quantize.qparams import QParams
from quantize.states import SLOTS, SlotSpec, initial_states, row_chunks, slot_forward, to_state

log = logging.getLogger(__name__)

MIN_ACCURACY = 0.1  # exllamav2 aborts a measurement whose best candidate is worse than this


def exl2_prefix(adapter: ModelAdapter) -> str:
    """exllamav2's module-key prefix for the language model: legacy names, whatever layout the source used."""
    return "language_model.model." if adapter.spec.multimodal else "model."


def exl2_head_key(adapter: ModelAdapter) -> str:
    return "language_model.lm_head" if adapter.spec.multimodal else "lm_head"


@dataclass
class LayerContext:
    """What every slot of one measurement or quantization pass needs."""

    adapter: ModelAdapter
    lm: LayerwiseLM
    rope: tuple[torch.Tensor, torch.Tensor]

    @property
    def cfg(self):
        return self.adapter.text


def layer_weights(lm: LayerwiseLM, index: int) -> dict[str, torch.Tensor]:
    """A layer's weights on the device in the compute dtype, rounded through fp16 first: exllamav2 reads every
    weight as fp16, so measurement and quantization see exactly the values its files are made from. Converted one
    tensor at a time, so the transient copies stay the size of one tensor."""
    source = lm.weights.layer(index)
    check_layer_weights(lm.cfg, source, layer=index)
    weights = {}
    for name in list(source):
        weights[name] = source.pop(name).to(lm.device).half().to(lm.compute_dtype)
    return weights


def capture_hessians(
    ctx: LayerContext, slot: SlotSpec, weights: Mapping[str, torch.Tensor], states: torch.Tensor
) -> tuple[torch.Tensor, dict[str, PreparedHessian]]:
    """Run the full-precision slot over all rows: its outputs (host memory) and a prepared Hessian per input."""
    sources = sorted(set(slot.hessian_of.values()))
    accumulators = {
        name: HessianAccumulator(weights[f"{name}.weight"].shape[1], device=ctx.lm.device) for name in sources
    }

    def capture(name: str, x: torch.Tensor) -> None:
        if name in accumulators:
            accumulators[name].add(x)

    outputs = torch.empty_like(states)
    for rows in row_chunks(states.shape[0], states.shape[1]):
        hidden = states[rows].to(ctx.lm.device, ctx.lm.compute_dtype)
        outputs[rows] = to_state(slot_forward(ctx.cfg, slot, weights, hidden, ctx.rope, capture=capture), states.dtype)
    prepared = {}
    for name in sources:
        # One K x K Hessian alive at a time: the accumulator goes as soon as its factor exists.
        prepared[name] = prepare(accumulators.pop(name).hessian())
    return outputs, prepared


def relative_error(
    ctx: LayerContext,
    slot: SlotSpec,
    weights: Mapping[str, torch.Tensor],
    states: torch.Tensor,
    reference: torch.Tensor,
    *,
    outputs: torch.Tensor | None = None,
) -> float:
    """Mean over rows of ||slot(x; weights) - reference||_F / ||reference||_F; the slot's outputs are also written
    into `outputs` (host memory, the states' dtype) when given, so a caller needing both runs the slot once."""
    total = 0.0
    for rows in row_chunks(states.shape[0], states.shape[1]):
        hidden = states[rows].to(ctx.lm.device, ctx.lm.compute_dtype)
        out = slot_forward(ctx.cfg, slot, weights, hidden, ctx.rope)
        ref = reference[rows].to(out.device, out.dtype)
        total += float(((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)).sum())
        if outputs is not None:
            outputs[rows] = to_state(out, outputs.dtype)
    return total / states.shape[0]


def measure_slot(
    ctx: LayerContext, slot: SlotSpec, weights: dict[str, torch.Tensor], states: torch.Tensor, key: str
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Every candidate row of one slot, scored; and the slot's full-precision outputs (the next slot's input)."""
    reference, hessians = capture_hessians(ctx, slot, weights, states)
    fake: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
    for linear in slot.linears:
        weight, bias = weights[f"{linear}.weight"], weights.get(f"{linear}.bias")
        n_out, k_in = weight.shape
        for qp in cand.distinct_configs(slot.mode, linear.split(".")[-1]):
            _, quantized = gptq_quantize(weight, hessians[slot.hessian_of[linear]], qp, bias=bias)
            bits = total_bits(qp, k_in, n_out, bias_numel=0 if bias is None else bias.numel())
            # ~40 candidates per slot: kept as GPTQ returns them (fp16, exact) and in host memory, not as fp32 on
            # the device: at Pixtral-Large's MLP that is 28 GB of RAM instead of 56 GB of VRAM.
            fake[linear, qp.desc] = (quantized.cpu(), bits)
    entries = []
    for row in cand.candidate_rows(slot.mode):
        trial = dict(weights)
        entry: dict[str, Any] = {"accuracy": 0.0, "total_bits": 0}
        for linear in slot.linears:
            short = linear.split(".")[-1]
            chosen: QParams = row[short]
            stored, bits = fake[linear, chosen.desc]
            trial[f"{linear}.weight"] = stored.to(weights[f"{linear}.weight"].device, weights[f"{linear}.weight"].dtype)
            entry["total_bits"] += bits
            entry[short] = chosen.to_dict()
        entry["accuracy"] = max(1e-6, 1.0 - relative_error(ctx, slot, trial, states, reference))
        entries.append(entry)
    best = max(e["accuracy"] for e in entries)
    if best < MIN_ACCURACY:
        raise ValueError(f"{key}: best candidate accuracy {best:.4f} is below {MIN_ACCURACY}; the layer is unstable")
    return entries, reference


def measure(
    adapter: ModelAdapter,
    calset: CalibrationSet,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    checkpoint: LayerCheckpoint | None = None,
) -> dict[str, Any]:
    """The measurement of every decoder slot, as exllamav2's measurement.json object; with `checkpoint`, resumed
    from its last save and saved after layers as it goes."""
    progress = progress or NullProgress()
    lm = LayerwiseLM(adapter.text, adapter, device=device)
    ctx = LayerContext(adapter, lm, lm.position_embeddings(calset.length))
    prefix = exl2_prefix(adapter)
    layers = adapter.text.num_hidden_layers
    progress.start("measure", layers * len(SLOTS), rows=calset.rows, length=calset.length)
    resume = resume_or_start(checkpoint, lambda: initial_states(adapter, calset, lm), progress=progress,
                             task="measure", steps_per_layer=len(SLOTS))  # fmt: skip
    result, states = resume.record, resume.states
    for index in range(resume.next_layer, layers):
        weights = layer_weights(lm, index)
        for slot in SLOTS:
            key = f"{prefix}layers.{index}.{slot.mode}"
            result[key], states = measure_slot(ctx, slot, weights, states, key)
            best = max(e["accuracy"] for e in result[key])
            progress.advance("measure", layer=index, slot=slot.mode, best_accuracy=round(best, 6))
            release_memory()
        del weights
        if checkpoint and index + 1 < layers:
            checkpoint.after_layer(index + 1, result, states)
    result[f"{prefix}norm.norm"] = None
    result[f"{exl2_head_key(adapter)}.linear"] = None
    progress.finish("measure")
    # exllamav2's module list: embedding, (attention, MLP) per layer, final norm, head.
    return {"measurement": result, "last_module_idx": 2 * layers + 2}
