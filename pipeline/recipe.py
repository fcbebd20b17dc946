"""Recipes: one YAML file naming a whole job (model, bpw targets, calibration, evaluation, work directory).

`load_recipe` reads a recipe with its `include:`s and the caller's overrides into a validated, frozen `Recipe`;
`exl2 run` chains the stages from it, and `save_resolved` writes the resolved recipe beside every output. Precedence
is CLI flag (an override) > recipe (the including file over its includes) > the defaults declared here.

Relative paths in a recipe (`work_dir`, a local model folder) are relative to the current working directory, not
to the recipe file, so that `work/<name>` lands in the same place whichever recipe names it: run the shipped recipes
from the repository root. Only `include:` paths are relative to the file that holds them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calibration.spec import CalibrationSpec, parse_source
from eval.config import EvalSpec
from pipeline.default_model import build_default_model
from pipeline.jobs import DEFAULT_HEAD_BITS, JobError, validate_targets
from quantize.errors import CalibrationError, RecipeError

log = logging.getLogger(__name__)

# What a quantization needs from a Hub checkout: config, weights, chat template, tokenizer and processor files.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]

_HF_REPO = re.compile(r"[\w.-]+/[\w.-]+")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# Keys that may be written as a bare value standing for one field of their mapping (`model: default`).
_SHORTHANDS: dict[tuple[str, ...], str] = {("model",): "source"}

ModelKind = Literal["default", "local", "hf"]


class ModelSpec(BaseModel):
    """The model a recipe quantizes: `default` (the built-in model), a local folder, or `hf:OWNER/NAME[@REVISION]`.

    `model:` may be the bare source string. A revision written after `@` is moved to `revision`, so `hf:a/b@v1`
    and `{source: hf:a/b, revision: v1}` are one recipe with one fingerprint. A local folder called `default` is
    written `./default`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(min_length=1)
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _split_revision(cls, data: Any) -> Any:
        data = {"source": data} if isinstance(data, str) else data
        source = data.get("source") if isinstance(data, dict) else None
        if not isinstance(source, str) or not source.startswith("hf:") or "@" not in source:
            return data
        source, _, revision = source.partition("@")
        if data.get("revision") not in (None, revision):
            raise ValueError(f"'{data['source']}' and revision '{data['revision']}' name different revisions")
        return {**data, "source": source, "revision": revision}

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.kind == "hf" and not _HF_REPO.fullmatch(self.repo_id):
            raise ValueError(f"'{self.source}' is not of the form hf:OWNER/NAME[@REVISION]")
        if self.revision is not None and self.kind != "hf":
            raise ValueError(f"revision '{self.revision}' given, but only hf: sources have revisions")
        return self

    @property
    def kind(self) -> ModelKind:
        if self.source == "default":
            return "default"
        return "hf" if self.source.startswith("hf:") else "local"

    @property
    def repo_id(self) -> str:
        return self.source.removeprefix("hf:")

    @property
    def label(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source


class CalibrationConfig(BaseModel):
    """Calibration sources (the strings `exl2 calibration show -s` takes, mixed by weight) and the seed that picks
    the rows. Row counts and lengths belong to the measure and quantize stages, which build separate sets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[str] = Field(default_factory=lambda: ["exl2-default"], min_length=1)
    seed: int = 0

    @field_validator("sources")
    @classmethod
    def _parse_sources(cls, sources: list[str]) -> list[str]:
        for source in sources:
            try:
                parse_source(source)
            except CalibrationError as exc:
                raise ValueError(str(exc)) from exc
        return sources

    def spec(self, *, rows: int, length: int) -> CalibrationSpec:
        return CalibrationSpec.from_strings(self.sources, rows=rows, length=length, seed=self.seed)


class MeasureConfig(BaseModel):
    """Calibration size of the measurement; exllamav2's own is 19 rows of 2048 tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int = Field(default=19, ge=1)
    length: int = Field(default=2048, ge=16)


class QuantizeConfig(BaseModel):
    """Targets and calibration size of the quantize stage: one EXL2 folder per bpw target, all from one measurement.

    `bpw` is kept sorted without repeats (the order the quants are made in); targets and head bits are checked by
    `pipeline.jobs.validate_targets`, the same check `exl2 quantize` makes. exllamav2's calibration is 115 rows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bpw: list[float] = Field(min_length=1)
    head_bits: int = DEFAULT_HEAD_BITS
    rows: int = Field(default=115, ge=1)
    length: int = Field(default=2048, ge=16)
    shard_size_mb: float = Field(default=8192, gt=0)

    @field_validator("bpw")
    @classmethod
    def _sorted_targets(cls, bpw: list[float]) -> list[float]:
        return sorted(set(bpw))

    @model_validator(mode="after")
    def _check_targets(self) -> QuantizeConfig:
        try:
            validate_targets(self.bpw, self.head_bits)
        except JobError as exc:
            raise ValueError(str(exc)) from exc
        return self


class UploadConfig(BaseModel):
    """Where the upload stage publishes the quants (one branch per quant; `repo: null` uploads nothing), and the
    quality gates a quant must pass to be published (None: not checked)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str | None = None
    private: bool = False
    max_kl_mean: float | None = Field(default=None, gt=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)


class Recipe(BaseModel):
    """A whole job, validated. `device` runs measure and quantize (`auto`: CUDA when present, else CPU);
    evaluation has its own under `eval:`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    model: ModelSpec
    work_dir: Path
    device: str = "auto"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    quantize: QuantizeConfig
    eval: EvalSpec = Field(default_factory=EvalSpec)
    upload: UploadConfig = Field(default_factory=UploadConfig)

    @field_validator("work_dir")
    @classmethod
    def _expand_home(cls, work_dir: Path) -> Path:
        return work_dir.expanduser()

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"'{device}' is not one of auto, cpu, cuda, cuda:N")
        return device

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain JSON-able data, every default filled in (what `save_resolved` writes)."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no spaces) of `resolved()`: equal recipes, however written
        (key order, includes, overrides, defaults left out), have equal fingerprints."""
        canonical = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def measure_calibration(self) -> CalibrationSpec:
        return self.calibration.spec(rows=self.measure.rows, length=self.measure.length)

    def quantize_calibration(self) -> CalibrationSpec:
        return self.calibration.spec(rows=self.quantize.rows, length=self.quantize.length)


# ---------------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read, merge and validate a recipe.

    `include:` (a file name or a list of them, relative to the including file) loads other recipe files first, in
    order; the including file's values deep-merge over theirs (mappings merge key by key, lists and scalars replace).
    `overrides` maps dotted keys to values (`{"quantize.bpw": [4.0]}`) and is applied last; a value of None sets
    null, so pass only the flags that were given. Every problem is a RecipeError naming the file.
    """
    path = Path(path)
    data, origins = _load_tree(path, chain=())
    for dotted, value in (overrides or {}).items():
        _apply_override(path, data, dotted, value, origins)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_describe(exc, origins, top=str(path))}") from exc


def save_resolved(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML (temp name, then rename); `load_recipe` reads it back to an equal recipe."""
    header = (
        f"# Resolved recipe '{recipe.name}': includes, overrides and defaults applied.\n"
        f"# fingerprint: sha256:{recipe.fingerprint()}\n"
    )
    text = header + yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _load_tree(path: Path, *, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[tuple[Any, ...], str]]:
    """A recipe file merged over its includes, and the file that set each leaf key (for error messages)."""
    if path.resolve() in [p.resolve() for p in chain]:
        names = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"{chain[0]}: include cycle: {names}")
    own = _read_mapping(path)
    merged: dict[str, Any] = {}
    origins: dict[tuple[Any, ...], str] = {}
    for name, include in _include_paths(path, own.pop("include", None)):
        if not include.is_file():
            raise RecipeError(f"{path}: include '{name}' not found (looked for {include})")
        data, include_origins = _load_tree(include, chain=(*chain, path))
        _deep_merge(merged, data)
        origins.update(include_origins)
    _deep_merge(merged, own)
    origins.update(dict.fromkeys(_leaf_paths(own), str(path)))
    return merged, origins


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        found = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{path}: the top level is {found}; a recipe is a mapping (name: ..., model: ..., ...)")
    return data


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (plain PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key_node.value}' appears twice", key_node.start_mark
                )
            seen.add(key_node.value)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _include_paths(path: Path, include: Any) -> list[tuple[str, Path]]:
    names = [include] if isinstance(include, str) else include
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise RecipeError(f"{path}: include must be a file name or a list of file names, not {include!r}")
    return [(name, path.parent / name) for name in names]


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    """Merge `over` into `base`: mappings key by key, anything else (lists included) replaces."""
    for key, value in over.items():
        if isinstance(base.get(key), dict) and isinstance(value, Mapping):
            _deep_merge(base[key], value)
        else:
            base[key] = _copy_tree(value)


