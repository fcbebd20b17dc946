"""Typed settings of the evaluation stage: which text, which image prompts, which labelled VQA sets.

Recipes (`pipeline.recipe`) hold an `EvalSpec` under `eval:`; the CLI builds one from its flags. Every field
that changes a metric's value is part of the reference cache's key (`eval.reference`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Presets of the well-known labelled VQA sets: field names in their Hugging Face layouts and the standard metric.
VqaKind = Literal["chartqa", "docvqa", "textvqa", "vqav2", "ai2d", "custom"]


class TextEvalSpec(BaseModel):
    """Held-out text scored for perplexity, KL divergence and top-k agreement.

    `source` is `pydoc-topics` (Python's help topics, shipped with the interpreter and in no calibration source),
    or a calibration-style source string: `text:PATH`, `jsonl:PATH[#FIELD]`, `parquet:PATH[#COL]`,
    `hf:NAME[:CONFIG][@SPLIT][#FIELD]` (e.g. `hf:wikitext:wikitext-2-raw-v1@test`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = "pydoc-topics"
    rows: int = Field(default=8, ge=1)
    length: int = Field(default=512, ge=16)


class ImageEvalSpec(BaseModel):
    """Image+text prompts answered greedily by the full-precision model, then scored on each quant.

    `source` is `sample-images` (the 16 photographs shipped with scikit-image, each with its own question).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["sample-images"] = "sample-images"
    count: int = Field(default=16, ge=1)
    max_edge: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=24, ge=1)


class VqaSetSpec(BaseModel):
    """A labelled VQA set: a local jsonl file (`jsonl:PATH`, images relative to the file) or a Hugging Face dataset
    (`hf:NAME[:CONFIG][@SPLIT]`, or a `save_to_disk` folder). `kind` picks the field names and the standard metric;
    `custom` needs `question_field`, `answer_field` and `metric`. The first `limit` rows are scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str
    kind: VqaKind = "custom"
    metric: str | None = None
    limit: int = Field(default=100, ge=1)
    image_field: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    options_field: str | None = None
    max_edge: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=16, ge=1)


class EvalSpec(BaseModel):
    """Everything the evaluation stage runs: text, image prompts, VQA sets, and how (engine, device, top-k kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: TextEvalSpec | None = Field(default_factory=TextEvalSpec)
    images: ImageEvalSpec | None = Field(default_factory=ImageEvalSpec)
    vqa: list[VqaSetSpec] = Field(default_factory=list)
    engine: Literal["torch", "exllamav2"] = "torch"
    device: str = "auto"
    top_k: int = Field(default=2048, ge=8)
