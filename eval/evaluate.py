"""Evaluating models against the full-precision reference: the inputs, the reference, and the scores.

`build_inputs` makes the evaluation inputs once (text windows, image prompts with their full-precision image
features, labelled VQA prompts). `compute_reference` runs the full-precision model over them once and keeps, per
scored position, its top-K summary (`eval.metrics.TopK`), plus its greedy answer to each image prompt and its
predictions on each VQA set. `score_model` runs any engine (a quant) over the same inputs and returns the report's
metric columns:

* text (`ppl`, `kl_*`, `top1_agreement`, `top5_agreement`, `eval_tokens`): every position of every window but
  the last predicts the next token of the window; the metrics are defined in `eval.metrics`.
* image prompts (`image_kl_*`, `image_top1_agreement`, `image_answer_agreement`, `image_prompts`): the prompt is
  extended by the reference's greedy answer and the model is scored, teacher-forced, at the positions that predict
  the answer's tokens. `image_answer_agreement` is the fraction of prompts where the model's most likely token
  equals the reference's answer token at every one of those positions: exactly the prompts where the model's own
  greedy answer is the reference's, with one forward instead of a generation.
* VQA sets (`vqa_<set>_<metric>`): the model answers greedily; the set's standard metric scores the answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.config import EvalSpec
from eval.engine import EvalEngine, EvalSequence
from eval.generate import decode, greedy
from eval.metrics import AGREEMENT_K, METRICS_VERSION, StoredTopK, TokenScores, TopK, perplexity, reference_topk
from eval.prompts import ImagePrompt, attach_features, check_no_overlap, sample_image_prompts, text_windows
from quantize.progress import NullProgress, Progress


@dataclass
class VqaInputs:
    """A labelled VQA set (`eval.vqa_sets.VqaSet`) and one prompt sequence per item."""

    vqa_set: Any
    sequences: list[EvalSequence]
    max_new_tokens: int

    @property
    def column(self) -> str:
        return f"vqa_{self.vqa_set.spec.name}_{self.vqa_set.metric}"


@dataclass
class EvalInputs:
    spec: EvalSpec
    tokenizer: Any
    stop_ids: set[int]
    text: torch.Tensor | None = None
    images: list[ImagePrompt] = field(default_factory=list)
    vqa: list[VqaInputs] = field(default_factory=list)

    @property
    def units(self) -> int:
        """Progress steps of one pass over the inputs: text windows, image prompts, VQA items."""
        text = 0 if self.text is None else int(self.text.shape[0])
        return text + len(self.images) + sum(len(v.sequences) for v in self.vqa)

    def fingerprint(self, model_fingerprint: str) -> str:
        """sha256 of everything the reference depends on: model, inputs (ids and pixels), K, metric definitions."""
        digest = hashlib.sha256()
        settings = {"model": model_fingerprint, "top_k": self.spec.top_k, "metrics": METRICS_VERSION,
                    "stop": sorted(self.stop_ids), "image_tokens": self.spec.images.max_new_tokens
                    if self.spec.images else None}  # fmt: skip
        digest.update(json.dumps(settings, sort_keys=True).encode())
        if self.text is not None:
            digest.update(self.text.numpy().tobytes())
        for prompt in self.images:
            _hash_sequence(digest, prompt.sequence)
        for vqa in self.vqa:
            digest.update(f"{vqa.vqa_set.fingerprint}|{vqa.max_new_tokens}".encode())
            for seq in vqa.sequences:
                _hash_sequence(digest, seq)
        return digest.hexdigest()


def _hash_sequence(digest: Any, seq: EvalSequence) -> None:
    digest.update(seq.input_ids.numpy().tobytes())
    for img in seq.images:
        digest.update(img.pixel_values.numpy().tobytes())


def build_inputs(
    model_dir: Path,
    spec: EvalSpec,
    *,
    calibration_rows: Sequence[torch.Tensor] = (),
    vqa_base_dir: Path | None = None,
) -> EvalInputs:
    """Tokenize the text, build the image and VQA prompts, attach full-precision image features."""
    from calibration.images import ImageContext
    from eval.generate import stop_ids
    from pipeline.calibrate import load_tokenizer
    from quantize.adapters import load_adapter

    tokenizer = load_tokenizer(model_dir)
    adapter = load_adapter(model_dir)
    generation = _read_json(model_dir / "generation_config.json")
    inputs = EvalInputs(spec, tokenizer, stop_ids(tokenizer, generation or adapter.config))
    if spec.text is not None:
        inputs.text = text_windows(tokenizer, spec.text)
        check_no_overlap(inputs.text, calibration_rows, what=spec.text.source)
    wants_images = spec.images is not None or bool(spec.vqa)
    if wants_images and adapter.spec.multimodal:
        context = ImageContext.from_model_dir(model_dir, tokenizer=tokenizer)
        if spec.images is not None:
            inputs.images = sample_image_prompts(context, tokenizer, spec.images)
        inputs.vqa = [_vqa_inputs(context, tokenizer, s, vqa_base_dir) for s in spec.vqa]
        _attach_all(adapter, inputs)
    return inputs


def _vqa_inputs(context: Any, tokenizer: Any, spec: Any, base_dir: Path | None) -> VqaInputs:
    from eval.prompts import image_sequence
    from eval.vqa_sets import load_vqa_set

    vqa_set = load_vqa_set(spec, base_dir=base_dir)
    sequences = [
        image_sequence(context, tokenizer, item.image, vqa_set.prompt(item), max_edge=spec.max_edge)
        for item in vqa_set.items
    ]
    return VqaInputs(vqa_set, sequences, spec.max_new_tokens)


def _attach_all(adapter: Any, inputs: EvalInputs) -> None:
    from quantize.vision import VisionEncoder

    encoder = VisionEncoder(adapter)
    attach_features((p.sequence for p in inputs.images), encoder)
    for vqa in inputs.vqa:
        attach_features(vqa.sequences, encoder)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Reference:
    """The full-precision model's outputs on one `EvalInputs`: top-K summaries, greedy answers, VQA predictions."""

    key: str
    text: TopK | StoredTopK | None  # in memory when just computed, read from the cache file otherwise
    image: TopK | StoredTopK | None
    answers: list[list[int]]
    vqa_predictions: dict[str, list[str]]
    metrics: dict[str, float]


