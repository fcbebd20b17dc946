"""Image+text calibration sources: a folder of images, or a Hugging Face dataset with an image column.

Each image row is: the chat-formatted prompt with the image (its one placeholder expanded to the image's token
grid), the caption/answer as the assistant turn when the source has one, then EOS and filler text up to the row
length. The filler is ordinary text so the rest of the row still calibrates the language model after an image:
by default exllamav2's c4 text (always installed), or the `filler=PATH` text file/folder of the source. Filler
windows start at seeded offsets. An image block that does not fit the row is a CalibrationError; a long caption is cut.
"""

from __future__ import annotations

import io
import logging
import random
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from calibration.base import (
    BuildContext,
    CalibrationSource,
    SourceRows,
    existing_path,
    file_sha256,
    jsonl_objects,
    relative_name,
)
from calibration.exl2_default import exl2_data_file, exl2_data_identity
from calibration.hfdata import HfDatasetRef
from calibration.images import ImageContext, ImageRow, expand_prompt
from calibration.tokens import special_id, stream_tokens
from quantize.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.spec import SourceSpec

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTIONS_FILE = "captions.jsonl"
_FILE_KEYS = ("file", "file_name", "image", "path")


@dataclass(frozen=True)
class ImageItem:
    """One candidate image; `fetch` returns (image, prompt or None, caption/answer or None) when it is used."""

    label: str
    fetch: Callable[[], tuple[Image.Image, str | None, str | None]]


