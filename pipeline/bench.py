"""`make bench`: time and peak memory of measurement and of each quant, and the streaming bound.

Two benchmarks, each printing a Markdown table and writing JSON under `bench/results/`:

* `default`: the built-in default model: one measurement, then quants at 3.0, 4.0, 5.0, 6.0 and 8.0 bpw from it,
  each evaluated against the full-precision model on held-out text (Python's help topics, which no calibration
  source contains): KL divergence KL(P_fp || P_quant) per token, mean over tokens, and perplexity.
* `streaming`: a synthetic Llama several times larger than a memory cap is quantized in a child process whose
  resident memory is sampled; the stage's peak growth over the process's start-up must stay under the cap.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.resources import MeasureUsage

RESULTS = Path("bench/results")


def held_out_ids(tokenizer: Any, *, rows: int, length: int) -> torch.Tensor:
    """Windows of Python's help topics (never used for calibration), tokenized without special tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < rows * length:
        raise ValueError(f"held-out text has {len(ids)} tokens; {rows} x {length} needed")
    return torch.tensor(ids[: rows * length]).view(rows, length)


@torch.no_grad()
def kl_and_ppl(reference: Any, candidate: Any, ids: torch.Tensor, *, chunk: int = 2) -> tuple[float, float, float]:
    """Mean KL(P_ref || P_cand) per predicted token, and the perplexity of each, over rows of `ids`."""
    kl_sum, nll_ref, nll_cand, count = 0.0, 0.0, 0.0, 0
    for start in range(0, ids.shape[0], chunk):
        rows = ids[start : start + chunk]
        p = torch.log_softmax(reference(rows)[:, :-1].float(), -1)
        q = torch.log_softmax(candidate(rows)[:, :-1].float(), -1)
        target = rows[:, 1:].unsqueeze(-1)
        kl_sum += float((p.exp() * (p - q)).sum(-1).sum())
        nll_ref -= float(p.gather(-1, target).sum())
        nll_cand -= float(q.gather(-1, target).sum())
        count += target.numel()
    return kl_sum / count, math.exp(nll_ref / count), math.exp(nll_cand / count)


def bench_default(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.calibrate import load_tokenizer, make_spec
    from pipeline.default_model import build_default_model
    from pipeline.jobs import run_measure, run_quantize
    from quantize.adapters import load_adapter
    from quantize.exl2_model import Exl2Weights
    from quantize.modeling import LayerwiseLM

    model_dir = build_default_model()
    work = Path(args.work) / "default"
    sources = ["exl2-default", "sample-images#weight=0.25,max_edge=128"]
    measure_spec = make_spec(sources, rows=args.rows, length=args.length, seed=0)
    quant_spec = make_spec(sources, rows=args.quant_rows, length=args.length, seed=0)
    measured = run_measure(model_dir, work, measure_spec, force=args.force)
    quants = run_quantize(model_dir, work, args.bpw, quant_spec, force=args.force, command="make bench")
    adapter = load_adapter(model_dir)
    ids = held_out_ids(load_tokenizer(model_dir), rows=args.eval_rows, length=args.length)
    reference = LayerwiseLM(adapter.text, adapter)
    rows = []
    for q in quants:
        weights = Exl2Weights(q.out_dir)
        kl, ppl_fp, ppl_q = kl_and_ppl(reference, LayerwiseLM(weights.text, weights), ids)
        rows.append({"quant": q.name, "bpw": round(q.bpw, 3), "head_bpw": round(q.head_bpw, 3),
                     "size_mib": round(q.size_bytes / 2**20, 1), "kl": round(kl, 5), "ppl": round(ppl_q, 3),
                     "ppl_fp": round(ppl_fp, 3), **q.usage.as_dict()})  # fmt: skip
    return {
        "measurement": {"rows": args.rows, "length": args.length, **measured.usage.as_dict()},
        "quant_rows": args.quant_rows,
        "eval": {"rows": args.eval_rows, "length": args.length, "text": "pydoc_data.topics"},
        "quants": rows,
    }


def bench_streaming(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize a synthetic model of `--stream-layers` layers in a child process under a sampled memory cap."""
    cmd = [sys.executable, "-m", "pipeline.streaming_bench", "--work", str(Path(args.work) / "streaming"),
           "--layers", str(args.stream_layers), "--hidden", str(args.stream_hidden),
           "--cap-mib", str(args.cap_mib)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"streaming benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: dict[str, Any]) -> str:
    lines = []
    if "default" in results:
        d = results["default"]
        m = d["measurement"]
        lines += [
            f"measurement ({m['rows']} rows x {m['length']} tokens): {m['wall_s']} s, peak RSS {m['peak_rss_mib']} MiB",
            "",
            "| quant | bpw | head bpw | size MiB | KL vs fp | ppl (fp " + str(d["quants"][0]["ppl_fp"]) + ") | "
            "quant time s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in d["quants"]:
            lines.append(f"| {r['quant']} | {r['bpw']} | {r['head_bpw']} | {r['size_mib']} | {r['kl']} | {r['ppl']} | "
                         f"{r['wall_s']} | {r['peak_rss_mib']} |")  # fmt: skip
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
    parser.add_argument("which", nargs="*", help="default, streaming (default: both)")
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
    args.which = args.which or ["default", "streaming"]
    unknown = set(args.which) - {"default", "streaming"}
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)}; choose default or streaming")
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with MeasureUsage() as usage:
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