def _text_sequences(text: torch.Tensor) -> list[EvalSequence]:
    return [EvalSequence(row) for row in text]


def _answered(inputs: EvalInputs, answers: Sequence[Sequence[int]]) -> list[EvalSequence]:
    return [p.sequence.extended(a) for p, a in zip(inputs.images, answers, strict=True)]


def _answer_rows(prompt: ImagePrompt, answer: Sequence[int]) -> slice:
    start = len(prompt.sequence) - 1
    return slice(start, start + len(answer))


def compute_reference(
    engine: EvalEngine, inputs: EvalInputs, *, key: str, progress: Progress | None = None
) -> Reference:
    """Run the full-precision engine over the inputs once and summarise what every quant is compared with.

    The reference's own report row comes from the same forwards: its KL is 0 and its top-k agreement 1 by
    definition; its perplexity, its answer agreement (its teacher-forced argmax against its own greedy answer, 1
    unless a near-tie flips between the two forwards) and its VQA scores are measured.
    """
    k = inputs.spec.top_k
    progress = progress or NullProgress()
    progress.start("reference", inputs.units)
    reference = Reference(key, None, None, [], {}, {})
    if inputs.text is not None:
        parts = []
        for logits, row in zip(engine.logits(_text_sequences(inputs.text)), inputs.text, strict=True):
            parts.append(reference_topk(logits[:-1], k, row[1:]))
            progress.advance("reference")
        text = reference.text = TopK.cat(parts)
        reference.metrics.update(_self_scores(text, "", ppl=True))
        reference.metrics["eval_tokens"] = float(text.positions)
    if inputs.images:
        max_new = inputs.spec.images.max_new_tokens if inputs.spec.images else 16
        answers = greedy(engine, [p.sequence for p in inputs.images], max_new_tokens=max_new, stop_ids=inputs.stop_ids)
        parts, matches = [], []
        for prompt, answer, lg in zip(inputs.images, answers, engine.logits(_answered(inputs, answers)), strict=True):
            rows = lg[_answer_rows(prompt, answer)]
            parts.append(reference_topk(rows, k, torch.tensor(answer)))
            matches.append(bool((rows.argmax(-1) == torch.tensor(answer)).all()))
        image = reference.image = TopK.cat(parts)
        reference.answers = answers
        scores = _self_scores(image, "image_", ppl=False)
        reference.metrics.update({key: scores[key] for key in IMAGE_COLUMNS if key in scores})
        reference.metrics["image_answer_agreement"] = sum(matches) / len(matches)
        reference.metrics["image_prompts"] = float(len(matches))
        progress.advance("reference", len(matches))
    for vqa in inputs.vqa:
        predictions = _vqa_predictions(engine, inputs, vqa)
        reference.vqa_predictions[vqa.column] = predictions
        reference.metrics[vqa.column] = float(vqa.vqa_set.score(predictions))
        progress.advance("reference", len(predictions))
    progress.finish("reference")
    return reference


