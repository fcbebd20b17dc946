"""A model folder summarised for `exl2 inspect`: architecture, component sizes, and what will be quantized or kept.

The summary is plain data (a dict that serialises to JSON); the CLI renders it as tables.
"""

from __future__ import annotations

from typing import Any

from quantize.adapters import ModelAdapter, Role

# What the EXL2 conversion does with each role, as the inspect table states it.
TREATMENT: dict[Role, str] = {
    Role.LINEAR: "quantized (EXL2, mixed bits per the optimizer)",
    Role.HEAD: "quantized (EXL2, head bits)",
    Role.LINEAR_BIAS: "kept, fp16",
    Role.EMBEDDING: "kept, fp16",
    Role.NORM: "kept, fp16",
    Role.VISION: "copied byte for byte, source dtype",
    Role.PROJECTOR: "copied byte for byte, source dtype",
    Role.IGNORED: "dropped (derived buffer)",
}


def summarize(adapter: ModelAdapter) -> dict[str, Any]:
    """Everything `exl2 inspect` prints, as JSON-ready data."""
    t = adapter.text
    components = []
    for role in Role:
        infos = [i for i in adapter.tensors.values() if i.role is role]
        if not infos:
            continue
        dtypes = sorted({i.dtype for i in infos})
        components.append(
            {
                "component": role.value,
                "tensors": len(infos),
                "parameters": sum(i.numel for i in infos),
                "bytes": sum(adapter.entry(i.key).nbytes for i in infos),
                "dtypes": dtypes,
                "treatment": TREATMENT[role],
            }
        )
    if t.tie_word_embeddings:
        components.append(
            {
                "component": Role.HEAD.value,
                "tensors": 0,
                "parameters": t.vocab_size * t.hidden_size,
                "bytes": 0,
                "dtypes": [],
                "treatment": "tied to the embedding: quantized from it at head bits; the embedding is also kept",
            }
        )
    summary: dict[str, Any] = {
        "model_dir": str(adapter.model_dir),
        "architecture": adapter.architecture,
        "layout": adapter.layout.name,
        "shards": len({e.file for e in adapter.files.entries.values()}),
        "language_model": {
            "layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "heads": t.num_attention_heads,
            "kv_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "vocab_size": t.vocab_size,
            "rope_theta": t.rope_theta,
            "rope_scaling": t.rope_scaling,
            "tie_word_embeddings": t.tie_word_embeddings,
        },
        "components": components,
        "total_parameters": sum(i.numel for i in adapter.tensors.values()),
        "quantized_linears": len(adapter.keys_with_role(Role.LINEAR)),
    }
    if adapter.spec.multimodal:
        vision = adapter.config.get("vision_config", {})
        summary["vision"] = {
            "model_type": vision.get("model_type"),
            "layers": vision.get("num_hidden_layers"),
            "hidden_size": vision.get("hidden_size"),
            "patch_size": vision.get("patch_size"),
            "projector_bias": bool(
                adapter.config.get("multimodal_projector_bias", adapter.spec.projector_bias_default)
            ),
        }
    return summary