class ImageSource(CalibrationSource):
    """Shared row building of the image sources; subclasses list their items and identity."""

    is_image = True

    @property
    def where(self) -> str:
        return f"{self.kind} source '{self.spec.path or self.spec.name}'"

    @abstractmethod
    def items(self) -> list[ImageItem]:
        """Every usable image, in a stable order."""

    @abstractmethod
    def content_identity(self) -> dict[str, Any]:
        """Hashes of the images and captions."""

    def identity(self) -> dict[str, Any]:
        return {**self.content_identity(), "filler": self.filler_identity()}

    def build(self, ctx: BuildContext, rows: int) -> SourceRows:
        image_ctx = self._image_context(ctx)
        items = self.items()
        if len(items) < rows:
            raise CalibrationError(f"{self.where} has {len(items):,} images; {rows:,} image rows need one each")
        rng = random.Random(ctx.seed)
        picks = sorted(rng.sample(range(len(items)), rows))
        filler = self.filler_tokens(ctx.tokenizer, budget=rows * ctx.length)
        out: list[list[int]] = []
        images: list[ImageRow] = []
        reasons: set[str] = set()
        for r, k in enumerate(picks):
            ids, image_row, reason = self._row(items[k], ctx, image_ctx, filler, rng)
            image_row.row = r
            out.append(ids)
            images.append(image_row)
            if reason and reason not in reasons:
                reasons.add(reason)
                log.warning(
                    "%s: image rows use image tokens + prompt text without the chat template: %s", self.where, reason
                )
        return SourceRows(input_ids=torch.tensor(out, dtype=torch.long), images=images, available_tokens=len(filler))

    def _image_context(self, ctx: BuildContext) -> ImageContext:
        if ctx.image_context is None:
            raise CalibrationError(
                f"{self.where} needs the model's image processor: pass image_context=ImageContext.from_model_dir(...)"
            )
        ctx.image_context.check_tokenizer(ctx.tokenizer)
        return ctx.image_context

    def _row(
        self, item: ImageItem, ctx: BuildContext, image_ctx: ImageContext, filler: list[int], rng: random.Random
    ) -> tuple[list[int], ImageRow, str | None]:
        image, prompt, answer = item.fetch()
        processed = image_ctx.process_image(image, max_edge=self.spec.max_image_edge)
        prompt_ids, reason = image_ctx.prompt_ids(ctx.tokenizer, prompt or self.spec.prompt, answer)
        ids, start, end = expand_prompt(prompt_ids, processed.token_ids)
        if end > ctx.length:
            rows, cols = processed.grid
            raise CalibrationError(
                f"{self.where}: image '{item.label}' is {rows}×{cols} patches = {len(processed.token_ids):,} image "
                f"tokens from position {start}; rows are {ctx.length:,} tokens (use longer rows or #max_edge=N)"
            )
        ids = ids[: ctx.length]
        eos = special_id(ctx.tokenizer, "eos")
        # End the chat turn with EOS before the filler unless the template already did.
        ids += _fill(ctx.length - len(ids), filler, rng, eos if ids[-1] != eos else None)
        positions = [i for i in range(start, end) if ids[i] == image_ctx.token_ids.image]
        image_row = ImageRow(
            row=0,
            pixel_values=processed.pixel_values,
            image_sizes=[processed.image_size],
            image_token_positions=torch.tensor(positions, dtype=torch.long),
            span=(start, end),
            source=self.spec.label,
        )
        return ids, image_row, reason

    def filler_identity(self) -> dict[str, Any]:
        if self.spec.filler:
            path = existing_path(self.spec.filler, f"{self.where} filler")
            return {"path": self.spec.filler, "sha256": file_sha256(path) if path.is_file() else _tree_hash(path)}
        return {"exl2": "c4", "sha256": exl2_data_identity()["c4"]}

    def filler_tokens(self, tokenizer: Any, *, budget: int) -> list[int]:
        """Tokens of the filler text (lines as documents, EOS between), up to `budget`."""
        tokens, _ = stream_tokens(
            tokenizer, self._filler_lines(), budget=budget, separator=special_id(tokenizer, "eos")
        )
        if not tokens:
            raise CalibrationError(f"{self.where}: the filler text is empty")
        return tokens

    def _filler_lines(self) -> list[str]:
        if self.spec.filler:
            path = existing_path(self.spec.filler, f"{self.where} filler")
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md")) if path.is_dir() else [path]
            return [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
        return exl2_data_file("c4").read_text(encoding="utf8").splitlines()


def _fill(gap: int, filler: list[int], rng: random.Random, eos: int | None) -> list[int]:
    """`gap` tokens: `eos` (when given) then filler from a seeded offset, wrapping around if needed."""
    if gap <= 0:
        return []
    head = [eos] if eos is not None else []
    need = gap - len(head)
    start = rng.randrange(len(filler))
    out: list[int] = []
    while len(out) < need:
        out.extend(filler[start : start + need - len(out)])
        start = 0
    return (head + out)[:gap]


def _tree_hash(folder: Path) -> dict[str, str]:
    return {relative_name(p, folder): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def open_image(value: Any, label: str) -> Image.Image:
    """A PIL image from what datasets or a folder hold: a PIL image, {"bytes"/"path"}, a path, or an array."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, str | Path):
            image = Image.open(value)
        elif hasattr(value, "__array__"):
            import numpy

            image = Image.fromarray(numpy.asarray(value))
        else:
            raise CalibrationError(f"image '{label}' is a {type(value).__name__}, not an image")
        image.load()
        return image
    except CalibrationError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ValueError...
        raise CalibrationError(f"image '{label}' cannot be read: {exc}") from exc


class ImageFolderSource(ImageSource):
    kind = "images"
    needs = "path"
    summary = "a folder of images; same-stem .txt captions or captions.jsonl ({file, text, prompt})"

    def _files(self) -> list[Path]:
        folder = existing_path(self.spec.path, self.where)
        if not folder.is_dir():
            raise CalibrationError(f"{self.where} is not a folder")
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def content_identity(self) -> dict[str, Any]:
        folder = existing_path(self.spec.path, self.where)
        wanted = {*IMAGE_SUFFIXES, ".txt", ".jsonl"}
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
        return {"files": {relative_name(p, folder): file_sha256(p) for p in files}}

    def items(self) -> list[ImageItem]:
        captions = self._captions_file()
        root = existing_path(self.spec.path, self.where)
        items = []
        for path in self._files():
            name = relative_name(path, root)
            items.append(ImageItem(label=name, fetch=partial(self._fetch, path, name, captions.get(name, {}))))
        return items

    def _fetch(self, path: Path, name: str, record: dict[str, Any]) -> tuple[Image.Image, str | None, str | None]:
        answer = record.get(self.spec.text_field or "text", record.get("caption"))
        side = path.with_suffix(".txt")
        if answer is None and side.is_file():
            answer = side.read_text(encoding="utf-8").strip()
        prompt = record.get(self.spec.prompt_field or "prompt", record.get("question"))
        return open_image(path, name), prompt, answer

    def _captions_file(self) -> dict[str, dict[str, Any]]:
        path = existing_path(self.spec.path, self.where) / CAPTIONS_FILE
        if not path.is_file():
            return {}
        out: dict[str, dict[str, Any]] = {}
        try:
            for number, record in jsonl_objects(path.read_text(encoding="utf-8").splitlines()):
                key = next((record[k] for k in _FILE_KEYS if isinstance(record.get(k), str)), None)
                if key is None:
                    raise ValueError(f"line {number} names no file ({_FILE_KEYS})")
                out[key] = record
        except ValueError as exc:
            raise CalibrationError(f"{self.where}: {CAPTIONS_FILE} {exc}") from exc
        return out


class HfImageSource(ImageSource):
    kind = "hf-images"
    needs = "name"
    summary = "a Hugging Face dataset with an image column (IMAGE_FIELD='image'), optional text/prompt columns"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self.ref = HfDatasetRef(spec)

    def content_identity(self) -> dict[str, Any]:
        return self.ref.identity()

    def items(self) -> list[ImageItem]:
        ds = self.ref.dataset
        columns = list(ds.column_names)
        spec = self.spec
        if spec.image_field not in columns:
            raise CalibrationError(
                f"{self.where} has no image column '{spec.image_field}' (columns: {', '.join(columns)})"
            )
        answer = self._optional_column(spec.text_field, "text", columns)
        prompt = self._optional_column(spec.prompt_field, None, columns)
        return [ImageItem(label=f"row {i}", fetch=partial(self._fetch, i, answer, prompt)) for i in range(len(ds))]

    def _optional_column(self, named: str | None, default: str | None, columns: list[str]) -> str | None:
        if named is not None and named not in columns:
            raise CalibrationError(f"{self.where} has no column '{named}' (columns: {', '.join(columns)})")
        if named is None and default is not None and default not in columns:
            log.info("%s has no '%s' column; image rows get no caption", self.where, default)
            return None
        return named or default

    def _fetch(self, index: int, answer: str | None, prompt: str | None) -> tuple[Image.Image, str | None, str | None]:
        record = self.ref.dataset[index]
        image = open_image(record[self.spec.image_field], f"row {index}")
        text = record.get(answer) if answer else None
        question = record.get(prompt) if prompt else None
        return image, (str(question) if question else None), (str(text) if text else None)


class SampleImageSource(ImageSource):
    kind = "sample-images"
    needs = None
    summary = "the photographs inside scikit-image's wheel, with a prompt and a description each (offline)"

    @property
    def where(self) -> str:
        return "sample-images source"

    def content_identity(self) -> dict[str, Any]:
        import skimage

        from calibration.sample_images import SAMPLE_IMAGES

        version = skimage.__version__  # type: ignore[attr-defined]  # in the stub's __all__, not declared
        return {"skimage": version, "images": [(s.name, s.prompt, s.description) for s in SAMPLE_IMAGES]}

    def items(self) -> list[ImageItem]:
        from calibration.sample_images import SAMPLE_IMAGES

        return [ImageItem(label=s.name, fetch=partial(_sample, s)) for s in SAMPLE_IMAGES]


def _sample(sample: Any) -> tuple[Image.Image, str | None, str | None]:
    return sample.load(), sample.prompt, sample.description
