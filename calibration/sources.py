"""The registry of calibration source kinds: `SOURCES` maps each `SourceSpec.kind` to the class that builds it."""

from __future__ import annotations

import difflib

from calibration.base import CalibrationSource
from calibration.image_sources import HfImageSource, ImageFolderSource, SampleImageSource
from calibration.text_sources import (
    Exl2DefaultSource,
    HfTextSource,
    JsonlSource,
    ParquetSource,
    TextFileSource,
)
from quantize.errors import CalibrationError

SOURCES: dict[str, type[CalibrationSource]] = {
    cls.kind: cls
    for cls in (
        Exl2DefaultSource,
        TextFileSource,
        JsonlSource,
        ParquetSource,
        HfTextSource,
        ImageFolderSource,
        HfImageSource,
        SampleImageSource,
    )
}


def get_source(kind: str) -> type[CalibrationSource]:
    """The class for a source kind; an unknown kind is a CalibrationError naming the nearest known kind."""
    if kind in SOURCES:
        return SOURCES[kind]
    near = difflib.get_close_matches(kind, list(SOURCES), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise CalibrationError(f"unknown calibration source '{kind}'{hint} (known: {', '.join(SOURCES)})")
