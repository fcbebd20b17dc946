"""The measure and quantize stages over a work directory, with validation first, skipping and provenance.

Work directory layout (one per model and calibration):

    measurement.json          exllamav2's schema; `measurement.meta.json` beside it records its inputs and cost
    quants/<bpw>bpw/          one finished EXL2 folder per target (`_h<bits>` appended for non-default head bits)
    quants/<name>.strategy.json   the optimizer's choice per slot, its expected error and achieved bpw
    quants/.<name>.tensors/   packed linears while a quant is being made (removed after compile)

Every file is written under a temporary name and renamed; a stage whose output is complete and whose inputs
(model, calibration, settings, tool version) are unchanged is skipped, with the reason logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration import CalibrationSpec
from pipeline.calibrate import calibration_for
from pipeline.resources import MeasureUsage, Usage
from quantize.adapters import ModelAdapter, load_adapter
from quantize.checkpoint import DEFAULT_INTERVAL_S, LayerCheckpoint
from quantize.errors import Exl2Error
from quantize.progress import NullProgress, Progress
from quantize.provenance import tool_version
from quantize.qparams import ALLOWED_BITS

log = logging.getLogger(__name__)

MIN_BPW, MAX_BPW = 2.0, 8.0
DEFAULT_HEAD_BITS = 6


class JobError(Exl2Error):
    """A job's settings are invalid, or its inputs do not fit each other."""


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    """A side file's JSON object, or {} when it is missing or unreadable (side files are optional facts)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_fingerprint(adapter: ModelAdapter) -> str:
    """sha256 of config.json and every tensor's name, dtype, shape and shard: cheap, and changes with the weights'
    layout (not their values: hashing a 123B model's bytes would take longer than measuring it)."""
    digest = hashlib.sha256((adapter.model_dir / "config.json").read_bytes())
    for key in sorted(adapter.files.entries):
        e = adapter.files.entries[key]
        digest.update(f"{key}|{e.dtype}|{e.shape}|{e.file.name}|{e.file.stat().st_size}\n".encode())
    return digest.hexdigest()


def validate_targets(bpws: Sequence[float], head_bits: int) -> list[float]:
    """Check targets and head bits before any work starts."""
    if not bpws:
        raise JobError("no bpw target given (e.g. --bpw 3.0,4.0,5.0)")
    for bpw in bpws:
        if not MIN_BPW <= bpw <= MAX_BPW:
            raise JobError(f"target {bpw} bpw is outside {MIN_BPW}..{MAX_BPW}, the range EXL2 configs cover")
    if head_bits not in ALLOWED_BITS:
        raise JobError(f"head bits {head_bits} not allowed; choose one of {', '.join(map(str, ALLOWED_BITS))}")
    return sorted(set(bpws))


def check_model_fits_format(adapter: ModelAdapter) -> None:
    """Refuse, before any work, a model whose linear shapes the EXL2 format cannot hold."""
    from quantize.format import check_writable

    t = adapter.text
    shapes = {linear: (k_in, n_out, t.linear_has_bias(linear)) for linear, (n_out, k_in) in t.linear_shapes().items()}
    shapes["lm_head"] = (t.hidden_size, t.vocab_size, False)
    for name, (k_in, n_out, has_bias) in shapes.items():
        try:
            check_writable(k_in, n_out, has_bias=has_bias)
        except Exl2Error as exc:
            raise JobError(f"{adapter.model_dir}: {name} ({k_in} -> {n_out}) cannot be stored as EXL2: {exc}") from exc


def quant_name(bpw: float, head_bits: int) -> str:
    name = f"{bpw:.1f}bpw" if round(bpw, 1) == bpw else f"{bpw:g}bpw"
    return name if head_bits == DEFAULT_HEAD_BITS else f"{name}_h{head_bits}"


@dataclass
class MeasureResult:
    path: Path
    skipped: bool
    usage: Usage
    calibration_fingerprint: str


def check_resources(adapter: ModelAdapter, stage: str, *, rows: int, length: int, device: str, work_dir: Path,
                    bpw: float = 8.0) -> None:  # fmt: skip
    """Refuse a stage the machine cannot hold, before it starts (pipeline.estimate)."""
    from pipeline.estimate import check, estimate

    need = estimate(adapter, stage, rows=rows, length=length, device=device, bpw=bpw)
    log.info("%s: needs about %.1f GiB RAM, %.1f GiB GPU, %.1f GiB disk", stage, need.host / 2**30,
             need.device / 2**30, need.disk / 2**30)  # fmt: skip
    check(need, device, work_dir)


def _checkpoint(folder: Path, inputs: dict[str, Any], interval_s: float) -> LayerCheckpoint:
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return LayerCheckpoint(folder, key, interval_s=interval_s)


def run_measure(
    model_dir: Path,
    work_dir: Path,
    spec: CalibrationSpec,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
    checkpoint_interval_s: float = DEFAULT_INTERVAL_S,
    resource_check: bool = True,
) -> MeasureResult:
    """Measure once per (model, calibration): writes work_dir/measurement.json unless it is already there. An
    interrupted measurement resumes from its last checkpoint (work_dir/.measurement.checkpoint/)."""
    from quantize.measure import measure

    adapter = load_adapter(model_dir)
    check_model_fits_format(adapter)
    work_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = work_dir / "measurement.json", work_dir / "measurement.meta.json"
    calset = calibration_for(model_dir, spec, cache_dir=cache_dir)
    inputs = {"model": model_fingerprint(adapter), "calibration": calset.fingerprint, "tool_version": tool_version()}
    if not force and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("inputs") == inputs:
            log.info("measurement: %s is up to date (same model, calibration and tool version); skipped", path)
            return MeasureResult(path, True, Usage(**meta.get("usage_raw", {})), calset.fingerprint)
    if resource_check:
        check_resources(adapter, "measure", rows=spec.rows, length=spec.length, device=device, work_dir=work_dir)
    checkpoint = _checkpoint(work_dir / ".measurement.checkpoint", inputs, checkpoint_interval_s)
    if force:
        checkpoint.clear()
    resumed = checkpoint.matches()  # then the time and memory below are those of the resumed part only
    with MeasureUsage() as usage:
        measurement = measure(
            adapter, calset, device=device, progress=progress or NullProgress(), checkpoint=checkpoint
        )
    write_json(path, measurement)
    meta = {
        "inputs": inputs,
        "model_dir": str(model_dir),
        "calibration": {"fingerprint": calset.fingerprint, **calset.summary()},
        "device": str(device),
        "resumed": resumed,
        "usage": usage.as_dict(),
        "usage_raw": usage.__dict__,
    }
    write_json(meta_path, meta)
    checkpoint.clear()
    log.info("measurement: %s written in %.1f s", path, usage.wall_s)
    return MeasureResult(path, False, usage, calset.fingerprint)


@dataclass
class QuantResult:
    name: str
    target_bpw: float
    bpw: float
    head_bits: int
    head_bpw: float
    out_dir: Path
    size_bytes: int
    skipped: bool
    usage: Usage
    expected_max_error: float | None = None


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def run_quantize(
    model_dir: Path,
    work_dir: Path,
    targets: Sequence[float],
    spec: CalibrationSpec,
    *,
    head_bits: int = DEFAULT_HEAD_BITS,
    measurement_path: Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    shard_size_mb: float = 8192,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    command: str = "",
    force: bool = False,
    checkpoint_interval_s: float = DEFAULT_INTERVAL_S,
    resource_check: bool = True,
) -> list[QuantResult]:
    """One EXL2 folder per target bpw under work_dir/quants/, all from one measurement (no new measurement)."""
    from quantize.optimize import load_measurement, optimize_many, slots_from_measurement

    targets = validate_targets(targets, head_bits)
    adapter = load_adapter(model_dir)
    check_model_fits_format(adapter)
    if resource_check:
        check_resources(adapter, "quantize", rows=spec.rows, length=spec.length, device=device, work_dir=work_dir,
                        bpw=max(targets))  # fmt: skip
    measurement_path = measurement_path or work_dir / "measurement.json"
    measurement = load_measurement(measurement_path)
    slots = slots_from_measurement(measurement, slot_numel(adapter), source=str(measurement_path))
    strategies = dict(zip(targets, optimize_many(slots, targets, seed=seed), strict=True))
    calset = calibration_for(model_dir, spec, cache_dir=cache_dir)
    quants = work_dir / "quants"
    quants.mkdir(parents=True, exist_ok=True)
    inputs = {
        "model": model_fingerprint(adapter),
        "calibration": calset.fingerprint,
        "measurement_sha256": hashlib.sha256(measurement_path.read_bytes()).hexdigest(),
        "head_bits": head_bits,
        "seed": seed,
        "tool_version": tool_version(),
    }
    results = []
    for target in targets:
        strategy = strategies[target]
        name = quant_name(target, head_bits)
        results.append(
            _quantize_one(
                adapter, calset, strategy, quants, name,
                inputs={**inputs, "target_bpw": target},
                head_bits=head_bits, device=device, shard_size_mb=shard_size_mb,
                progress=progress or NullProgress(), command=command, force=force,
                checkpoint_interval_s=checkpoint_interval_s,
            )
        )  # fmt: skip
    return results


def slot_numel(adapter: ModelAdapter) -> dict[str, int]:
    """Σ K·N_padded of each slot's linears, keyed like measurement.json: what exllamav2's bpw budget counts."""
    from quantize.candidates import attn_shapes, mlp_shapes
    from quantize.measure import exl2_prefix
    from quantize.optimize import numel_per_slot

    t = adapter.text
    attn = attn_shapes(t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim)
    mlp = mlp_shapes(t.hidden_size, t.intermediate_size)
    return numel_per_slot(exl2_prefix(adapter), t.num_hidden_layers, attn, mlp)


def _quantize_one(
    adapter: ModelAdapter,
    calset: Any,
    strategy: Any,
    quants: Path,
    name: str,
    *,
    inputs: dict[str, Any],
    head_bits: int,
    device: str,
    shard_size_mb: float,
    progress: Progress,
    command: str,
    force: bool,
    checkpoint_interval_s: float,
) -> QuantResult:
    from quantize.compile import compile_quant, is_complete
    from quantize.quant_pass import quantize_model

    out_dir, tensors_dir = quants / name, quants / f".{name}.tensors"
    strategy_path = quants / f"{name}.strategy.json"
    marker = out_dir / "EXL2_COMPLETE.json"
    if not force and is_complete(out_dir) and strategy_path.exists():
        saved = json.loads(strategy_path.read_text())
        if saved.get("inputs") == inputs:
            log.info("quant %s: up to date (same model, calibration, measurement and settings); skipped", name)
            return _result_from_disk(out_dir, saved, marker)
    write_json(strategy_path, {"inputs": inputs, "strategy": strategy.to_json()})
    checkpoint = _checkpoint(quants / f".{name}.checkpoint", {**inputs, "strategy": strategy.to_json()},
                             checkpoint_interval_s)  # fmt: skip
    resumed = not force and checkpoint.matches()  # then the time and memory recorded are the resumed part's
    if not resumed:
        # A fresh start: packed linears of an earlier, different attempt must not be compiled into this quant.
        checkpoint.clear()
        remove_tree(tensors_dir)
    started = time.perf_counter()
    with MeasureUsage() as usage:
        stats = quantize_model(
            adapter, calset, strategy.to_json()["strategy"], head_bits=head_bits, tensors_dir=tensors_dir,
            device=device, progress=progress, checkpoint=checkpoint,
        )  # fmt: skip
        quantization_config = {
            "bits": inputs["target_bpw"],
            "head_bits": head_bits,
            "calibration": {"rows": calset.rows, "length": calset.length, "dataset": _dataset_label(calset)},
        }
        provenance = {
            "command": command,
            "calibration_fingerprint": calset.fingerprint,
            "measurement_sha256": inputs["measurement_sha256"],
            "seed": inputs["seed"],
            "target_bpw": inputs["target_bpw"],
            "achieved_bpw": round(stats.bpw, 4),
            "head_bpw": round(stats.head_bpw, 4),
            "expected_max_error": strategy.max_err,
            # The quantize pass so far (compile adds its own time); the measurement's cost is in its meta file.
            "quantize_seconds": round(time.perf_counter() - started, 2),
            "quantize_peak_rss_bytes": usage.peak_rss_bytes,
            "device": device,
            "resumed": resumed,
        }
        result = compile_quant(
            adapter, tensors_dir, out_dir, quantization_config=quantization_config, provenance=provenance,
            shard_size_mb=shard_size_mb, overwrite=True,
        )  # fmt: skip
    remove_tree(tensors_dir)
    checkpoint.clear()
    summary = {
        "name": name, "target_bpw": inputs["target_bpw"], "bpw": stats.bpw, "head_bits": head_bits,
        "head_bpw": stats.head_bpw, "size_bytes": result.total_bytes, "usage": usage.__dict__,
        "slot_errors": stats.slot_errors, "expected_max_error": strategy.max_err,
    }  # fmt: skip
    write_json(quants / f"{name}.result.json", summary)
    log.info("quant %s: %.3f bpw (target %.2f), head %.2f bpw, %.1f s", name, stats.bpw, inputs["target_bpw"],
             stats.head_bpw, usage.wall_s)  # fmt: skip
    return QuantResult(
        name,
        inputs["target_bpw"],
        stats.bpw,
        head_bits,
        stats.head_bpw,
        out_dir,
        result.total_bytes,
        False,
        usage,
        strategy.max_err,
    )


def _dataset_label(calset: Any) -> str:
    labels = [s.label for s in calset.spec.sources]
    return "(default)" if labels == ["exl2-default"] else ", ".join(labels)


def _result_from_disk(out_dir: Path, saved: dict[str, Any], marker: Path) -> QuantResult:
    summary = json.loads((out_dir.parent / f"{out_dir.name}.result.json").read_text())
    return QuantResult(
        summary["name"], summary["target_bpw"], summary["bpw"], summary["head_bits"], summary["head_bpw"], out_dir,
        summary["size_bytes"], True, Usage(**summary["usage"]), summary.get("expected_max_error"),
    )  # fmt: skip
