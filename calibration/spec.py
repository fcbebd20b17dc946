"""What a calibration set is made of: typed source and set specifications, and the short CLI strings for them.

A `CalibrationSpec` lists `SourceSpec`s mixed by weight (rows split by largest remainder), the row count, the
row length in tokens and the seed. `parse_source` reads the strings the CLI takes (grammar in its docstring).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantize.errors import CalibrationError

DEFAULT_IMAGE_PROMPT = "Describe this image."

# Option keys accepted after `#` in a source string (`key=value`), mapped to SourceSpec fields.
_OPTION_KEYS: dict[str, str] = {
    "text": "text_field",
    "field": "text_field",
    "column": "text_field",
    "image": "image_field",
    "prompt": "prompt",
    "prompt_field": "prompt_field",
    "question": "prompt_field",
    "weight": "weight",
    "max_edge": "max_image_edge",
    "filler": "filler",
}

# Kinds whose text lives in a local path (the part after `kind:`) rather than a dataset name.
_PATH_KINDS = {"text", "jsonl", "parquet", "images"}
_NAME_KINDS = {"hf", "hf-images"}
_BARE_KINDS = {"exl2-default", "sample-images"}


class SourceSpec(BaseModel):
    """One calibration source. Which fields matter depends on `kind` (see `calibration.sources.SOURCES`).

    `text_field=None` means the column "text", falling back (with a log line) to exllamav2's join of all columns
    when there is no such column; a named field that is missing is an error. For image sources `text_field` is
    the caption/answer column and `prompt_field` the question column; `prompt` is used when a row has none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    path: str | None = None
    name: str | None = None
    config_name: str | None = None
    split: str | None = None
    text_field: str | None = None
    image_field: str = "image"
    prompt_field: str | None = None
    prompt: str = DEFAULT_IMAGE_PROMPT
    weight: float = Field(default=1.0, gt=0)
    max_image_edge: int | None = Field(default=None, gt=0)
    filler: str | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> SourceSpec:
        # Imported here: the registry imports this module for its types.
        from calibration.sources import get_source

        get_source(self.kind).validate_spec(self)
        return self

    @property
    def is_image(self) -> bool:
        from calibration.sources import get_source

        return get_source(self.kind).is_image

    @property
    def label(self) -> str:
        """The short string form of this source (what `parse_source` reads back)."""
        if self.kind in _BARE_KINDS:
            head = self.kind
        elif self.kind in _PATH_KINDS:
            head = f"{self.kind}:{self.path}"
        else:
            head = f"{self.kind}:{self.name}"
            head += f":{self.config_name}" if self.config_name else ""
            head += f"@{self.split}" if self.split else ""
        return head + _label_options(self)


def _label_options(spec: SourceSpec) -> str:
    defaults = SourceSpec.model_fields
    parts = []
    for key, attr in _OPTION_KEYS.items():
        value = getattr(spec, attr)
        if value != defaults[attr].default and key not in {"field", "column", "question"}:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return "#" + ",".join(parts) if parts else ""


class CalibrationSpec(BaseModel):
    """The whole calibration set: sources mixed by weight, `rows` rows of exactly `length` tokens, a seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="exl2-default")], min_length=1)
    rows: int = Field(gt=0)
    length: int = Field(gt=0)
    seed: int = 0

    @classmethod
    def from_strings(cls, sources: Sequence[str] | None, *, rows: int, length: int, seed: int = 0) -> CalibrationSpec:
        """Build from CLI source strings; none (or an empty list) means exllamav2's default mix."""
        specs = [parse_source(s) for s in sources] if sources else [SourceSpec(kind="exl2-default")]
        return cls(sources=specs, rows=rows, length=length, seed=seed)

    def allocate(self) -> list[int]:
        """Rows per source, in source order, by weight (largest remainder)."""
        return largest_remainder([s.weight for s in self.sources], self.rows)

    @property
    def has_images(self) -> bool:
        return any(s.is_image for s in self.sources)


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Split `total` into integers proportional to `weights` (Hamilton's method).

    Ties in the remainders go to the earlier entry so the split is deterministic.
    """
    if total < 0 or not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"cannot split {total} by weights {list(weights)}")
    scale = total / sum(weights)
    quotas = [w * scale for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def parse_source(text: str) -> SourceSpec:
    """Read one source string.

    Grammar (options after `#` are comma-separated; a bare item is the source's main field)::

        exl2-default[#weight=W]
        text:PATH                          a .txt/.md file, or a folder of them
        jsonl:PATH[#FIELD]                 FIELD defaults to "text"
        parquet:PATH[#COLUMN]
        hf:NAME[:CONFIG][@SPLIT][#FIELD]   NAME: a save_to_disk folder, a folder of data files, or a hub name
        images:DIR[#OPTIONS]               images with same-stem .txt captions or a captions.jsonl
        hf-images:NAME[:CONFIG][@SPLIT][#IMAGE_FIELD]
        sample-images[#OPTIONS]            the photographs inside scikit-image, each with a prompt and description

    OPTIONS: text=, image=, prompt=, prompt_field= (alias question=), weight=, max_edge=, filler=.
    """
    text = text.strip()
    head, _, fragment = text.partition("#")
    kind, sep, rest = head.partition(":")
    fields: dict[str, Any] = {"kind": kind.strip()}
    if kind in _PATH_KINDS:
        if not rest:
            raise CalibrationError(f"calibration source '{text}' needs a path: {kind}:PATH")
        fields["path"] = rest
    elif kind in _NAME_KINDS:
        fields.update(_parse_dataset_ref(text, rest))
    elif sep and kind in _BARE_KINDS:
        raise CalibrationError(f"calibration source '{text}': {kind} takes no argument")
    fields.update(_parse_options(text, fields["kind"], fragment))
    try:
        return SourceSpec(**fields)
    except CalibrationError:
        raise
    except ValueError as exc:  # pydantic's ValidationError; keep the message to one line
        first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc)}
        raise CalibrationError(f"calibration source '{text}': {first['msg']}") from exc


def _parse_dataset_ref(text: str, rest: str) -> dict[str, Any]:
    if not rest:
        raise CalibrationError(f"calibration source '{text}' needs a dataset: hf:NAME[:CONFIG][@SPLIT]")
    name_config, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    name, _, config = name_config.partition(":")
    return {"name": name, "config_name": config or None, "split": split or None}


def _parse_options(text: str, kind: str, fragment: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in fragment.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            options[_main_field(text, kind)] = item
            continue
        key = key.strip()
        if key not in _OPTION_KEYS:
            near = difflib.get_close_matches(key, list(_OPTION_KEYS), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise CalibrationError(
                f"calibration source '{text}': unknown option '{key}'{hint} (known: {', '.join(_OPTION_KEYS)})"
            )
        options[_OPTION_KEYS[key]] = value.strip()
    return options


def _main_field(text: str, kind: str) -> str:
    if kind in {"jsonl", "parquet", "hf"}:
        return "text_field"
    if kind == "hf-images":
        return "image_field"
    raise CalibrationError(f"calibration source '{text}': {kind} takes only key=value options after '#'")
