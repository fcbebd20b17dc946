"""The evaluation stage over a work directory: the reference once, every quant against it, then the report.

    <cache>/reference/<key>/      the full-precision reference (content-addressed, shared by every work dir)
    work_dir/eval/reference.json  the reference's own report row
    work_dir/eval/<quant>.json    one quant's report row, the inputs it was computed from, and its folder
    work_dir/report/              report.csv, report.md, report.html

A quant whose eval file records the same reference key, the same quant folder (its completion marker's hash),
engine and tool/metrics versions is not evaluated again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.config import EvalSpec
from eval.engine import EvalEngine
from eval.evaluate import EvalInputs, Reference, build_inputs, score_model
from eval.metrics import METRICS_VERSION
from pipeline.assets import cache_root
from pipeline.jobs import model_fingerprint, read_json, write_json
from pipeline.resources import MeasureUsage, Usage
from quantize.adapters import ModelAdapter, Role, load_adapter
from quantize.errors import EvalError
from quantize.progress import NullProgress, Progress
from quantize.provenance import tool_version

log = logging.getLogger(__name__)

REFERENCE_NAME = "full-precision"


@dataclass
class EvalRun:
    records: list[dict[str, Any]]
    reference_dir: Path
    reference_bytes: int
    reference_cached: bool
    report: Any  # eval.report.ReportFiles
    frame: Any = None  # the report's DataFrame: every quant of the work dir, not only this call's records


def complete_quants(work_dir: Path) -> list[Path]:
    """Every finished quant folder under work_dir/quants, lowest bpw first."""
    from quantize.compile import is_complete

    folder = work_dir / "quants"
    found = [p for p in folder.iterdir() if p.is_dir() and is_complete(p)] if folder.is_dir() else []
    return sorted(found, key=lambda p: (_quant_config(p).get("bits", 0), p.name))


def _quant_config(quant_dir: Path) -> dict[str, Any]:
    return read_json(quant_dir / "config.json").get("quantization_config", {})


def _provenance(quant_dir: Path) -> dict[str, Any]:
    return read_json(quant_dir / "config.json").get("exl2_vlm", {})


def calibration_rows(work_dir: Path, quants: Sequence[Path], *, cache_dir: Path) -> list[torch.Tensor]:
    """The token rows of every calibration set the work dir's measurement and quants used (from the calibration
    cache, by fingerprint), for the overlap check. A set no longer cached is logged and left out."""
    from safetensors.torch import load_file

    from calibration.build import cache_path

    fingerprints = {read_json(work_dir / "measurement.meta.json").get("inputs", {}).get("calibration")}
    fingerprints |= {_provenance(q).get("calibration_fingerprint") for q in quants}
    rows = []
    for fp in sorted(f for f in fingerprints if f):
        path = cache_path(cache_dir, fp)
        if not path.is_file():
            log.warning("calibration set %s is no longer cached (%s): evaluation text is not checked against it",
                        fp[:12], path)  # fmt: skip
            continue
        rows.append(load_file(str(path))["input_ids"])
    return rows


def _auto_resident(adapter: ModelAdapter, device: str) -> bool:
    """Keep weights resident when the language model in float32 takes under a third of the free memory."""
    import psutil

    need = 4 * sum(adapter.entry(k).numel for k in _lm_keys(adapter))
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else psutil.virtual_memory().available
    resident = need < free / 3
    if not resident:
        log.info("evaluation: %.1f GiB of weights vs %.1f GiB free on %s: streaming layers from disk",
                 need / 2**30, free / 2**30, device)  # fmt: skip
    return resident


def _check_quant_dirs(quants: Sequence[Path]) -> None:
    from quantize.compile import is_complete

    for quant_dir in quants:
        if not is_complete(quant_dir):
            what = (
                "does not exist" if not quant_dir.exists() else "is not a finished EXL2 folder (no EXL2_COMPLETE.json)"
            )
            raise EvalError(f"{quant_dir}: {what}")


def _lm_keys(adapter: ModelAdapter) -> list[str]:
    return adapter.keys_with_role(Role.LINEAR, Role.LINEAR_BIAS, Role.NORM, Role.EMBEDDING, Role.HEAD)


def engine_factory(
    spec: EvalSpec, *, device: str, resident: bool, max_seq_len: int = 4096
) -> Callable[[Path], EvalEngine]:
    """How to load a quant folder as the evaluation engine `spec.engine` names; exllamav2 sizes its buffers for
    `max_seq_len` (the longest evaluation sequence, answers included)."""
    if spec.engine == "exllamav2":
        from eval.exllamav2_engine import load_exllamav2_engine

        return lambda quant_dir: load_exllamav2_engine(quant_dir, max_seq_len=max_seq_len)
    from eval.torch_engine import quant_engine

    return lambda quant_dir: quant_engine(quant_dir, device=device, resident=resident)


def run_eval(
    model_dir: Path,
    work_dir: Path,
    spec: EvalSpec,
    *,
    quants: Sequence[Path] | None = None,
    run_name: str | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    vqa_base_dir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> EvalRun:
    """Evaluate the full-precision model and every quant (default: all finished ones in work_dir) and write the
    report. Returns the records (one per model) and where the report went."""
    from eval.reference_cache import cached_reference
    from eval.report import report_frame, write_report
    from eval.torch_engine import source_engine

    progress = progress or NullProgress()
    if spec.engine == "exllamav2":  # refuse before the reference is computed, not after
        from quantize.engines import import_exllamav2

        import_exllamav2(purpose="exl2 eval --engine exllamav2")
    cache = cache_dir or cache_root()
    quants = list(quants) if quants is not None else complete_quants(work_dir)
    _check_quant_dirs(quants)  # before the reference, which can take hours on a large model
    adapter = load_adapter(model_dir)
    resident = _auto_resident(adapter, device)
    inputs = build_inputs(
        model_dir, spec, calibration_rows=calibration_rows(work_dir, quants, cache_dir=cache), vqa_base_dir=vqa_base_dir
    )
    key = inputs.fingerprint(model_fingerprint(adapter))
    context = _RunContext(run_name or work_dir.name, model_dir, work_dir, spec, key)
    with MeasureUsage() as usage:
        reference, cached, size = cached_reference(
            lambda: source_engine(model_dir, device=device, resident=resident),
            inputs,
            key=key,
            cache_dir=cache,
            progress=progress,
        )
    ref_record = context.reference_record(adapter, reference, usage, cached=cached, cache_bytes=size)
    write_json(_eval_dir(work_dir) / "reference.json", {"inputs": {"reference": key}, "record": ref_record})
    make_engine = engine_factory(spec, device=device, resident=resident, max_seq_len=_longest(inputs))
    records = [ref_record]
    for quant_dir in quants:
        records.append(context.quant_record(quant_dir, inputs, reference, make_engine, force=force, progress=progress))
    # The report covers every quant of the work dir scored against this same reference, not only this call's.
    frame = report_frame(load_records(work_dir, reference_key=key))
    files = write_report(frame, work_dir / "report", title=f"{context.run}: {model_dir.name} EXL2 quants")
    from eval.reference_cache import reference_dir

    return EvalRun(records, reference_dir(cache, key), size, cached, files, frame)


def _longest(inputs: EvalInputs) -> int:
    """The longest sequence any engine will see: a text window, or a prompt with its longest answer."""
    lengths = [int(inputs.text.shape[1])] if inputs.text is not None else []
    answer = inputs.spec.images.max_new_tokens if inputs.spec.images else 0
    lengths += [len(p.sequence) + answer for p in inputs.images]
    lengths += [len(s) + v.max_new_tokens for v in inputs.vqa for s in v.sequences]
    return max(lengths, default=256)


def _eval_dir(work_dir: Path) -> Path:
    path = work_dir / "eval"
    path.mkdir(parents=True, exist_ok=True)
    return path


def marker_hash(quant_dir: Path) -> str:
    """sha256 of a quant folder's completion marker ("" without one): what an eval row records it was scored on."""
    marker = quant_dir / "EXL2_COMPLETE.json"
    return hashlib.sha256(marker.read_bytes()).hexdigest() if marker.is_file() else ""


