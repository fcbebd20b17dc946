"""The contract every calibration source implements, and small file helpers the sources share.

A source turns its `SourceSpec` into an identity (what its rows depend on, for the cache fingerprint, computed
without tokenizing) and, given a `BuildContext`, into exactly the rows asked for, or a CalibrationError.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quantize.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.images import ImageContext, ImageRow
    from calibration.spec import SourceSpec


@dataclass
class BuildContext:
    """What a source needs to build rows: the tokenizer, row length, this source's seed, the image side."""

    tokenizer: Any
    length: int
    seed: int
    image_context: ImageContext | None = None


@dataclass
class SourceRows:
    """A source's rows: `input_ids` [rows, length], image rows (row index local to this source), and counts."""

    input_ids: torch.Tensor
    images: list[ImageRow] = field(default_factory=list)
    available_tokens: int | None = None
    parts: dict[str, int] = field(default_factory=dict)


class CalibrationSource(ABC):
    """One kind of calibration source. Subclasses set `kind`, `needs` ("path", "name" or None) and `summary`."""

    kind: ClassVar[str]
    needs: ClassVar[str | None] = None
    is_image: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec

    @classmethod
    def validate_spec(cls, spec: SourceSpec) -> None:
        if cls.needs and not getattr(spec, cls.needs):
            raise CalibrationError(f"calibration source kind '{spec.kind}' needs a {cls.needs}")

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the rows depend on besides tokenizer/rows/length/seed (content hashes, dataset fingerprints)."""

    @abstractmethod
    def build(self, ctx: BuildContext, rows: int) -> SourceRows:
        """Exactly `rows` rows of exactly `ctx.length` tokens, or a CalibrationError."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_name(path: Path, root: Path) -> str:
    return path.name if path == root else path.relative_to(root).as_posix()


def existing_path(path: str | None, where: str) -> Path:
    resolved = Path(path or "").expanduser()
    if not resolved.exists():
        raise CalibrationError(f"{where}: no such file or folder")
    return resolved


def read_text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{where}: '{path.name}' is not UTF-8 text (byte {exc.start})") from exc


def jsonl_objects(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines text; a line that is not valid JSON, or not a
    JSON object, is a ValueError naming the line (callers add which file and raise their own error type)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(value, dict):
            raise ValueError(f"line {number} is a {type(value).__name__}, not a JSON object")
        yield number, value
