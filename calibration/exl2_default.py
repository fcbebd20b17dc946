"""exllamav2's built-in calibration mix, rebuilt as a data table over the text files its wheel installs.

exllamav2 (`conversion/tokenize.py: get_standard_calibration`) takes 19 measurement rows or 115 quantization rows
from six corpora. `EXL2_MIX` lists its components in exllamav2's row order with both counts; `mix_counts` picks
the column for 19 or 115 rows and otherwise scales the quantization column to the rows asked for (largest
remainder). Differences from exllamav2, on purpose: rows are exactly the requested length (exllamav2 caps them at
2048), the random-token rows are seeded (exllamav2 draws them unseeded) and never contain special tokens, and the
shuffled multilingual rows use `random.Random(69420 + seed)`, so seed 0 reproduces exllamav2's own draw.
The architecture-specific "noise" rows (all -1) exllamav2 appends for a few models are not reproduced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from calibration.spec import largest_remainder
from calibration.tokens import encode_text, encode_texts, special_id
from quantize.errors import AssetError, CalibrationError

DATA_SUBDIR = ("conversion", "standard_cal_data")
DATA_FILES = ("c4", "code", "multilingual", "technical", "tiny", "wiki")
MEASUREMENT_ROWS = 19
QUANT_ROWS = 115
# exllamav2 seeds its multilingual shuffle with this constant; we add the user's seed to it.
EXL2_SHUFFLE_SEED = 69420
SHUFFLE_PIECE = 128

Method = Literal["chunks", "articles", "shuffled", "random"]


@dataclass(frozen=True)
class Exl2Component:
    """One row group of exllamav2's mix: where its text comes from and how many rows it gives."""

    name: str
    file: str | None
    method: Method
    measurement_rows: int
    quant_rows: int
    doc_separator: str | None = None


EXL2_MIX: tuple[Exl2Component, ...] = (
    Exl2Component("c4", "c4", "chunks", 2, 10),
    Exl2Component("wiki", "wiki", "articles", 4, 48, doc_separator="</doc>\n"),
    Exl2Component("code", "code", "chunks", 3, 15),
    Exl2Component("tiny", "tiny", "articles", 2, 10, doc_separator="<|endoftext|>"),
    Exl2Component("multilingual", "multilingual", "chunks", 3, 15),
    Exl2Component("multilingual-shuffled", "multilingual", "shuffled", 1, 5),
    Exl2Component("random", None, "random", 2, 2),
    Exl2Component("technical", "technical", "chunks", 2, 10),
)


def exl2_data_dir() -> Path:
    """The `standard_cal_data` folder of the installed exllamav2, found without importing exllamav2 (its import
    compiles CUDA extensions)."""
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("exllamav2 is not installed; its calibration data (standard_cal_data) is needed")
    for root in spec.submodule_search_locations:
        folder = Path(root).joinpath(*DATA_SUBDIR)
        if folder.is_dir():
            missing = [f for f in DATA_FILES if not (folder / f"{f}.utf8").is_file()]
            if missing:
                raise AssetError(f"exllamav2 calibration data in '{folder}' lacks {', '.join(missing)}.utf8")
            return folder
    raise AssetError(f"exllamav2 at {list(spec.submodule_search_locations)} has no {'/'.join(DATA_SUBDIR)} folder")


def exl2_data_file(name: str) -> Path:
    return exl2_data_dir() / f"{name}.utf8"


def exl2_data_identity() -> dict[str, str]:
    """Content hash of each data file, for the calibration fingerprint."""
    folder = exl2_data_dir()
    return {f: hashlib.sha256((folder / f"{f}.utf8").read_bytes()).hexdigest() for f in DATA_FILES}


def mix_counts(rows: int) -> dict[str, int]:
    """Rows per component: exllamav2's measurement (19) or quantization (115) column, else the quantization
    proportions scaled to `rows` by largest remainder."""
    if rows == MEASUREMENT_ROWS:
        return {c.name: c.measurement_rows for c in EXL2_MIX}
    if rows == QUANT_ROWS:
        return {c.name: c.quant_rows for c in EXL2_MIX}
    counts = largest_remainder([c.quant_rows for c in EXL2_MIX], rows)
    return {c.name: n for c, n in zip(EXL2_MIX, counts, strict=True)}