def _mib(value: float | int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


@dataclass
class _RunContext:
    run: str
    model_dir: Path
    work_dir: Path
    spec: EvalSpec
    key: str

    def common(self, usage: Usage) -> dict[str, Any]:
        return {
            "run": self.run,
            "model": self.model_dir.name,
            "engine": self.spec.engine,
            "eval_wall_s": round(usage.wall_s, 2),
            "eval_peak_rss_mib": _mib(usage.peak_rss_bytes),
            "eval_text": f"{t.source} ({t.rows}x{t.length})" if (t := self.spec.text) else None,
            "tool_version": tool_version(),
            "metrics_version": METRICS_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def reference_record(
        self, adapter: ModelAdapter, reference: Reference, usage: Usage, *, cached: bool, cache_bytes: int
    ) -> dict[str, Any]:
        dtypes = {adapter.entry(k).dtype for k in _lm_keys(adapter)}
        bits = max((_DTYPE_BITS.get(str(d), 16) for d in dtypes), default=16)
        size = sum(f.stat().st_size for f in adapter.model_dir.glob("*.safetensors"))
        return {
            **self.common(usage), "engine": "torch", "quant": REFERENCE_NAME, "is_reference": True,
            "bpw": float(bits), "size_bytes": size, **reference.metrics,
            "reference_cache_mib": round(cache_bytes / 2**20, 2),
        }  # fmt: skip

    def quant_record(
        self,
        quant_dir: Path,
        inputs: EvalInputs,
        reference: Reference,
        make_engine: Callable[[Path], EvalEngine],
        *,
        force: bool,
        progress: Progress,
    ) -> dict[str, Any]:
        path = _eval_dir(self.work_dir) / f"{quant_dir.name}.json"
        stamp = {
            "reference": self.key,
            "quant": marker_hash(quant_dir),
            "engine": self.spec.engine,
            "metrics_version": METRICS_VERSION,
            "tool_version": tool_version(),
        }
        saved = read_json(path)
        if not force and saved.get("inputs") == stamp:
            log.info("eval %s: up to date (same reference, quant, engine and versions); skipped", quant_dir.name)
            return saved["record"]
        with MeasureUsage() as usage:
            engine = make_engine(quant_dir)
            try:
                metrics = score_model(engine, inputs, reference, progress=progress, task=f"eval {quant_dir.name}")
            finally:
                engine.close()
        record = {**self.common(usage), **self.quant_facts(quant_dir), **metrics}
        write_json(path, {"inputs": stamp, "record": record, "quant_dir": str(quant_dir.resolve())})
        log.info("eval %s: KL %.4f, ppl %.3f, %.1f s", quant_dir.name, record.get("kl_mean", float("nan")),
                 record.get("ppl", float("nan")), usage.wall_s)  # fmt: skip
        return record

    def quant_facts(self, quant_dir: Path) -> dict[str, Any]:
        """What the quant folder and its side files say about it: bpw, head, size, calibration, cost."""
        qc, prov = _quant_config(quant_dir), _provenance(quant_dir)
        if not qc:
            raise EvalError(f"{quant_dir}: config.json has no quantization_config; not an EXL2 quant folder")
        result = read_json(quant_dir.parent / f"{quant_dir.name}.result.json")
        marker = read_json(quant_dir / "EXL2_COMPLETE.json")
        measured = read_json(self.work_dir / "measurement.meta.json").get("usage", {})
        usage = result.get("usage", {})
        return {
            "quant": quant_dir.name, "is_reference": False, "target_bpw": qc.get("bits"),
            "bpw": prov.get("achieved_bpw", result.get("bpw")), "head_bits": qc.get("head_bits"),
            "head_bpw": prov.get("head_bpw", result.get("head_bpw")),
            "size_bytes": marker.get("total_bytes", result.get("size_bytes")),
            "calibration": qc.get("calibration", {}).get("dataset"),
            "calibration_hash": prov.get("calibration_fingerprint"),
            "measurement_wall_s": measured.get("wall_s"),
            "quant_wall_s": round(usage["wall_s"], 2) if "wall_s" in usage else prov.get("quantize_seconds"),
            "quant_peak_rss_mib": _mib(usage.get("peak_rss_bytes", prov.get("quantize_peak_rss_bytes"))),
        }  # fmt: skip


_DTYPE_BITS = {"F32": 32, "F16": 16, "BF16": 16, "float32": 32, "float16": 16, "bfloat16": 16}


def load_records(work_dir: Path, *, reference_key: str | None = None) -> list[dict[str, Any]]:
    """The report rows saved by evaluations of this work dir: the reference first, then every quant scored
    against that reference (the last one evaluated, or `reference_key`) whose folder is still as it was scored."""
    folder = work_dir / "eval"
    saved_reference = read_json(folder / "reference.json")
    reference = saved_reference.get("record")
    if reference is None:
        raise EvalError(f"{folder / 'reference.json'}: missing; run `exl2 eval` on this work dir first")
    key = reference_key or saved_reference.get("inputs", {}).get("reference")
    quants = []
    for path in sorted(folder.glob("*.json")):
        saved = read_json(path)
        if path.name == "reference.json" or "record" not in saved:
            continue
        # The work dir's own quant when it has one (work dirs may be moved or copied); otherwise the folder the
        # eval file recorded (`exl2 eval -q DIR` on a quant elsewhere).
        own = work_dir / "quants" / path.stem
        quant_dir = own if own.is_dir() else Path(saved.get("quant_dir") or own)
        stamp = saved.get("inputs", {})
        if stamp.get("reference") == key and stamp.get("quant") == marker_hash(quant_dir):
            quants.append(saved["record"])
        else:
            log.info("report: %s left out (scored against another reference, or its quant changed since)", path.name)
    return [reference, *quants]


def rebuild_report(work_dir: Path, *, title: str | None = None) -> Any:
    """Write work_dir/report/ again from the saved eval rows (no model is run)."""
    from eval.report import report_frame, write_report

    frame = report_frame(load_records(work_dir))
    return frame, write_report(frame, work_dir / "report", title=title or f"{work_dir.name}: EXL2 quants")