IMAGE_COLUMNS = ("image_kl_mean", "image_kl_p99", "image_kl_max", "image_top1_agreement")


def _self_scores(topk: TopK, prefix: str, *, ppl: bool) -> dict[str, float]:
    """The reference's scores against itself: KL 0, agreement 1, perplexity from its target log-probs."""
    out = {f"{prefix}kl_{s}": 0.0 for s in ("mean", "median", "p90", "p99", "max")}
    out.update({f"{prefix}top{k}_agreement": 1.0 for k in AGREEMENT_K})
    if ppl:
        out[f"{prefix}ppl"] = perplexity(topk.target_logprob)
    return out


def _vqa_predictions(engine: EvalEngine, inputs: EvalInputs, vqa: VqaInputs) -> list[str]:
    answers = greedy(engine, vqa.sequences, max_new_tokens=vqa.max_new_tokens, stop_ids=inputs.stop_ids)
    return [decode(inputs.tokenizer, a) for a in answers]


def score_model(
    engine: EvalEngine,
    inputs: EvalInputs,
    reference: Reference,
    *,
    progress: Progress | None = None,
    task: str = "score",
) -> dict[str, float]:
    """The report's metric columns for one model (see the module docstring)."""
    progress = progress or NullProgress()
    progress.start(task, inputs.units)
    out: dict[str, float] = {}
    if inputs.text is not None and reference.text is not None:
        out.update(_score_text(engine, inputs.text, reference.text, lambda: progress.advance(task)))
    if inputs.images and reference.image is not None:
        out.update(_score_images(engine, inputs, reference))
        progress.advance(task, len(inputs.images))
    for vqa in inputs.vqa:
        answers = _vqa_predictions(engine, inputs, vqa)
        out[vqa.column] = float(vqa.vqa_set.score(answers))
        progress.advance(task, len(answers))
    progress.finish(task)
    return out


def _score_text(
    engine: EvalEngine, text: torch.Tensor, reference: TopK | StoredTopK, tick: Callable[[], None]
) -> dict[str, float]:
    scores = TokenScores.empty()
    per_row = text.shape[1] - 1
    for i, (logits, row) in enumerate(zip(engine.logits(_text_sequences(text)), text, strict=True)):
        rows = slice(i * per_row, (i + 1) * per_row)
        scores.add(_slice(reference, rows), logits[:-1], row[1:])
        tick()
    return {**scores.summary(), "eval_tokens": float(text.shape[0] * per_row)}


def _score_images(engine: EvalEngine, inputs: EvalInputs, reference: Reference) -> dict[str, float]:
    assert reference.image is not None  # the caller checked
    scores = TokenScores.empty()
    matches, offset = [], 0
    logits = engine.logits(_answered(inputs, reference.answers))
    for prompt, answer, lg in zip(inputs.images, reference.answers, logits, strict=True):
        rows = lg[_answer_rows(prompt, answer)]
        ref = _slice(reference.image, slice(offset, offset + len(answer)))
        offset += len(answer)
        scores.add(ref, rows, None)
        matches.append(bool((rows.argmax(-1) == torch.tensor(answer)).all()))
    summary = scores.summary("image_")
    return {
        **{key: summary[key] for key in IMAGE_COLUMNS},
        "image_answer_agreement": sum(matches) / len(matches),
        "image_prompts": float(len(matches)),
    }


def _slice(topk: TopK | StoredTopK, rows: slice) -> TopK:
    return topk.rows(rows)
