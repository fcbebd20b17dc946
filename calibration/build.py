"""Building a calibration set from a `CalibrationSpec`, and its on-disk cache.

Rows are split among the sources by weight, each source builds its share from its own seed (spec seed + source
index), and the result is cached under the sha256 of the canonical JSON of (format version, each source's spec and
content identity, the tokenizer's hash, rows, length, seed, and the image processor's identity when images are
used). Cache layout: `<cache_dir>/calibration/<fingerprint>.safetensors` (input_ids, per image row its
pixel_values and [IMG] positions) + `<fingerprint>.json` (spec, summary, image rows), each written to a temporary
name and renamed; the .json is written last and marks the entry complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calibration.base import BuildContext, CalibrationSource, SourceRows
from calibration.images import ImageContext, ImageRow
from calibration.sources import get_source
from calibration.spec import CalibrationSpec
from calibration.tokens import tokenizer_fingerprint
from quantize.errors import CalibrationError

log = logging.getLogger(__name__)

CALIBRATION_FORMAT_VERSION = 1
CACHE_SUBDIR = "calibration"


@dataclass(frozen=True)
class SourceSummary:
    """What one source contributed: rows, tokens (rows × length), image rows, and sub-parts (exl2-default)."""

    label: str
    kind: str
    rows: int
    tokens: int
    image_rows: int = 0
    available_tokens: int | None = None
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class CalibrationSet:
    """The rows to calibrate with: `input_ids` [rows, length] and, for image rows, what the vision tower needs."""

    input_ids: torch.Tensor
    image_rows: list[ImageRow]
    fingerprint: str
    sources_summary: list[SourceSummary]
    spec: CalibrationSpec
    cache_path: Path | None = None
    from_cache: bool = False

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def seed(self) -> int:
        return self.spec.seed

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (for `--json` output): no tensors."""
        return {
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "length": self.length,
            "seed": self.seed,
            "cache_path": str(self.cache_path) if self.cache_path else None,
            "from_cache": self.from_cache,
            "sources": [asdict(s) for s in self.sources_summary],
            "image_rows": [
                {
                    "row": r.row,
                    "image_sizes": [list(s) for s in r.image_sizes],
                    "span": list(r.span),
                    "source": r.source,
                }
                for r in self.image_rows
            ],
        }

    def image_row(self, row: int) -> ImageRow | None:
        """The image data of row `row`, or None for a text-only row."""
        return next((r for r in self.image_rows if r.row == row), None)


def cache_path(cache_dir: str | Path, fingerprint: str) -> Path:
    """Where the set with this fingerprint is (or would be) cached: the .safetensors file."""
    return Path(cache_dir) / CACHE_SUBDIR / f"{fingerprint}.safetensors"


def calibration_fingerprint(spec: CalibrationSpec, tokenizer: Any, *, image_context: ImageContext | None = None) -> str:
    """sha256 hex of everything the rows depend on; computed without tokenizing any text."""
    sources = [get_source(s.kind)(s) for s in spec.sources]
    return _fingerprint(spec, sources, spec.allocate(), tokenizer, image_context)


def build_calibration(
    spec: CalibrationSpec,
    tokenizer: Any,
    *,
    image_context: ImageContext | None = None,
    cache_dir: str | Path | None = None,
) -> CalibrationSet:
    """Build (or load from `cache_dir`) the calibration set `spec` describes, tokenized by `tokenizer` (a
    transformers tokenizer). Image sources need `image_context`. Too little data is a CalibrationError."""
    sources = [get_source(s.kind)(s) for s in spec.sources]
    counts = spec.allocate()
    _check_image_context(sources, counts, image_context)
    fingerprint = _fingerprint(spec, sources, counts, tokenizer, image_context)
    path = cache_path(cache_dir, fingerprint) if cache_dir is not None else None
    if path is not None and path.with_suffix(".json").is_file():
        cached = _load_cached(path, spec, fingerprint)
        if cached is not None:
            log.info("calibration set %s loaded from %s", fingerprint[:12], path)
            return cached
    built = _build_rows(spec, sources, counts, tokenizer, image_context)
    calset = CalibrationSet(
        input_ids=built[0], image_rows=built[1], fingerprint=fingerprint, sources_summary=built[2], spec=spec
    )
    if path is not None:
        _save(calset, path)
        calset.cache_path = path
    return calset


def _check_image_context(sources: list[CalibrationSource], counts: list[int], ctx: ImageContext | None) -> None:
    for source, n in zip(sources, counts, strict=True):
        if source.is_image and n and ctx is None:
            raise CalibrationError(
                f"calibration source '{source.spec.label}' has image rows; build it with the model's image_context"
            )