def build_exl2_rows(tokenizer: Any, *, rows: int, length: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """exllamav2's default mix as a [rows, length] LongTensor, plus rows per component."""
    counts = mix_counts(rows)
    cache: dict[str, list[int]] = {}
    parts = []
    for comp in EXL2_MIX:
        n = counts[comp.name]
        if n == 0:
            continue
        builder = _BUILDERS[comp.method]
        parts.append(builder(comp, tokenizer, rows=n, length=length, seed=seed, cache=cache))
    return torch.cat(parts, dim=0), counts


def _file_text(comp: Exl2Component) -> str:
    path = exl2_data_file(comp.file or "")
    if comp.name == "c4":
        # exllamav2 joins readlines() output (which keeps each "\n") with "\n\n"; keep its exact text.
        with open(path, encoding="utf8") as f:
            return "\n\n".join(f.readlines())
    return path.read_text(encoding="utf8")


def _file_tokens(comp: Exl2Component, tokenizer: Any, cache: dict[str, list[int]]) -> list[int]:
    # The shuffled multilingual rows reuse the multilingual tokens: encode each file once per build.
    if comp.file not in cache:
        cache[comp.file or ""] = encode_text(tokenizer, _file_text(comp))
    return cache[comp.file or ""]


def _chunk_rows(comp: Exl2Component, tokenizer: Any, *, rows: int, length: int, seed: int, cache: dict) -> torch.Tensor:
    tokens = _file_tokens(comp, tokenizer, cache)
    available = len(tokens) // length
    if available < rows:
        raise CalibrationError(
            f"exllamav2 data '{comp.file}.utf8' has {len(tokens):,} tokens: {available} rows of {length:,}; "
            f"{rows} rows × {length:,} = {rows * length:,} needed for the {comp.name} part of exl2-default"
        )
    return torch.tensor(tokens[: rows * length], dtype=torch.long).view(rows, length)


def _article_rows(
    comp: Exl2Component, tokenizer: Any, *, rows: int, length: int, seed: int, cache: dict
) -> torch.Tensor:
    """Whole articles, each with BOS and EOS, packed into rows; the first half of the rows drop the leading BOS."""
    encoded = _encoded_articles(comp, tokenizer)
    out = []
    for r in range(rows):
        row: list[int] = []
        # Like exllamav2, gather whole articles until the row has length + 1 tokens (room to drop the BOS).
        while len(row) < length + 1:
            ids = next(encoded, None)
            if ids is None:
                raise CalibrationError(
                    f"exllamav2 data '{comp.file}.utf8' ran out of articles after {r} of {rows} rows "
                    f"of {length:,} tokens for the {comp.name} part of exl2-default"
                )
            row.extend(ids)
        out.append(row[1 : length + 1] if r < rows // 2 else row[:length])
    return torch.tensor(out, dtype=torch.long)


def _encoded_articles(comp: Exl2Component, tokenizer: Any) -> Iterator[list[int]]:
    """Each article's ids framed by BOS and EOS, encoded lazily in batches (wiki is 2 MB; few rows need little)."""
    articles = _articles(comp, _file_text(comp))
    bos, eos = special_id(tokenizer, "bos"), special_id(tokenizer, "eos")
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    for start in range(0, len(articles), 32):
        for ids in encode_texts(tokenizer, articles[start : start + 32]):
            yield head + ids + tail


def _articles(comp: Exl2Component, text: str) -> list[str]:
    pieces = text.split(comp.doc_separator or "")
    if comp.name == "wiki":
        # Each wiki article starts with a `<doc ...>` header line, which exllamav2 drops.
        return [p[p.find("\n") + 1 :] for p in pieces]
    return [p.strip() for p in pieces]


def _shuffled_rows(
    comp: Exl2Component, tokenizer: Any, *, rows: int, length: int, seed: int, cache: dict
) -> torch.Tensor:
    """Rows of random 128-token pieces of the multilingual text, drawn with a seeded generator."""
    tokens = _file_tokens(comp, tokenizer, cache)
    usable = len(tokens) - len(tokens) % length
    usable -= usable % SHUFFLE_PIECE
    pieces = torch.tensor(tokens[:usable], dtype=torch.long).view(-1, SHUFFLE_PIECE)
    if pieces.shape[0] == 0:
        raise CalibrationError(f"exllamav2 data '{comp.file}.utf8' has {len(tokens):,} tokens; too few for rows")
    rng = random.Random(EXL2_SHUFFLE_SEED + seed)
    per_row = -(-length // SHUFFLE_PIECE)
    out = []
    for _ in range(rows):
        picks = [pieces[rng.randint(0, pieces.shape[0] - 1)] for _ in range(per_row)]
        out.append(torch.cat(picks)[:length])
    return torch.stack(out)


def _random_rows(
    comp: Exl2Component, tokenizer: Any, *, rows: int, length: int, seed: int, cache: dict
) -> torch.Tensor:
    """Uniformly random ordinary tokens. Special tokens are left out: a stray [IMG] would ask a VLM for an image."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(0, allowed.numel(), (rows, length), generator=gen)]


_BUILDERS = {
    "chunks": _chunk_rows,
    "articles": _article_rows,
    "shuffled": _shuffled_rows,
    "random": _random_rows,
}

__all__ = [
    "EXL2_MIX",
    "Exl2Component",
    "build_exl2_rows",
    "exl2_data_dir",
    "exl2_data_file",
    "exl2_data_identity",
    "mix_counts",
]
