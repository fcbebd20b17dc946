"""What a measure or quantize stage will need (host RAM, GPU memory, disk), before it starts, and a refusal when
the machine has less.

The figures follow the passes' own buffers (`quantize.measure`, `quantize.quant_pass`), from the model's shapes:

* states: rows × length × hidden, fp32 (fp16 above 8 GiB), in host memory; measurement holds 2 copies (input and
  the full-precision output), the quantize pass 3 (input, full-precision reference, quantized output).
* one decoder layer's weights in fp32, on the compute device, with the transient fp16 copy of its largest tensor.
* Hessians: a K×K fp32 matrix per distinct linear input of a slot and its Cholesky factors (×3), plus GPTQ's
  working copies of the largest linear (×4), on the compute device.
* measurement only: every candidate's fp16 fake-quant weight of the widest slot, in host memory.
* activations of one ~8k-token row chunk through the widest linear (×4), on the compute device.
* the embedding table read and cast once to build the first states (fp16 + fp32); the quantize pass also runs GPTQ
  on the head (vocab × hidden, its Hessian and working copies), often the largest linear of all.
* half as much again of the stage's memory for the allocator's caching and fragmentation (fitted on the default
  model, whose measured peaks it must stay above).
* disk: the quant's packed linears twice (per-linear files, then the shards), its fp16 embeddings/norms and
  copied vision tensors, and a checkpoint copy of the states.

What the stage adds is counted, plus `BASE_BYTES` for the interpreter, torch, transformers, the tokenizer, the
calibration set and the vision tower built for image rows (measured: 0.41 GiB before the vision tower). The
benchmark (`python -m pipeline.bench default`) prints the estimate beside the measured peaks.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from quantize.adapters import ModelAdapter, Role
from quantize.errors import Exl2Error
from quantize.states import FP32_STATES_LIMIT, SLOTS

BASE_BYTES = 512 * 2**20
ALLOCATOR_MARGIN = 1.5
GIB = 2**30


class ResourceError(Exl2Error):
    """The machine has less memory or disk than a stage needs."""


@dataclass
class Need:
    """Bytes a stage needs: host RAM, device (GPU) memory, disk; `parts` says where they come from."""

    stage: str
    host: int = 0
    device: int = 0
    disk: int = 0
    parts: dict[str, int] = field(default_factory=dict)

    def add(self, where: str, name: str, size: int) -> None:
        setattr(self, where, getattr(self, where) + int(size))
        self.parts[f"{where}: {name}"] = int(size)


def _states_bytes(adapter: ModelAdapter, rows: int, length: int) -> int:
    fp32 = rows * length * adapter.text.hidden_size * 4
    return fp32 if fp32 <= FP32_STATES_LIMIT else fp32 // 2


def _linear_shapes(adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    return adapter.text.linear_shapes()  # name -> (out, in)


def _fake_bytes(adapter: ModelAdapter) -> int:
    """fp16 fake-quants of every distinct candidate config of the widest slot (what measurement keeps)."""
    from quantize.candidates import distinct_configs

    shapes = _linear_shapes(adapter)
    per_slot = []
    for slot in SLOTS:
        total = 0
        for linear in slot.linears:
            n_out, k_in = shapes[linear]
            total += len(distinct_configs(slot.mode, linear.split(".")[-1])) * n_out * k_in * 2
        per_slot.append(total)
    return max(per_slot)


def _hessian_bytes(adapter: ModelAdapter) -> int:
    shapes = _linear_shapes(adapter)
    worst = 0
    for slot in SLOTS:
        inputs = {shapes[source][1] for source in set(slot.hessian_of.values())}
        worst = max(worst, sum(k * k * 4 * 3 for k in inputs))
    return worst


def estimate(adapter: ModelAdapter, stage: str, *, rows: int, length: int, device: str, bpw: float = 8.0) -> Need:
    """What `stage` ("measure" or "quantize", at target `bpw` for the disk) needs on this model (see above).

    The states stay for the whole stage; the phases (building the first states, one decoder layer, the head) come
    one after another, so the largest of them is added, not their sum.
    """
    text = adapter.text
    shapes = _linear_shapes(adapter)
    need = Need(stage)
    states = _states_bytes(adapter, rows, length)
    copies = 2 if stage == "measure" else 3
    need.add("host", "runtime", BASE_BYTES)
    need.add("host", f"calibration states x{copies}", states * copies)
    compute = "device" if device.startswith("cuda") else "host"
    layer = sum(n * k for n, k in shapes.values())
    largest = max(n * k for n, k in shapes.values())
    chunk = max(1, 8192 // max(length, 1)) * length
    table = text.vocab_size * text.hidden_size
    layer_phase = {
        "one layer's weights (fp32)": layer * 4 + largest * 2,
        "Hessians and factors": _hessian_bytes(adapter),
        "GPTQ working copies": largest * 4 * 4,
        "activations of a row chunk": chunk * max(text.intermediate_size, text.hidden_size) * 4 * 4,
    }
    phases = {"embedding table for the first states": table * 6, "a decoder layer": sum(layer_phase.values())}
    if stage == "quantize":
        phases["head GPTQ (weight, copies, Hessian)"] = table * 18 + text.hidden_size**2 * 12
    peak_phase = max(phases, key=lambda name: phases[name])
    need.add(compute, f"largest phase: {peak_phase}", phases[peak_phase])
    if stage == "measure":  # the candidates live in host memory during the layer phase
        need.add("host", "candidate weights (fp16)", _fake_bytes(adapter))
    for where in ("host", "device"):
        stage_bytes = getattr(need, where) - (BASE_BYTES if where == "host" else 0)
        if stage_bytes:
            need.add(where, "allocator margin", int(stage_bytes * (ALLOCATOR_MARGIN - 1)))
    need.add("disk", "calibration-state checkpoint", states)
    if stage == "quantize":
        packed = int(text.num_hidden_layers * layer * bpw / 8)
        kept = sum(adapter.entry(k).numel * 2 for k in adapter.keys_with_role(Role.EMBEDDING, Role.NORM))
        vision = sum(adapter.entry(k).nbytes for k in adapter.keys_with_role(Role.VISION, Role.PROJECTOR))
        need.add("disk", "packed linears and head (working files, then shards)", 2 * packed + 2 * table)
        need.add("disk", "fp16 embeddings and norms, vision tensors", kept + vision)
    return need


@dataclass
class Available:
    host: int
    device: int | None
    disk: int


def available(device: str, work_dir: Path) -> Available:
    """Free RAM, free memory of the CUDA device (None on the CPU), free disk where work_dir is."""
    free_device = None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        free_device = torch.cuda.mem_get_info(index)[0]
    folder = work_dir if work_dir.exists() else next((p for p in work_dir.parents if p.exists()), Path("."))
    return Available(psutil.virtual_memory().available, free_device, shutil.disk_usage(folder).free)


def shortfalls(need: Need, have: Available) -> list[str]:
    """What the machine lacks for `need`, one phrase each (empty when it fits)."""
    out = []
    if need.host > have.host:
        out.append(f"{need.host / GIB:.1f} GiB of RAM ({have.host / GIB:.1f} GiB available)")
    if have.device is not None and need.device > have.device:
        out.append(f"{need.device / GIB:.1f} GiB of GPU memory ({have.device / GIB:.1f} GiB free)")
    if need.disk > have.disk:
        out.append(f"{need.disk / GIB:.1f} GiB of disk ({have.disk / GIB:.1f} GiB free)")
    return out


def check(need: Need, device: str, work_dir: Path) -> None:
    """Refuse (ResourceError, one line with the remedy) a stage the machine cannot hold."""
    lacking = shortfalls(need, available(device, work_dir))
    if lacking:
        raise ResourceError(
            f"{need.stage} needs about {'; '.join(lacking)}: lower --rows or --length, free memory or disk, "
            "or pass --no-resource-check to try anyway"
        )
