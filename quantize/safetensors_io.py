"""Streamed reading of a model folder's safetensors shards, one tensor at a time.

A 123B checkpoint never fits in memory, so nothing here loads a whole file: the shards' JSON headers are parsed
up front (a few kilobytes each) into an index of key -> (file, dtype, shape, byte range), and a tensor is read
only when asked for. Sharded folders with `model.safetensors.index.json`, sharded folders without one, and single
files are all accepted; any disagreement between the index and the shards is reported with the file's name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from quantize.errors import ModelFormatError

INDEX_NAME = "model.safetensors.index.json"

# Safetensors dtype strings -> (torch dtype, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, dtype string, shape and absolute byte range in the file."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse one safetensors file's header into entries and its `__metadata__`, checking every byte range."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ModelFormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ModelFormatError(f"{path}: header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    entries = {}
    for key, info in header.items():
        entries[key] = _entry(path, key, info, base, size)
    return entries, metadata


def _entry(path: Path, key: str, info: object, base: int, size: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ModelFormatError(f"{path}: tensor '{key}' has a malformed header entry")
    dtype = info["dtype"]
    if dtype not in DTYPES:
        raise ModelFormatError(f"{path}: tensor '{key}' has unknown dtype {dtype!r}")
    shape = tuple(int(d) for d in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    expected = prod(shape) * DTYPES[dtype][1]
    if end - begin != expected or base + end > size:
        raise ModelFormatError(
            f"{path}: tensor '{key}' ({dtype} {list(shape)}) spans bytes {begin}..{end}, "
            f"expected {expected} bytes inside a {size}-byte file"
        )
    return TensorEntry(key, path, dtype, shape, base + begin, base + end)


class SafetensorsIndex:
    """Every tensor of a model folder, readable one at a time; never the whole model in memory."""

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelFormatError(f"{self.model_dir}: not a directory")
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for path in self._shard_paths():
            entries, metadata = read_header(path)
            self.metadata[path] = metadata
            for key, entry in entries.items():
                if key in self.entries:
                    other = self.entries[key].file.name
                    raise ModelFormatError(f"{path}: tensor '{key}' is also stored in {other}")
                self.entries[key] = entry
        self._check_index()

    def _shard_paths(self) -> list[Path]:
        index = self.model_dir / INDEX_NAME
        if index.exists():
            names = sorted(set(self._weight_map(index).values()))
            missing = [n for n in names if not (self.model_dir / n).is_file()]
            if missing:
                raise ModelFormatError(f"{index}: lists shard {missing[0]}, which is not in the folder")
            return [self.model_dir / n for n in names]
        shards = sorted(self.model_dir.glob("*.safetensors"))
        if not shards:
            raise ModelFormatError(f"{self.model_dir}: no *.safetensors files (only safetensors checkpoints are read)")
        return shards

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index}: unreadable index, no 'weight_map' ({exc})") from exc
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: 'weight_map' is not an object")
        return weight_map

    def _check_index(self) -> None:
        index = self.model_dir / INDEX_NAME
        if not index.exists():
            return
        for key, name in self._weight_map(index).items():
            entry = self.entries.get(key)
            if entry is None:
                raise ModelFormatError(f"{index}: lists tensor '{key}' in {name}, but no shard holds it")
            if entry.file.name != name:
                raise ModelFormatError(f"{index}: lists tensor '{key}' in {name}, but it is in {entry.file.name}")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, key: str) -> TensorEntry:
        try:
            return self.entries[key]
        except KeyError:
            raise ModelFormatError(f"{self.model_dir}: no tensor '{key}' in any shard") from None

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a copy, in its stored dtype) from its shard.

        A plain read into a fresh buffer, not a memory map: pages of a mapped shard stay resident (and count in the
        process's memory) for as long as the mapping lives, which over a whole model would be the whole model.
        """
        entry = self.entry(key)
        torch_dtype = DTYPES[entry.dtype][0]
        buffer = bytearray(entry.nbytes)
        with entry.file.open("rb") as f:
            f.seek(entry.start)
            if f.readinto(buffer) != entry.nbytes:
                raise ModelFormatError(f"{entry.file}: tensor '{key}' is cut short (file truncated?)")
        if not buffer:
            return torch.empty(entry.shape, dtype=torch_dtype)
        return torch.frombuffer(buffer, dtype=torch_dtype).reshape(entry.shape)

    def raw_bytes(self, key: str) -> bytes:
        """The tensor's bytes exactly as stored, for byte-for-byte copies of untouched tensors."""
        entry = self.entry(key)
        with entry.file.open("rb") as f:
            f.seek(entry.start)
            return f.read(entry.nbytes)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
