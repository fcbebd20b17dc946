"""Calibration for a model folder: its tokenizer (and image processor), the spec from CLI or recipe, the cache.

Glue between the `calibration` library and the commands: it resolves the model's tokenizer and, when a source
has images, its image context, and keeps every built set in the project cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from rich.table import Table

from calibration import (
    CalibrationSet,
    CalibrationSpec,
    ImageContext,
    build_calibration,
    calibration_fingerprint,
    describe,
)
from pipeline.assets import cache_root
from quantize.errors import CalibrationError, ModelFormatError


def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's own tokenizer (offline: nothing is fetched)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{model_dir}: no usable tokenizer ({str(exc).splitlines()[0]})") from exc


def make_spec(sources: Sequence[str] | None, *, rows: int, length: int, seed: int) -> CalibrationSpec:
    try:
        return CalibrationSpec.from_strings(sources, rows=rows, length=length, seed=seed)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "calibration"
        raise CalibrationError(f"calibration spec: {where}: {first['msg']}") from None


def image_context_for(spec: CalibrationSpec, model_dir: Path, tokenizer: Any) -> ImageContext | None:
    return ImageContext.from_model_dir(model_dir, tokenizer=tokenizer) if spec.has_images else None


def calibration_for(model_dir: Path, spec: CalibrationSpec, *, cache_dir: Path | None = None) -> CalibrationSet:
    """Build (or load from the cache) the calibration set of `spec` for the model in `model_dir`."""
    tokenizer = load_tokenizer(model_dir)
    context = image_context_for(spec, model_dir, tokenizer)
    return build_calibration(spec, tokenizer, image_context=context, cache_dir=cache_dir or cache_root())


@dataclass
class CalibrationView:
    table: Table
    summary: dict[str, Any]


def show_calibration(
    model_dir: Path,
    sources: Sequence[str] | None,
    *,
    rows: int,
    length: int,
    seed: int,
    cache_dir: Path | None = None,
    build: bool = True,
) -> CalibrationView:
    """What `exl2 calibration show` prints: the built set (cached for later stages) or, with build=False, the plan."""
    spec = make_spec(sources, rows=rows, length=length, seed=seed)
    cache = cache_dir or cache_root()
    if build:
        calset = calibration_for(model_dir, spec, cache_dir=cache)
        return CalibrationView(describe(spec, calset), calset.summary())
    tokenizer = load_tokenizer(model_dir)
    fingerprint = calibration_fingerprint(spec, tokenizer, image_context=image_context_for(spec, model_dir, tokenizer))
    plan = {
        "plan": True,
        "fingerprint": fingerprint,
        "rows": rows,
        "length": length,
        "seed": seed,
        "sources": [{"label": s.label, "rows": n} for s, n in zip(spec.sources, spec.allocate(), strict=True)],
    }
    return CalibrationView(describe(spec, cache_dir=cache, fingerprint=fingerprint), plan)
