"""`make bench`: time and peak memory of measurement and of each quant, and the streaming bound.

Three benchmarks, each printing a Markdown table and writing JSON under `bench/results/`:

* `demo`: `make demo`'s recipe (recipes/default.yaml) end to end from an empty cache and work dir (the default
  model built from the SmolLM2 wheel, calibration sets, measurement, three quants, reference, evaluation, report),
  in a child process; the figure the README's "under 10 minutes" rests on.
* `default`: the built-in default model: one measurement, then quants at 3.0, 4.0, 5.0, 6.0 and 8.0 bpw from it,
  each evaluated by the evaluation stage (`pipeline.evaluation`) on held-out text (Python's help topics, which no
  calibration source contains) and on the 16 built-in image prompts.
* `streaming`: a synthetic Llama several times larger than a memory cap is quantized in a child process whose
  resident memory is sampled; the stage's peak growth over the process's start-up must stay under the cap.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval.report import SUMMARY_COLUMNS
from pipeline.resources import MeasureUsage

RESULTS = Path("bench/results")


def bench_default(args: argparse.Namespace) -> dict[str, Any]:
    from eval.config import EvalSpec, ImageEvalSpec, TextEvalSpec
    from pipeline.calibrate import make_spec
    from pipeline.default_model import build_default_model
    from pipeline.evaluation import run_eval
    from pipeline.jobs import run_measure, run_quantize

    model_dir = build_default_model()
    work = Path(args.work) / "default"
    sources = ["exl2-default", "sample-images#weight=0.25,max_edge=128"]
    measure_spec = make_spec(sources, rows=args.rows, length=args.length, seed=0)
    quant_spec = make_spec(sources, rows=args.quant_rows, length=args.length, seed=0)
    measured = run_measure(model_dir, work, measure_spec, force=args.force)
    quants = run_quantize(model_dir, work, args.bpw, quant_spec, force=args.force, command="make bench")
    spec = EvalSpec(text=TextEvalSpec(rows=args.eval_rows, length=args.length),
                    images=ImageEvalSpec(count=16, max_edge=128, max_new_tokens=16), device="cpu")  # fmt: skip
    evaluation = run_eval(model_dir, work, spec, quants=[q.out_dir for q in quants], run_name="bench-default",
                          force=args.force)  # fmt: skip
    usage = {q.name: q.usage.as_dict() for q in quants}
    keep = (*SUMMARY_COLUMNS, "head_bpw", "eval_wall_s")
    rows = []
    for record in evaluation.records:
        row = {k: _rounded(record.get(k)) for k in keep}
        row["size_mib"] = round(record["size_bytes"] / 2**20, 1)
        rows.append({**row, **usage.get(record["quant"], {})})
    from pipeline.estimate import estimate
    from quantize.adapters import load_adapter

    adapter = load_adapter(model_dir)
    guess = {stage: round(estimate(adapter, stage, rows=rows, length=args.length, device="cpu").host / 2**20, 1)
             for stage, rows in (("measure", args.rows), ("quantize", args.quant_rows))}  # fmt: skip
    return {
        "measurement": {"rows": args.rows, "length": args.length, **measured.usage.as_dict(),
                        "estimated_peak_mib": guess["measure"]},
        "quantize_estimated_peak_mib": guess["quantize"],
        "quant_rows": args.quant_rows,
        "eval": {"rows": args.eval_rows, "length": args.length, "text": "pydoc-topics", "image_prompts": 16,
                 "reference_mib": round(evaluation.reference_bytes / 2**20, 2), "report": str(evaluation.report.html)},
        "quants": rows,
    }  # fmt: skip


def _rounded(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value


def bench_demo(args: argparse.Namespace) -> dict[str, Any]:
    """`make demo`'s commands with an empty cache (only the SmolLM2 .gguf copied in) and an empty work dir."""
    import os
    import shutil

    from pipeline.assets import cache_root

    root = Path(args.work).resolve() / "demo"
    shutil.rmtree(root, ignore_errors=True)
    (root / "cache" / "assets").mkdir(parents=True)
    for gguf in (cache_root() / "assets").glob("*.gguf"):
        shutil.copy(gguf, root / "cache" / "assets" / gguf.name)  # the wheel download is an install, not the demo
    env = {**os.environ, "EXL2_CACHE": str(root / "cache")}
    exl2 = [sys.executable, "-m", "pipeline.cli"]
    steps = [[*exl2, "model", "build-default"], [*exl2, "run", "recipes/default.yaml", "-o", str(root / "work")]]
    started = time.perf_counter()
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"demo step {' '.join(cmd[2:])} failed:\n{proc.stderr[-2000:]}")
    run = json.loads((root / "work" / "run.json").read_text())
    return {"wall_s": round(time.perf_counter() - started, 1),
            "stages": {name: info["wall_s"] for name, info in run["stages"].items()}}  # fmt: skip


