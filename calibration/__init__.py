"""Calibration sets for EXL2 quantization of vision-language models.

Sources (exllamav2's default mix, local text/jsonl/parquet files, Hugging Face datasets, image folders and image
datasets) are described by a `CalibrationSpec`, built into exact [rows, length] token rows (image rows carry their
pixel values and image-token positions) deterministically from a seed, and cached under a content fingerprint.
"""

from __future__ import annotations

from calibration.base import BuildContext, CalibrationSource, SourceRows
from calibration.build import (
    CACHE_SUBDIR,
    CALIBRATION_FORMAT_VERSION,
    CalibrationSet,
    SourceSummary,
    build_calibration,
    cache_path,
    calibration_fingerprint,
)
from calibration.exl2_default import EXL2_MIX, Exl2Component, exl2_data_dir, mix_counts
from calibration.images import (
    ImageContext,
    ImageRow,
    ImageTokenIds,
    ProcessedImage,
    expand_image_tokens,
    image_token_ids,
)
from calibration.show import describe, describe_text
from calibration.sources import SOURCES, get_source
from calibration.spec import CalibrationSpec, SourceSpec, largest_remainder, parse_source
from calibration.tokens import tokenizer_fingerprint

__all__ = [
    "CACHE_SUBDIR",
    "CALIBRATION_FORMAT_VERSION",
    "EXL2_MIX",
    "SOURCES",
    "BuildContext",
    "CalibrationSet",
    "CalibrationSource",
    "CalibrationSpec",
    "Exl2Component",
    "ImageContext",
    "ImageRow",
    "ImageTokenIds",
    "ProcessedImage",
    "SourceRows",
    "SourceSpec",
    "SourceSummary",
    "build_calibration",
    "cache_path",
    "calibration_fingerprint",
    "describe",
    "describe_text",
    "exl2_data_dir",
    "expand_image_tokens",
    "get_source",
    "image_token_ids",
    "largest_remainder",
    "mix_counts",
    "parse_source",
    "tokenizer_fingerprint",
]
