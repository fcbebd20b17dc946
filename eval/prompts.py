"""The evaluation inputs: held-out text windows and image+text prompts, as `EvalSequence`s.

Text: the source's documents are tokenized into one stream (EOS between documents, no BOS added, as exllamav2's
perplexity test does), and the first rows × length tokens are cut into consecutive, non-overlapping windows; each
window is scored on its own. The text must not overlap the calibration text: `check_no_overlap` refuses it when
any 32-token span of an evaluation window also occurs in a calibration row.

Images: each prompt is the model's chat template around one image and a question, as the calibration image rows
are built (`calibration.images.ImageContext`). Every image is first resized to fit the longest edge with both
sides a multiple of twice the effective patch: the Hugging Face processor rounds sides up to the patch, exllamav2
to twice the patch, and only an image both leave as it is gives the same token grid in either engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from calibration.images import ImageContext, expand_prompt
from calibration.spec import parse_source
from calibration.tokens import special_id, stream_tokens
from eval.config import ImageEvalSpec, TextEvalSpec
from eval.engine import EvalImage, EvalSequence
from quantize.errors import CalibrationError, EvalError

OVERLAP_SPAN = 32
PYDOC_TOPICS = "pydoc-topics"


def pydoc_topics() -> list[str]:
    """Python's help topics (pydoc_data.topics, shipped with the interpreter), in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def text_documents(source: str) -> Iterable[str]:
    """The documents of an evaluation text source, in a fixed order (see `TextEvalSpec`)."""
    if source == PYDOC_TOPICS:
        return pydoc_topics()
    from calibration.sources import get_source

    try:
        spec = parse_source(source)
        cls = get_source(spec.kind)
        if not hasattr(cls, "documents"):
            raise EvalError(f"evaluation text '{source}': a {spec.kind} source has no text documents")
        return cls(spec).documents(0)  # type: ignore[attr-defined]
    except CalibrationError as exc:
        raise EvalError(f"evaluation text '{source}': {exc}") from exc


def text_windows(tokenizer: Any, spec: TextEvalSpec) -> torch.Tensor:
    """[rows, length] consecutive windows from the start of the source's token stream."""
    needed = spec.rows * spec.length
    try:
        tokens, _ = stream_tokens(
            tokenizer, text_documents(spec.source), budget=needed, separator=special_id(tokenizer, "eos")
        )
    except CalibrationError as exc:
        raise EvalError(f"evaluation text '{spec.source}': {exc}") from exc
    if len(tokens) < needed:
        raise EvalError(
            f"evaluation text '{spec.source}' has {len(tokens):,} tokens; "
            f"{spec.rows} rows × {spec.length} = {needed:,} needed (lower eval rows or length)"
        )
    return torch.tensor(tokens[:needed], dtype=torch.long).view(spec.rows, spec.length)


def _spans(row: Sequence[int], n: int) -> Iterable[tuple[int, ...]]:
    for start in range(len(row) - n + 1):
        yield tuple(row[start : start + n])


def check_no_overlap(
    windows: torch.Tensor, calibration_rows: Iterable[torch.Tensor], *, what: str, span: int = OVERLAP_SPAN
) -> None:
    """Refuse evaluation windows that share any `span`-token run with a calibration row (EvalError)."""
    seen: set[tuple[int, ...]] = set()
    for rows in calibration_rows:
        for row in rows.tolist():
            seen.update(_spans(row, span))
    shared = sum(1 for row in windows.tolist() for s in _spans(row, span) if s in seen)
    if shared:
        raise EvalError(
            f"evaluation text '{what}' shares {shared} runs of {span} tokens with the calibration rows; "
            "evaluate on text no calibration source contains"
        )


@dataclass
class ImagePrompt:
    """One image prompt: its name (for the report), the sequence up to the answer, the question asked."""

    name: str
    sequence: EvalSequence
    question: str


def fit_image(image: Image.Image, *, longest_edge: int, step: int) -> Image.Image:
    """The image scaled down (never up) to fit `longest_edge`, each side then floored to a multiple of `step`."""
    width, height = image.size
    ratio = max(width / longest_edge, height / longest_edge, 1.0)
    width, height = int(width / ratio), int(height / ratio)
    size = (max(step, width // step * step), max(step, height // step * step))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _longest_edge(context: ImageContext, max_edge: int | None) -> int:
    if max_edge is not None:
        return max_edge
    size = context.processor_config.get("size") or {}
    return int(size.get("longest_edge") or 1024)


def image_sequence(
    context: ImageContext, tokenizer: Any, image: Image.Image, question: str, *, max_edge: int | None
) -> EvalSequence:
    """The chat prompt [image, question] with the generation prompt, ready for the answer's first token."""
    image = fit_image(image.convert("RGB"), longest_edge=_longest_edge(context, max_edge),
                      step=2 * context.effective_patch)  # fmt: skip
    try:
        processed = context.process_image(image, max_edge=max_edge)
        prompt, _reason = context.prompt_ids(tokenizer, question, None)
    except CalibrationError as exc:
        raise EvalError(f"image prompt '{question}': {exc}") from exc
    ids, start, end = expand_prompt(prompt, processed.token_ids)
    picture = EvalImage(
        image=image, pixel_values=processed.pixel_values, image_size=processed.image_size, span=(start, end)
    )
    return EvalSequence(torch.tensor(ids, dtype=torch.long), [picture])


def sample_image_prompts(context: ImageContext, tokenizer: Any, spec: ImageEvalSpec) -> list[ImagePrompt]:
    """The first `count` built-in photographs with their questions."""
    from calibration.sample_images import SAMPLE_IMAGES

    if spec.count > len(SAMPLE_IMAGES):
        raise EvalError(f"image prompts: {spec.count} asked for, {len(SAMPLE_IMAGES)} built-in images exist")
    return [
        ImagePrompt(s.name, image_sequence(context, tokenizer, s.load(), s.prompt, max_edge=spec.max_edge), s.prompt)
        for s in SAMPLE_IMAGES[: spec.count]
    ]


def attach_features(sequences: Iterable[EvalSequence], encoder: Any) -> None:
    """Fill each image's full-precision features from a `quantize.vision.VisionEncoder` (once per image)."""
    for seq in sequences:
        for img in seq.images:
            if img.features is None:
                img.features = encoder.image_features(img.pixel_values, [img.image_size])[0].float()
