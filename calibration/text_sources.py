"""Text calibration sources: exllamav2's default mix, local text/jsonl/parquet files, Hugging Face datasets.

Except for exl2-default (see `calibration.exl2_default`), a text source reads its documents in a seeded order,
encodes them (EOS between documents) until they hold twice the tokens needed, and takes seeded windows of exactly
the row length (`calibration.tokens.take_windows`). parquet/jsonl/hf read the "text" field unless told otherwise;
lacking one they join all fields of a row with spaces, as exllamav2 does with parquet files, and log it.
"""

from __future__ import annotations

import logging
import random
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.base import (
    BuildContext,
    CalibrationSource,
    SourceRows,
    existing_path,
    file_sha256,
    jsonl_objects,
    read_text,
    relative_name,
)
from calibration.exl2_default import build_exl2_rows, exl2_data_identity
from calibration.hfdata import HfDatasetRef
from calibration.tokens import special_id, stream_tokens, take_windows
from quantize.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.spec import SourceSpec

log = logging.getLogger(__name__)

# Text sources encode documents until they hold this many times the tokens needed, so the seed has windows to
# choose from without encoding a whole large dataset.
OVERSAMPLE = 2
TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_TEXT_FIELD = "text"


class Exl2DefaultSource(CalibrationSource):
    kind = "exl2-default"
    summary = "exllamav2's built-in mix (c4, wiki, code, tiny, multilingual, random, technical)"

    def identity(self) -> dict[str, Any]:
        return {"files": exl2_data_identity()}

    def build(self, ctx: BuildContext, rows: int) -> SourceRows:
        ids, counts = build_exl2_rows(ctx.tokenizer, rows=rows, length=ctx.length, seed=ctx.seed)
        return SourceRows(input_ids=ids, parts={k: v for k, v in counts.items() if v})


class TextStreamSource(CalibrationSource):
    """A source whose documents are concatenated into one token stream and cut into windows."""

    needs = "path"

    @property
    def where(self) -> str:
        return f"{self.kind} source '{self.spec.path or self.spec.name}'"

    @abstractmethod
    def documents(self, seed: int) -> Iterable[str]:
        """The documents in a seeded order."""

    def build(self, ctx: BuildContext, rows: int) -> SourceRows:
        eos = special_id(ctx.tokenizer, "eos")
        budget = OVERSAMPLE * rows * ctx.length
        tokens, _ = stream_tokens(ctx.tokenizer, self.documents(ctx.seed), budget=budget, separator=eos)
        ids = take_windows(tokens, rows=rows, length=ctx.length, seed=ctx.seed, what=self.where)
        return SourceRows(input_ids=ids, available_tokens=len(tokens))


class TextFileSource(TextStreamSource):
    kind = "text"
    summary = "a .txt/.md file, or a folder of them (each file one document)"

    def files(self) -> list[Path]:
        path = Path(self.spec.path or "").expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise CalibrationError(f"{self.where} has no {'/'.join(TEXT_SUFFIXES)} files")
            return found
        raise CalibrationError(f"{self.where}: no such file or folder")

    def identity(self) -> dict[str, Any]:
        root = Path(self.spec.path or "").expanduser()
        return {"files": {relative_name(p, root): file_sha256(p) for p in self.files()}}

    def documents(self, seed: int) -> Iterator[str]:
        files = self.files()
        random.Random(seed).shuffle(files)
        for path in files:
            yield read_text(path, self.where)


class JsonlSource(TextStreamSource):
    kind = "jsonl"
    summary = "a .jsonl file; one document per line from FIELD (default 'text')"

    def identity(self) -> dict[str, Any]:
        return {"sha256": file_sha256(existing_path(self.spec.path, self.where))}

    def records(self) -> list[dict[str, Any]]:
        path = existing_path(self.spec.path, self.where)
        try:
            return [record for _, record in jsonl_objects(read_text(path, self.where).splitlines())]
        except ValueError as exc:
            raise CalibrationError(f"{self.where}: {exc}") from exc

    def documents(self, seed: int) -> Iterator[str]:
        records = self.records()
        columns = sorted({k for r in records for k in r})
        field_name = text_column(self.spec, columns, self.where)
        random.Random(seed).shuffle(records)
        for record in records:
            yield _record_text(record, field_name)


class ParquetSource(TextStreamSource):
    kind = "parquet"
    summary = "a .parquet file (or folder); COLUMN (default 'text'), else all columns joined like exllamav2"

    def identity(self) -> dict[str, Any]:
        path = existing_path(self.spec.path, self.where)
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        return {"files": {relative_name(p, path): file_sha256(p) for p in files}}

    def documents(self, seed: int) -> Iterator[str]:
        import pandas

        path = existing_path(self.spec.path, self.where)
        try:
            frame = pandas.read_parquet(path)
        except Exception as exc:  # pyarrow raises its own error types for a bad file
            raise CalibrationError(f"{self.where} is not a readable parquet file: {exc}") from exc
        field_name = text_column(self.spec, list(map(str, frame.columns)), self.where)
        order = list(range(len(frame)))
        random.Random(seed).shuffle(order)
        if field_name is not None:
            column = frame[field_name]
            yield from (str(column.iat[i]) for i in order if column.iat[i] is not None)
        else:
            yield from (" ".join(str(v) for v in frame.iloc[i].values) for i in order)


class HfTextSource(TextStreamSource):
    kind = "hf"
    needs = "name"
    summary = "a Hugging Face dataset (save_to_disk folder, folder of data files, or hub name); FIELD='text'"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self.ref = HfDatasetRef(spec)

    @property
    def dataset(self) -> Any:
        return self.ref.dataset

    def identity(self) -> dict[str, Any]:
        return self.ref.identity()

    def documents(self, seed: int) -> Iterator[str]:
        ds = self.dataset
        field_name = text_column(self.spec, list(ds.column_names), self.where)
        if field_name is not None:
            ds = ds.select_columns([field_name])
        order = list(range(len(ds)))
        random.Random(seed).shuffle(order)
        for start in range(0, len(order), 512):
            batch = ds[order[start : start + 512]]
            for i in range(len(next(iter(batch.values())))):
                yield _record_text({k: v[i] for k, v in batch.items()}, field_name)


def text_column(spec: SourceSpec, columns: list[str], where: str) -> str | None:
    """The column to read text from; None means exllamav2's join of all columns (logged)."""
    if spec.text_field is not None:
        if spec.text_field not in columns:
            raise CalibrationError(f"{where} has no field '{spec.text_field}' (fields: {', '.join(columns)})")
        return spec.text_field
    if DEFAULT_TEXT_FIELD in columns:
        return DEFAULT_TEXT_FIELD
    log.warning(
        "%s has no '%s' field; joining all fields (%s) of each row with spaces, as exllamav2 does",
        where,
        DEFAULT_TEXT_FIELD,
        ", ".join(columns),
    )
    return None


def _record_text(record: dict[str, Any], field_name: str | None) -> str:
    if field_name is not None:
        value = record.get(field_name)
        return "" if value is None else str(value)
    return " ".join(str(v) for v in record.values())
