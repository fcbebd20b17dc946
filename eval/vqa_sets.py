"""Labelled VQA sets: load the rows a `VqaSetSpec` names, build each item's prompt, score predictions.

The evaluation stage calls :func:`load_vqa_set` once per set, asks :meth:`VqaSet.prompt` for the text shown after
each image, generates answers, and scores them with :meth:`VqaSet.score`. :data:`KINDS` holds, per well-known set,
the field names of its Hugging Face layout, its standard metric (`eval.vqa_metrics.METRICS`) and its prompt; explicit
spec fields override the preset. The set's `fingerprint` keys cached results: it changes whenever the data do.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from calibration.base import jsonl_objects
from eval.config import VqaSetSpec
from eval.vqa_metrics import METRICS
from quantize.errors import CalibrationError, EvalError

log = logging.getLogger(__name__)

SHORT_ANSWER_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
CHOICE_TEMPLATE = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."

# The metric whose reference is an option letter and whose scorer also needs the options.
CHOICE_METRIC = "mc_accuracy"
# Other spellings accepted in a spec, mapped to their METRICS key.
METRIC_ALIASES = {"multiple_choice_accuracy": CHOICE_METRIC}
# The prompt a `custom` set gets, by metric (the presets name their own).
TEMPLATE_BY_METRIC = {CHOICE_METRIC: CHOICE_TEMPLATE}

_LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Preset:
    """Defaults of one kind of set. Each field tuple lists candidate column names; the first one present wins."""

    image_fields: tuple[str, ...]
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]
    options_fields: tuple[str, ...]
    id_fields: tuple[str, ...]
    metric: str | None
    template: str | None  # None: chosen by metric (TEMPLATE_BY_METRIC, else SHORT_ANSWER_TEMPLATE)


KINDS: dict[str, Preset] = {
    # HuggingFaceM4/ChartQA: `label` is a list holding one string.
    "chartqa": Preset(("image",), ("query", "question"), ("label", "answer", "answers"), (), ("id",),
                      "relaxed_accuracy", SHORT_ANSWER_TEMPLATE),
    # lmms-lab/DocVQA (config DocVQA): several accepted answers.
    "docvqa": Preset(("image",), ("question",), ("answers", "answer"), (), ("questionId", "question_id", "id"),
                     "anls", SHORT_ANSWER_TEMPLATE),
    # lmms-lab/textvqa: ten human answers.
    "textvqa": Preset(("image",), ("question",), ("answers",), (), ("question_id", "id"),
                      "vqa_accuracy", SHORT_ANSWER_TEMPLATE),
    # VQAv2 layouts: answers as strings or as {"answer": ...} records.
    "vqav2": Preset(("image",), ("question",), ("answers", "answer"), (), ("question_id", "id"),
                    "vqa_accuracy", SHORT_ANSWER_TEMPLATE),
    # lmms-lab/ai2d: `answer` is the 0-based index of the right option (as a string, e.g. "2").
    "ai2d": Preset(("image",), ("question",), ("answer",), ("options", "choices"), ("id", "question_id"),
                   CHOICE_METRIC, CHOICE_TEMPLATE),
    # Fields and metric come from the spec; only the image, options and id columns have defaults.
    "custom": Preset(("image",), (), (), ("options", "choices"), ("id", "question_id"), None, None),
}  # fmt: skip


@dataclass(frozen=True)
class VqaItem:
    """One question: its RGB image, the raw question, every reference answer (for multiple choice, the right
    option's letter) and, for multiple choice, the options in order."""

    id: str
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()


@dataclass
class VqaSet:
    """A loaded set. `fingerprint` is sha256 over the metric, the prompt template and every item's id, question,
    answers, options and decoded RGB pixels (mode, size, raw bytes)."""

    spec: VqaSetSpec
    metric: str
    items: list[VqaItem]
    fingerprint: str

    @property
    def template(self) -> str:
        return _template(self.spec.kind, self.metric)

    def prompt(self, item: VqaItem) -> str:
        """The text shown to the model after the image: the question, the lettered options, the answer format."""
        options = "\n".join(f"{_LETTERS[i]}. {option}" for i, option in enumerate(item.options))
        return self.template.format(question=item.question, options=options)

    def item_scores(self, predictions: Sequence[str]) -> list[float]:
        """The metric of each prediction against its item (predictions aligned with `items`), each in [0, 1]."""
        if len(predictions) != len(self.items):
            raise EvalError(
                f"VQA set '{self.spec.name}': {len(predictions)} predictions for {len(self.items)} items; "
                "pass one prediction per item, in item order"
            )
        fn = METRICS[self.metric]
        if self.metric == CHOICE_METRIC:
            return [fn(p, item.options, item.answers[0]) for p, item in zip(predictions, self.items, strict=True)]
        return [fn(p, item.answers) for p, item in zip(predictions, self.items, strict=True)]

    def score(self, predictions: Sequence[str]) -> float:
        """Mean of :meth:`item_scores` (the set's metric, a fraction in [0, 1])."""
        scores = self.item_scores(predictions)
        return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Fields:
    """The candidate column names of each field after spec overrides; `options` empty means none are read."""

    image: tuple[str, ...]
    question: tuple[str, ...]
    answer: tuple[str, ...]
    options: tuple[str, ...]
    id: tuple[str, ...]


def load_vqa_set(spec: VqaSetSpec, *, base_dir: Path | None = None) -> VqaSet:
    """Load the first `spec.limit` rows of the set, in order. `base_dir` resolves relative `jsonl:` paths and
    relative `hf:` folders. Every problem is an EvalError naming the set and its file or dataset."""
    metric = _resolve_metric(spec)
    fields = _resolve_fields(spec, metric)
    rows, image_root = _read_rows(spec, base_dir)
    items = [_make_item(spec, fields, row, where, image_root, index) for index, (row, where) in enumerate(rows)]
    if not items:
        raise EvalError(f"VQA set '{spec.name}' ({spec.source}) has no rows; point it at a non-empty set")
    log.info(
        "VQA set '%s': %d items from %s (kind %s, metric %s, fields image=%s question=%s answer=%s%s)",
        spec.name, len(items), spec.source, spec.kind, metric, "/".join(fields.image), "/".join(fields.question),
        "/".join(fields.answer), f" options={'/'.join(fields.options)}" if fields.options else "",
    )  # fmt: skip
    return VqaSet(spec=spec, metric=metric, items=items, fingerprint=_fingerprint(items, metric, spec.kind))


def _template(kind: str, metric: str) -> str:
    return KINDS[kind].template or TEMPLATE_BY_METRIC.get(metric, SHORT_ANSWER_TEMPLATE)


def _resolve_metric(spec: VqaSetSpec) -> str:
    preset = KINDS[spec.kind]
    metric = spec.metric or preset.metric
    if metric is None:
        raise EvalError(f"VQA set '{spec.name}' (kind custom) needs a metric; choose one of {', '.join(METRICS)}")
    metric = METRIC_ALIASES.get(metric, metric)
    if metric not in METRICS:
        near = difflib.get_close_matches(metric, list(METRICS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise EvalError(f"VQA set '{spec.name}': unknown metric '{metric}'{hint}; choose one of {', '.join(METRICS)}")
    return metric


def _resolve_fields(spec: VqaSetSpec, metric: str) -> _Fields:
    preset = KINDS[spec.kind]

    def pick(explicit: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
        return (explicit,) if explicit else defaults

    question = pick(spec.question_field, preset.question_fields)
    answer = pick(spec.answer_field, preset.answer_fields)
    missing = [name for name, value in (("question_field", question), ("answer_field", answer)) if not value]
    if missing:
        raise EvalError(f"VQA set '{spec.name}' (kind {spec.kind}) needs {' and '.join(missing)} in its spec")
    options = pick(spec.options_field, preset.options_fields) if metric == CHOICE_METRIC else ()
    if spec.options_field and metric != CHOICE_METRIC:
        log.warning("VQA set '%s': options_field ignored, metric %s has no options", spec.name, metric)
    image = pick(spec.image_field, preset.image_fields)
    return _Fields(image=image, question=question, answer=answer, options=options, id=preset.id_fields)


def _read_rows(spec: VqaSetSpec, base_dir: Path | None) -> tuple[Iterator[tuple[Mapping[str, Any], str]], Path]:
    """(row, where-it-came-from) pairs, at most `limit` of them, and the folder relative image paths start from."""
    scheme, _, rest = spec.source.partition(":")
    if scheme == "jsonl" and rest:
        path = _resolve_path(rest, base_dir)
        return _jsonl_rows(spec, path), path.parent
    if scheme == "hf" and rest:
        return _hf_rows(spec, rest, base_dir), (base_dir or Path.cwd())
    raise EvalError(
        f"VQA set '{spec.name}': source '{spec.source}' is neither 'jsonl:PATH' nor 'hf:NAME[:CONFIG][@SPLIT]'"
    )


def _resolve_path(text: str, base_dir: Path | None) -> Path:
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _jsonl_rows(spec: VqaSetSpec, path: Path) -> Iterator[tuple[Mapping[str, Any], str]]:
    # Read eagerly up to `limit` so a missing file fails at load time, not half-way through.
    if not path.is_file():
        raise EvalError(f"VQA set '{spec.name}': jsonl file {path} not found")
    rows: list[tuple[Mapping[str, Any], str]] = []
    with path.open(encoding="utf-8") as handle:
        try:
            for number, row in jsonl_objects(handle):
                rows.append((row, f"{path} line {number}"))
                if len(rows) >= spec.limit:
                    break
        except ValueError as exc:
            raise EvalError(f"VQA set '{spec.name}': {path} {exc}") from exc
    return iter(rows)


def _parse_hf(text: str) -> tuple[str, str | None, str | None]:
    """`NAME[:CONFIG][@SPLIT]` → (name, config, split)."""
    head, at, split = text.rpartition("@") if "@" in text else (text, "", "")
    name, _, config = head.partition(":")
    return name, config or None, (split if at else None)


def _hf_rows(spec: VqaSetSpec, text: str, base_dir: Path | None) -> Iterator[tuple[Mapping[str, Any], str]]:
    import datasets

    from calibration.hfdata import load_hf_dataset

    name, config, split = _parse_hf(text)
    local = _resolve_path(name, base_dir)
    if local.exists():
        name = str(local)
    try:
        dataset = load_hf_dataset(name, config_name=config, split=split)
    except CalibrationError as exc:
        raise EvalError(f"VQA set '{spec.name}': {exc}") from exc
    dataset = dataset.select(range(min(spec.limit, len(dataset))))
    # Undecoded images, so that a corrupt one is reported by our loader with its row rather than by `datasets`.
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return ((row, f"hf dataset '{name}' row {index}") for index, row in enumerate(dataset))


# ---------------------------------------------------------------------------------------------------------- rows


def _make_item(
    spec: VqaSetSpec, fields: _Fields, row: Mapping[str, Any], where: str, image_root: Path, index: int
) -> VqaItem:
    def value(candidates: tuple[str, ...], what: str) -> Any:
        for name in candidates:
            if name in row and row[name] is not None:
                return row[name]
        raise EvalError(
            f"VQA set '{spec.name}': {where} has no {what} field ({' or '.join(candidates)}); "
            f"its fields are: {', '.join(row)}"
        )

    question = str(value(fields.question, "question"))
    answers = _answers(value(fields.answer, "answer"))
    if not answers:
        raise EvalError(f"VQA set '{spec.name}': {where} has no reference answer")
    options: tuple[str, ...] = ()
    if fields.options:
        options = tuple(str(o) for o in value(fields.options, "options"))
        answers = (_choice_letter(answers[0], options, spec=spec, where=where),)
    # Without an id column the position in the set is the id.
    item_id = next((str(row[n]) for n in fields.id if row.get(n) is not None), str(index))
    image = _load_image(value(fields.image, "image"), image_root, spec=spec, where=where)
    return VqaItem(id=item_id, image=image, question=question, answers=answers, options=options)


def _answers(raw: Any) -> tuple[str, ...]:
    """Reference answers from a string, a number, a list of those, or a list of {"answer": ...} records."""
    items = raw if isinstance(raw, list | tuple) else [raw]
    out = []
    for item in items:
        text = item.get("answer") if isinstance(item, Mapping) else item
        if text is not None and str(text).strip():
            out.append(str(text))
    return tuple(out)


def _choice_letter(answer: str, options: tuple[str, ...], *, spec: VqaSetSpec, where: str) -> str:
    """The right option's letter from a 0-based index ("2" → "C"), the option's text, or a letter."""
    text = answer.strip()
    if text.lstrip("-").isdigit():  # AI2D's convention comes first, even when the options are numbers
        index = int(text)
    elif text in options:
        index = options.index(text)
    elif len(text) == 1 and text.upper() in _LETTERS:
        index = _LETTERS.index(text.upper())
    else:
        raise EvalError(
            f"VQA set '{spec.name}': {where} answer {answer!r} is neither an option index, letter nor option text"
        )
    if not 0 <= index < len(options):
        raise EvalError(
            f"VQA set '{spec.name}': {where} answer {answer!r} is out of range for its {len(options)} options"
        )
    return _LETTERS[index]


def _load_image(raw: Any, root: Path, *, spec: VqaSetSpec, where: str) -> Image.Image:
    """An RGB image from a PIL image, encoded bytes, a {"bytes", "path"} record or a path (relative to `root`)."""
    if isinstance(raw, Image.Image):
        return raw.convert("RGB")
    if isinstance(raw, Mapping):
        raw = raw.get("bytes") or raw.get("path")
    if isinstance(raw, bytes | bytearray):
        source: Any = io.BytesIO(raw)
        label = "its image bytes"
    elif isinstance(raw, str) and raw:
        source = Path(raw).expanduser()
        source = source if source.is_absolute() else root / source
        label = f"image {source}"
    else:
        raise EvalError(f"VQA set '{spec.name}': {where} has no usable image (got {type(raw).__name__})")
    try:
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EvalError(f"VQA set '{spec.name}': {where}: cannot read {label} ({exc})") from exc


def _fingerprint(items: Sequence[VqaItem], metric: str, kind: str) -> str:
    digest = hashlib.sha256()
    header = {"metric": metric, "template": _template(kind, metric)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item in items:
        text = [item.id, item.question, list(item.answers), list(item.options), item.image.mode, item.image.size]
        digest.update(json.dumps(text).encode())
        digest.update(item.image.tobytes())
    return digest.hexdigest()
