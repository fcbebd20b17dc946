"""Provenance of a quantized model folder: which tool, source and run produced it.

`compile` stamps this record into the output's config.json (under `PROVENANCE_KEY`) so that a quant found on disk
or on the Hub says how it was made: the caller's part (command, recipe, calibration fingerprint, seed, wall time)
merged with what compile itself measures (tool version, source folder and revision, its own time and peak memory,
the vision tensors' hashes). The model card is later generated from this record, never written by hand.
"""

from __future__ import annotations

import logging
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROVENANCE_KEY = "exl2_vlm"
DISTRIBUTION = "exl2-vlm"
# The EXL2 format version we write is the one exllamav2 0.3.2 reads (see shared/docs/exl2-format.md).
EXL2_FORMAT_VERSION = "0.3.2"

_HF_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


def tool_version() -> str:
    """This package's installed version; a source checkout that was never installed says so instead of guessing."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def peak_memory_bytes() -> int | None:
    """Peak resident memory of this process so far, or None where the platform does not report it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def source_revision(model_dir: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (`.../snapshots/<sha>/`), the only revision a folder reveals."""
    folder = Path(model_dir).absolute()
    if folder.parent.name == "snapshots" and _HF_SNAPSHOT.fullmatch(folder.name):
        return folder.name
    return None


def measured_record(
    *,
    model_dir: Path,
    architecture: str,
    layout: str,
    compile_seconds: float,
    vision_sha256: dict[str, str],
    config_notes: list[str],
) -> dict[str, Any]:
    """What compile knows first-hand about this output; merged over the caller's record by `merge`."""
    return {
        "tool": DISTRIBUTION,
        "tool_version": tool_version(),
        "exl2_format": EXL2_FORMAT_VERSION,
        "source": {
            "dir": str(Path(model_dir).resolve()),
            "revision": source_revision(model_dir),
            "architecture": architecture,
            "layout": layout,
        },
        "compile": {
            "seconds": round(compile_seconds, 3),
            "peak_memory_bytes": peak_memory_bytes(),
            "python": platform.python_version(),
            "config_notes": config_notes,
        },
        "vision_sha256": vision_sha256,
    }


def merge(caller: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The caller's record with compile's measurements on top: a measured fact beats a claimed one, loudly."""
    record = dict(caller)
    for key, value in measured.items():
        if key in record and record[key] != value:
            log.warning("provenance: the caller's %r is replaced by the value compile measured", key)
        record[key] = value
    return record
