"""One GPU session's check that exllamav2 0.3.2 runs our EXL2 quants as our own torch code does.

    python tools/gpu_check.py --quant work/default/quants/4.0bpw --source "$(.venv/bin/exl2 model path)"

(from the repository root, or anywhere: the script puts the repository root on sys.path). The first step imports
exllamav2, which JIT-builds its CUDA extension (minutes on a fresh machine). What it measures, on one quant:

* weights: for every quantized linear (each layer's q/k/v/o/gate/up/down_proj and the head), exllamav2's
  dequantized weight (`ExLlamaV2Linear.get_weight_tensor_dq`, i.e. `ext_c.reconstruct`) against ours
  (`quantize.exl2_model.Exl2Weights.linear`): max |Δ| and relative = max |Δ| / max |W_ours|. Expected: 0. The
  script exits 1 when any relative difference exceeds 1e-3.
* text: the first `--tokens` tokens of Python's pydoc topics, tokenized by the quant's own tokenizer, as one
  sequence from position 0. exllamav2's logits (fp16, through `eval.exllamav2_engine.ExLlamaV2Engine`) against our
  forward (`quantize.modeling.LayerwiseLM` over `Exl2Weights`, fp32 on CUDA), over every position:
  max and mean |Δlogit|; KL(P_ours ‖ P_exllamav2) = Σ_v P_ours(v)·(log P_ours(v) − log P_exllamav2(v)), natural
  log, averaged over positions; top-1 agreement = the fraction of positions whose argmax tokens agree.
* image (VLM quants, unless --no-image): a sample photograph resized so that exllamav2's and the Hugging Face
  processor's token grids agree, inside the chat template. exllamav2 with its own fp16 vision tower against our
  forward with the source's full-precision vision features (`quantize.vision.VisionEncoder`): the same metrics.
  Then an image whose grids differ, which the engine must refuse with EvalError (merge-1 models only).
* --reference: the source model's full-precision logits on the text too, and KL(P_source ‖ each engine).

Writes everything to --out (JSON) and prints a one-screen summary. Exit codes: 0 ok, 1 weights disagree, 2 the
check could not run (no CUDA, unreadable folders).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

WEIGHT_TOLERANCE = 1e-3  # relative max |Δ| above which dequantized weights "disagree"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", type=Path, required=True, help="an EXL2 folder written by exl2 quantize")
    parser.add_argument("--source", type=Path, required=True, help="the model folder it was quantized from")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="where to write the results")
    parser.add_argument("--tokens", type=int, default=384, help="text tokens compared (default 384)")
    parser.add_argument("--no-image", action="store_true", help="skip the image comparison")
    parser.add_argument("--reference", action="store_true", help="also run the full-precision source model")
    return parser.parse_args(argv)


# --- comparisons ---------------------------------------------------------------------------------------------------


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Metrics of `candidate` [n, V] against `reference` [n, V] (both float32 CPU); see the module docstring."""
    ref, cand = reference.float(), candidate.float()
    delta = (ref - cand).abs()
    log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "positions": int(ref.shape[0]),
        "max_abs_logit_delta": float(delta.max()),
        "mean_abs_logit_delta": float(delta.mean()),
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
    }


def linear_modules(weights: Any) -> list[tuple[str, int]]:
    """(module key, out_features) of every quantized linear, in file order, the head last."""
    keys = []
    for layer in range(weights.text.num_hidden_layers):
        for name, (n_out, _) in weights.text.linear_shapes().items():
            keys.append((f"{weights.prefix}layers.{layer}.{name}", n_out))
    return [*keys, (weights.head, weights.text.vocab_size)]


def compare_weights(engine: Any, weights: Any) -> list[dict[str, Any]]:
    rows = []
    for key, n_out in linear_modules(weights):
        theirs = engine.dequantized_weight(key, n_out).float()
        ours = weights.linear(key, n_out).float()
        delta = float((theirs - ours).abs().max())
        scale = float(ours.abs().max()) or 1.0
        rows.append({"module": key, "max_abs": delta, "relative": delta / scale, "shape": list(ours.shape)})
    return rows


# --- inputs ------------------------------------------------------------------------------------------------------


def text_ids(quant: Path, tokens: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(quant))
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: tokens * 16])["input_ids"][:tokens]
    return torch.tensor(ids, dtype=torch.long)


def sample_image(width: int, height: int) -> Any:
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)