def _fingerprint(
    spec: CalibrationSpec,
    sources: list[CalibrationSource],
    counts: list[int],
    tokenizer: Any,
    image_context: ImageContext | None,
) -> str:
    uses_images = any(s.is_image and n for s, n in zip(sources, counts, strict=True))
    payload = {
        "format": CALIBRATION_FORMAT_VERSION,
        "rows": spec.rows,
        "length": spec.length,
        "seed": spec.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": [
            {"spec": s.spec.model_dump(mode="json"), "rows": n, "identity": s.identity() if n else None}
            for s, n in zip(sources, counts, strict=True)
        ],
        "image": image_context.identity() if uses_images and image_context is not None else None,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _build_rows(
    spec: CalibrationSpec,
    sources: list[CalibrationSource],
    counts: list[int],
    tokenizer: Any,
    image_context: ImageContext | None,
) -> tuple[torch.Tensor, list[ImageRow], list[SourceSummary]]:
    parts: list[torch.Tensor] = []
    images: list[ImageRow] = []
    summary: list[SourceSummary] = []
    offset = 0
    for index, (source, n) in enumerate(zip(sources, counts, strict=True)):
        if n == 0:
            log.warning(
                "calibration source '%s' gets 0 of %d rows at its weight; skipped", source.spec.label, spec.rows
            )
            continue
        ctx = BuildContext(tokenizer=tokenizer, length=spec.length, seed=spec.seed + index, image_context=image_context)
        result = source.build(ctx, n)
        _check_shape(source, result, n, spec.length)
        for image_row in result.images:
            image_row.row += offset
        parts.append(result.input_ids.to(torch.long))
        images.extend(result.images)
        summary.append(_summarize(source, result, n, spec.length))
        offset += n
    return torch.cat(parts, dim=0).contiguous(), images, summary


def _check_shape(source: CalibrationSource, result: SourceRows, rows: int, length: int) -> None:
    # Every source promises exact rows; a short set must never reach the quantizer silently.
    got = tuple(result.input_ids.shape)
    if got != (rows, length):
        raise CalibrationError(f"calibration source '{source.spec.label}' built {got} rows; ({rows}, {length}) needed")


def _summarize(source: CalibrationSource, result: SourceRows, rows: int, length: int) -> SourceSummary:
    return SourceSummary(
        label=source.spec.label,
        kind=source.spec.kind,
        rows=rows,
        tokens=rows * length,
        image_rows=len(result.images),
        available_tokens=result.available_tokens,
        parts=dict(result.parts),
    )


def _save(calset: CalibrationSet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"input_ids": calset.input_ids.contiguous()}
    for k, image_row in enumerate(calset.image_rows):
        tensors[f"images.{k}.pixel_values"] = image_row.pixel_values.contiguous()
        tensors[f"images.{k}.positions"] = image_row.image_token_positions.contiguous()
    meta = {
        "format": CALIBRATION_FORMAT_VERSION,
        "fingerprint": calset.fingerprint,
        "spec": calset.spec.model_dump(mode="json"),
        "sources_summary": [asdict(s) for s in calset.sources_summary],
        "image_rows": [
            {"row": r.row, "image_sizes": r.image_sizes, "span": list(r.span), "source": r.source}
            for r in calset.image_rows
        ],
    }
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    json_path = path.with_suffix(".json")
    tmp_json = json_path.with_name(f"{json_path.name}.tmp-{os.getpid()}")
    tmp_json.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp_json, json_path)
    log.info("calibration set %s cached at %s", calset.fingerprint[:12], path)


def _load_cached(path: Path, spec: CalibrationSpec, fingerprint: str) -> CalibrationSet | None:
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        tensors = load_file(str(path))
        images = [
            ImageRow(
                row=int(r["row"]),
                pixel_values=tensors[f"images.{k}.pixel_values"],
                image_sizes=[tuple(s) for s in r["image_sizes"]],
                image_token_positions=tensors[f"images.{k}.positions"],
                span=(int(r["span"][0]), int(r["span"][1])),
                source=r["source"],
            )
            for k, r in enumerate(meta["image_rows"])
        ]
        summary = [SourceSummary(**s) for s in meta["sources_summary"]]
        input_ids = tensors["input_ids"]
    except Exception as exc:  # a damaged or foreign cache entry is rebuilt, not fatal
        log.warning("calibration cache entry %s is unreadable (%s); rebuilding", path, exc)
        return None
    if meta.get("fingerprint") != fingerprint or tuple(input_ids.shape) != (spec.rows, spec.length):
        log.warning("calibration cache entry %s does not match its name; rebuilding", path)
        return None
    return CalibrationSet(
        input_ids=input_ids,
        image_rows=images,
        fingerprint=fingerprint,
        sources_summary=summary,
        spec=spec,
        cache_path=path,
        from_cache=True,
    )
