"""What `exl2 calibration show` prints: the sources, rows and tokens per source, image rows, length, seed,
fingerprint and cache path of a calibration set (built, or only planned from its spec)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from calibration.build import CalibrationSet, cache_path
from calibration.exl2_default import mix_counts
from calibration.spec import CalibrationSpec


def describe(
    spec: CalibrationSpec,
    calset: CalibrationSet | None = None,
    *,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
) -> Table:
    """A rich table of the set. Without `calset` it shows the plan: rows per source from the weights."""
    table = Table(title="Calibration set" if calset else "Calibration plan")
    for name, justify in (
        ("source", "left"),
        ("kind", "left"),
        ("rows", "right"),
        ("tokens", "right"),
        ("image rows", "right"),
        ("parts", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for label, kind, rows, tokens, images, parts in _source_lines(spec, calset):
        table.add_row(label, kind, f"{rows:,}", f"{tokens:,}", images, parts)
    fingerprint = calset.fingerprint if calset else fingerprint
    where = calset.cache_path if calset and calset.cache_path else None
    if where is None and cache_dir is not None and fingerprint:
        where = cache_path(cache_dir, fingerprint)
    table.caption = "\n".join(
        [
            f"rows {spec.rows:,} × length {spec.length:,} = {spec.rows * spec.length:,} tokens",
            f"seed {spec.seed}",
            f"fingerprint {fingerprint or '(not computed)'}",
            f"cache {where or '(none)'}" + (" (hit)" if calset and calset.from_cache else ""),
        ]
    )
    return table


def describe_text(
    spec: CalibrationSpec,
    calset: CalibrationSet | None = None,
    *,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
    width: int = 120,
) -> str:
    """`describe` rendered as plain text (for logs, --json-less output and tests)."""
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(describe(spec, calset, cache_dir=cache_dir, fingerprint=fingerprint))
    return console.export_text()


def _source_lines(spec: CalibrationSpec, calset: CalibrationSet | None) -> list[tuple[str, str, int, int, str, str]]:
    if calset is not None:
        return [(s.label, s.kind, s.rows, s.tokens, str(s.image_rows), _parts(s.parts)) for s in calset.sources_summary]
    lines = []
    for source, rows in zip(spec.sources, spec.allocate(), strict=True):
        parts = _parts(mix_counts(rows)) if source.kind == "exl2-default" and rows else ""
        images = str(rows) if source.is_image else "0"
        lines.append((source.label, source.kind, rows, rows * spec.length, images, parts))
    return lines


def _parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in parts.items() if v)