def _copy_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy_tree(item) for key, item in value.items()}
    return [_copy_tree(item) for item in value] if isinstance(value, list) else value


def _leaf_paths(data: Mapping[str, Any], prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths: list[tuple[Any, ...]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            paths.extend(_leaf_paths(value, (*prefix, key)))
        else:
            paths.append((*prefix, key))
    return paths


def _apply_override(
    path: Path, data: dict[str, Any], dotted: str, value: Any, origins: dict[tuple[Any, ...], str]
) -> None:
    keys = tuple(dotted.split("."))
    if not all(keys):
        raise RecipeError(f"{path}: override key '{dotted}' is not a dotted key like quantize.bpw")
    node = data
    for depth, key in enumerate(keys[:-1], start=1):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif keys[:depth] in _SHORTHANDS and not isinstance(child, dict):
            child = node[key] = {_SHORTHANDS[keys[:depth]]: child}
        if not isinstance(child, dict):
            where = ".".join(keys[:depth])
            raise RecipeError(f"{path}: override '{dotted}': '{where}' is a {type(child).__name__}, not a mapping")
        node = child
    node[keys[-1]] = _copy_tree(value)
    for stale in [loc for loc in origins if loc[: len(keys)] == keys]:
        del origins[stale]
    origins[keys] = "an override"


# ---------------------------------------------------------------------------------------------------- messages


def _describe(exc: ValidationError, origins: Mapping[tuple[Any, ...], str], *, top: str) -> str:
    """pydantic's errors as one line: unknown keys with a suggestion, bad values, then the missing keys."""
    problems, missing = [], []
    for error in exc.errors():
        loc = tuple(error["loc"])
        dotted = ".".join(map(str, loc))
        if error["type"] == "missing":
            missing.append(f"'{dotted}'")
            continue
        if error["type"] == "extra_forbidden":
            text = f"unknown key '{dotted}'{_suggestion(loc)}"
        else:
            message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
            text = f"{dotted}: {message}" if dotted else message
        problems.append(text + _origin_note(loc, origins, top=top))
    if missing:
        problems.append(f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return "; ".join(problems)


def _suggestion(loc: tuple[Any, ...]) -> str:
    known = _known_keys(loc[:-1])
    if not known:
        return ""
    prefix = "".join(f"{part}." for part in loc[:-1])
    near = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" (did you mean '{prefix}{near[0]}'?)" if near else f" (known here: {', '.join(known)})"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys a recipe accepts at `loc` (a path into the Recipe model; list indexes are skipped)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    return [*model.model_fields, "include"] if model is Recipe else list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's type (`X`, `X | None`, `list[X]`), if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


def _origin_note(loc: tuple[Any, ...], origins: Mapping[tuple[Any, ...], str], *, top: str) -> str:
    """Which file set the value at `loc`, when it is one file other than the one loaded."""
    files = {f for path, f in origins.items() if path[: len(loc)] == loc or loc[: len(path)] == path}
    if len(files) != 1 or top in files:
        return ""
    (origin,) = files
    return " (set by an override)" if origin == "an override" else f" (set in {origin})"


# ---------------------------------------------------------------------------------------------------- models


def resolve_model(spec: ModelSpec, *, cache_dir: Path | None = None) -> Path:
    """The model folder a recipe names: the built-in default model (built into `cache_dir` on first use), a local
    folder (relative to the current directory), or a Hub snapshot (in the Hugging Face cache, `HF_HOME`)."""
    if spec.kind == "default":
        log.info("model: the built-in default model (recipe says 'default')")
        return build_default_model(cache_dir=cache_dir)
    if spec.kind == "hf":
        return _download(spec)
    folder = Path(spec.source).expanduser().absolute()
    if not folder.is_dir():
        raise RecipeError(f"model folder {folder} does not exist (relative paths start at the current directory)")
    if not (folder / "config.json").is_file():
        raise RecipeError(f"model folder {folder} has no config.json; a transformers model folder is needed")
    return folder


def _download(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Most specific first: a gated repository is also a RepositoryNotFoundError.
    remedies: list[tuple[type[Exception], str]] = [
        (GatedRepoError, "is gated: accept its terms on its Hub page, then log in with `hf auth login`"),
        (RepositoryNotFoundError, "was not found on the Hub (if it is private, log in with `hf auth login`)"),
        (RevisionNotFoundError, f"has no revision '{spec.revision}'"),
        (LocalEntryNotFoundError, "is not in the local cache and the Hub cannot be reached; connect, or download "
                                  "it elsewhere and give its folder as model:"),
    ]  # fmt: skip
    log.info("model: %s from the Hub (files %s; reused from the cache when present)", spec.label, HF_ALLOW_PATTERNS)
    try:
        folder = snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=HF_ALLOW_PATTERNS)
    except tuple(kind for kind, _ in remedies) as exc:
        remedy = next(text for kind, text in remedies if isinstance(exc, kind))
        raise RecipeError(f"model {spec.label} {remedy}") from exc
    model_dir = Path(cast(str, folder))
    if not (model_dir / "config.json").is_file():
        raise RecipeError(
            f"model {spec.label} has no config.json: not a transformers checkout (for a model published in "
            "Mistral's consolidated format, use its transformers port, e.g. hf:mistral-community/pixtral-12b)"
        )
    return model_dir
