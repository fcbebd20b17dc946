"""The streaming benchmark's child process: quantize a synthetic model several times larger than a memory cap.

It writes (once) a random Llama of `--layers` layers to disk one layer at a time, then runs the quantize pass and
compile with a fixed 4-bit strategy on a few random rows, sampling resident memory. The quantize stage's peak
growth over the memory in use when it starts is compared with `--cap-mib`; one JSON line reports the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from pipeline.resources import MeasureUsage

VOCAB = 8192


def write_synthetic(folder: Path, *, layers: int, hidden: int) -> None:
    """A random bf16 LlamaForCausalLM, one shard per layer, so writing it never holds more than a layer either."""
    if (folder / "config.json").exists():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inter, heads = 4 * hidden, hidden // 64
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    save_file({"model.embed_tokens.weight": rand(VOCAB, hidden, scale=0.02),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               "lm_head.weight": rand(VOCAB, hidden, scale=0.02)}, tmp / "model-embed.safetensors")  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (hidden // 4, hidden),
            "self_attn.v_proj": (hidden // 4, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        }
        tensors = {f"{p}{name}.weight": rand(*shape, scale=shape[1] ** -0.5) for name, shape in shapes.items()}
        tensors[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        save_file(tensors, tmp / f"model-layer-{i:03d}.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads // 4, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.replace(folder)


def uniform_strategy(adapter, *, attn_row: int = 6, mlp_row: int = 7) -> dict:
    """The same candidate row for every slot (4-bit rows by default), in measurement-entry form."""
    from quantize.candidates import candidate_rows
    from quantize.measure import exl2_prefix

    rows = {"self_attn": candidate_rows("self_attn")[attn_row], "mlp": candidate_rows("mlp")[mlp_row]}
    return {
        f"{exl2_prefix(adapter)}layers.{i}.{mode}": {k: qp.to_dict() for k, qp in rows[mode].items()}
        for i in range(adapter.text.num_hidden_layers)
        for mode in rows
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--cap-mib", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()

    from calibration import CalibrationSet, CalibrationSpec
    from quantize.adapters import load_adapter
    from quantize.compile import compile_quant
    from quantize.quant_pass import quantize_model

    work = Path(args.work)
    model_dir = work / f"synthetic-{args.layers}x{args.hidden}"
    write_synthetic(model_dir, layers=args.layers, hidden=args.hidden)
    adapter = load_adapter(model_dir)
    ids = torch.randint(0, VOCAB, (args.rows, args.length), generator=torch.Generator().manual_seed(1))
    calset = CalibrationSet(ids, [], "random", [], CalibrationSpec(rows=args.rows, length=args.length))
    tensors_dir, out_dir = work / "tensors", work / "quant"
    shutil.rmtree(tensors_dir, ignore_errors=True)
    baseline = psutil.Process().memory_info().rss
    with MeasureUsage() as usage:
        stats = quantize_model(adapter, calset, uniform_strategy(adapter), head_bits=6, tensors_dir=tensors_dir)
        compile_quant(adapter, tensors_dir, out_dir, quantization_config={"bits": 4.0, "head_bits": 6},
                      provenance={"command": "streaming benchmark"}, overwrite=True)  # fmt: skip
    shutil.rmtree(tensors_dir, ignore_errors=True)
    growth = usage.peak_rss_bytes - baseline
    model_bytes = adapter.files.total_bytes
    print(json.dumps({
        "model_mib": round(model_bytes / 2**20, 1), "cap_mib": args.cap_mib,
        "baseline_mib": round(baseline / 2**20, 1), "peak_rss_mib": round(usage.peak_rss_bytes / 2**20, 1),
        "peak_growth_mib": round(growth / 2**20, 1), "ratio_model_to_cap": round(model_bytes / 2**20 / args.cap_mib, 2),
        "under_cap": growth < args.cap_mib * 2**20, "bpw": round(stats.bpw, 3), "wall_s": round(usage.wall_s, 1),
        "layers": args.layers, "hidden": args.hidden, "rows": args.rows, "length": args.length,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