def bench_streaming(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize a synthetic model of `--stream-layers` layers in a child process under a sampled memory cap."""
    cmd = [sys.executable, "-m", "pipeline.streaming_bench", "--work", str(Path(args.work) / "streaming"),
           "--layers", str(args.stream_layers), "--hidden", str(args.stream_hidden),
           "--cap-mib", str(args.cap_mib)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"streaming benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The report's compact columns, then the cost of each quant.
BENCH_COLUMNS = (*SUMMARY_COLUMNS, "head_bpw", "wall_s", "peak_rss_mib", "eval_wall_s")


def markdown(results: dict[str, Any]) -> str:
    lines = []
    if "demo" in results:
        d = results["demo"]
        stages = ", ".join(f"{k} {v} s" for k, v in d["stages"].items())
        lines += [f"demo (recipes/default.yaml from an empty cache): {d['wall_s']} s ({stages})", ""]
    if "default" in results:
        d = results["default"]
        m = d["measurement"]
        cols = BENCH_COLUMNS
        lines += [
            f"measurement ({m['rows']} rows x {m['length']} tokens): {m['wall_s']} s, peak RSS {m['peak_rss_mib']} MiB "
            f"(estimated {m.get('estimated_peak_mib')}); quants' peak RSS estimated "
            f"{d.get('quantize_estimated_peak_mib')}",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        for r in d["quants"]:
            lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if "streaming" in results:
        s = results["streaming"]
        lines += [
            "",
            f"streaming: model {s['model_mib']} MiB on disk, cap {s['cap_mib']} MiB; quantize stage peak growth "
            f"{s['peak_growth_mib']} MiB over a {s['baseline_mib']} MiB start ({s['wall_s']} s): "
            + ("under the cap" if s["under_cap"] else "OVER THE CAP"),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", help="demo, default, streaming (default: all three)")
    parser.add_argument("--work", default="bench/work")
    parser.add_argument("--rows", type=int, default=16, help="measurement rows")
    parser.add_argument("--quant-rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--bpw", type=lambda s: [float(x) for x in s.split(",")], default=[3.0, 4.0, 5.0, 6.0, 8.0])
    parser.add_argument("--stream-layers", type=int, default=80)
    parser.add_argument("--stream-hidden", type=int, default=1024)
    parser.add_argument("--cap-mib", type=int, default=768)
    parser.add_argument("--force", action="store_true", help="redo stages even when up to date")
    args = parser.parse_args(argv)
    args.which = args.which or ["demo", "default", "streaming"]
    unknown = set(args.which) - {"demo", "default", "streaming"}
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)}; choose demo, default or streaming")
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with MeasureUsage() as usage:
        if "demo" in args.which:
            results["demo"] = bench_demo(args)
        if "default" in args.which:
            results["default"] = bench_default(args)
        if "streaming" in args.which:
            results["streaming"] = bench_streaming(args)
    results["total_wall_s"] = round(usage.wall_s, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {out}")
    return 0 if results.get("streaming", {}).get("under_cap", True) else 1


if __name__ == "__main__":
    sys.exit(main())