def image_sizes(context: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """(width, height) of an image both processors grid alike, and of one a patch wider (grids differ at merge 1)."""
    patch, merge = context.patch_size, context.merge_size
    unit = math.lcm(2 * patch, patch * merge)
    longest = int(context.processor_config.get("size", {}).get("longest_edge", 1024))
    width, height = max(unit, int(longest * 0.75) // unit * unit), max(unit, int(longest * 0.5) // unit * unit)
    return (width, height), (width - patch, height)


# --- the checks --------------------------------------------------------------------------------------------------


def text_check(engine: Any, lm: Any, ids: torch.Tensor, source_lm: Any | None) -> dict[str, Any]:
    from eval.engine import EvalSequence

    exl = next(engine.logits([EvalSequence(ids)]))
    with torch.inference_mode():
        ours = lm.forward(ids[None].cuda())[0].float().cpu()
    result: dict[str, Any] = {"exllamav2_vs_torch": compare_logits(ours, exl)}
    if source_lm is not None:
        with torch.inference_mode():
            full = source_lm.forward(ids[None].cuda())[0].float().cpu()
        result["source_vs_exllamav2"] = compare_logits(full, exl)
        result["source_vs_torch"] = compare_logits(full, ours)
    return result


def image_sequence(context: Any, tokenizer: Any, size: tuple[int, int]) -> tuple[Any, Any]:
    from calibration.images import expand_prompt
    from eval.engine import EvalImage, EvalSequence

    image = sample_image(*size)
    processed = context.process_image(image)
    prompt, _ = context.prompt_ids(tokenizer, "Describe this image in one sentence.", None)
    ids, start, end = expand_prompt(prompt, processed.token_ids)
    image_item = EvalImage(image, processed.pixel_values, processed.image_size, (start, end))
    return EvalSequence(torch.tensor(ids, dtype=torch.long), [image_item]), processed


def image_check(engine: Any, lm: Any, quant: Path, source: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from calibration.images import ImageContext
    from quantize.adapters import load_adapter
    from quantize.errors import EvalError
    from quantize.vision import VisionEncoder, merge_image_features

    tokenizer = AutoTokenizer.from_pretrained(str(quant))
    context = ImageContext.from_model_dir(quant, tokenizer=tokenizer)
    good, odd = image_sizes(context)
    sequence, processed = image_sequence(context, tokenizer, good)
    exl = next(engine.logits([sequence]))
    encoder = VisionEncoder(load_adapter(source), device="cuda")
    with torch.inference_mode():
        features = encoder.image_features(processed.pixel_values, [processed.image_size])
        ids = sequence.input_ids[None].cuda()
        embeds = merge_image_features(lm.embed(ids), ids, context.token_ids.image, features)
        ours = lm.forward(inputs_embeds=embeds)[0].float().cpu()
    start = sequence.images[0].span[0]
    result: dict[str, Any] = {
        "image_size": list(processed.image_size),
        "span": list(sequence.images[0].span),
        "all_positions": compare_logits(ours, exl),
        "from_image_on": compare_logits(ours[start:], exl[start:]),
    }
    if context.merge_size == 1:
        odd_sequence, _ = image_sequence(context, tokenizer, odd)
        try:
            next(engine.logits([odd_sequence]))
            result["mismatch_refused"] = False
        except EvalError as exc:
            result["mismatch_refused"], result["mismatch_message"] = True, str(exc)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from quantize.engines import import_exllamav2

    started = time.perf_counter()
    exl2 = import_exllamav2(purpose="tools/gpu_check.py")
    result: dict[str, Any] = {
        "quant": str(args.quant),
        "source": str(args.source),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "exllamav2": getattr(exl2, "__version__", "?"),
        "import_s": round(time.perf_counter() - started, 1),
    }
    from eval.exllamav2_engine import ExLlamaV2Engine
    from quantize.adapters import load_adapter
    from quantize.exl2_model import Exl2Weights
    from quantize.modeling import LayerwiseLM

    weights = Exl2Weights(args.quant)
    ids = text_ids(args.quant, args.tokens)
    started = time.perf_counter()
    engine = ExLlamaV2Engine(args.quant, max_seq_len=max(4096, len(ids)))
    result["load_s"], result["engine_decisions"] = round(time.perf_counter() - started, 1), engine.decisions
    try:
        result["weights"] = compare_weights(engine, weights)
        lm = LayerwiseLM(weights.text, weights, device="cuda")
        source_lm = None
        if args.reference:
            adapter = load_adapter(args.source)
            source_lm = LayerwiseLM(adapter.text, adapter, device="cuda")
        result["text"] = text_check(engine, lm, ids, source_lm)
        if weights.spec.multimodal and not args.no_image:
            result["image"] = image_check(engine, lm, args.quant, args.source)
    finally:
        engine.close()
    return result


# --- output ------------------------------------------------------------------------------------------------------


def _metrics_line(label: str, m: dict[str, float]) -> str:
    return (
        f"  {label:<22} KL {m['kl']:.2e} (max {m['kl_max']:.2e})  top-1 {m['top1_agreement']:.4f}  "
        f"|Δlogit| max {m['max_abs_logit_delta']:.3g} mean {m['mean_abs_logit_delta']:.3g}  ({m['positions']} pos)"
    )


def summary(result: dict[str, Any]) -> str:
    weights = result["weights"]
    worst = max(weights, key=lambda row: row["relative"])
    bad = [row for row in weights if row["relative"] > WEIGHT_TOLERANCE]
    exact = sum(row["max_abs"] == 0 for row in weights)
    lines = [
        f"{result['quant']} on {result['device']} (torch {result['torch']}, exllamav2 {result['exllamav2']})",
        f"import {result['import_s']} s, load {result['load_s']} s; " + "; ".join(result["engine_decisions"]),
        f"weights: {len(weights)} linears, {exact} bit-identical, worst {worst['module']} "
        f"max|Δ| {worst['max_abs']:.3g} (relative {worst['relative']:.2e}); "
        + (f"{len(bad)} beyond {WEIGHT_TOLERANCE:g}: DISAGREE" if bad else "all within tolerance"),
        "text:",
        *(_metrics_line(label, m) for label, m in result["text"].items()),
    ]
    image = result.get("image")
    if image:
        lines += [f"image {image['image_size']} span {image['span']}:"]
        lines += [_metrics_line(label, image[label]) for label in ("all_positions", "from_image_on")]
        if "mismatch_refused" in image:
            lines.append(f"  differing grid refused: {image['mismatch_refused']}")
    return "\n".join(lines)


def write_json(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from quantize.errors import Exl2Error

    try:
        result = run(args)
    except Exl2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    print(summary(result))
    print(f"results: {args.out}")
    return 1 if any(row["relative"] > WEIGHT_TOLERANCE for row in result["weights"]) else 0


if __name__ == "__main__":
    sys.exit(main())
