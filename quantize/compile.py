"""Compile: assemble the quantized model folder that exllamav2 and TabbyAPI load.

The last step of a quant. The quantize pass has left, in `tensors_dir`, one small safetensors file of packed EXL2
tensors per quantized linear (`<source module key>.safetensors`, keys `<module>.q_weight` ...). Compile streams
them, one tensor at a time and in exllamav2's module order, into size-limited output shards together with the
embedding and norms rounded to float16 (as exllamav2 stores them) and the vision tower and projector copied byte
for byte, always under exllamav2's key names (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.*`, `multi_modal_projector.*` for a VLM whatever layout the source used; `model.*`, `lm_head.*`
for a causal LM). It copies the tokenizer, processor and chat-template files, rewrites config.json with
`quantization_config` and our provenance, writes `tabby_config.yml`, then re-opens the written shards and proves
every vision tensor bit-identical to the source. All of it goes into a sibling `<out>.partial-<pid>` folder that is
renamed into place only when complete, with `EXL2_COMPLETE.json` written last.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from quantize import provenance as prov
from quantize.adapters import LAYOUTS, KeyLayout, ModelAdapter, Role
from quantize.errors import Exl2Error
from quantize.safetensors_io import INDEX_NAME, TensorEntry, read_header

log = logging.getLogger(__name__)

MARKER = "EXL2_COMPLETE.json"
VISION_CHECK = "vision_check.json"
TABBY_CONFIG = "tabby_config.yml"
FP16_MAX = 65504.0
# exllamav2's `-ss 0` means "no limit", which it spells as one petabyte.
UNLIMITED_SHARD_MB = 1024**3

# exllamav2's compile order inside one decoder layer (conversion/compile.py, the Attention and MLP branches).
_ATTN_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# Packed tensors of one EXL2 linear: suffix -> (safetensors dtype, rank), in the order they are written.
_PACKED: dict[str, tuple[str, int]] = {
    "q_weight": ("I32", 2),
    "q_invperm": ("I32", 1),
    "q_scale": ("I32", 2),
    "q_scale_max": ("F16", 1),
    "q_groups": ("I16", 1),
    "q_perm": ("I32", 1),  # optional: the loader recomputes it from q_invperm
    "bias": ("F16", 1),  # optional: only for a biased linear
}
REQUIRED_PACKED = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")

# exllamav2's safetensors reader knows only these dtypes (stloader.py, convert_dtype); anything else fails to load.
EXLLAMAV2_DTYPES = frozenset({"I32", "I16", "F16", "BF16", "F32"})

# vision_config fields exllamav2 reads with no default for a Pixtral tower (config.py, pixtral branch).
_VISION_REQUIRED = ("head_dim", "num_attention_heads", "hidden_act", "patch_size", "rope_theta")

# Weight files of any format are not "non-tensor files": copying them would add gigabytes nobody loads.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# Written by compile itself, or markers of another tool's build whose presence would lie about this folder.
_NOT_COPIED = frozenset({"config.json", INDEX_NAME, MARKER, VISION_CHECK, "BUILD_COMPLETE.json"})


class CompileError(Exl2Error):
    """The quantize pass's tensors or the source cannot make a loadable, faithful EXL2 folder."""


class Kind(StrEnum):
    """Where an output tensor's bytes come from."""

    QUANTIZED = "quantized"  # packed EXL2 tensors of a linear, copied raw from the quantize pass's file
    FP16 = "fp16"  # embedding, norms, loose biases: the source rounded to float16, as exllamav2 stores them
    COPIED = "copied"  # vision tower and projector: the source's bytes, untouched


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: its name there, what it is, and where its bytes come from."""

    key: str
    kind: Kind
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source_key: str  # key in the model folder (FP16, COPIED) or in the packed file (QUANTIZED)
    packed: TensorEntry | None = None  # the packed file's byte range, for QUANTIZED


@dataclass(frozen=True)
class Shard:
    name: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CompileResult:
    """A finished quant folder. Sizes in bytes: `total_bytes` the shard files, the rest their tensor data."""

    out_dir: Path
    shards: tuple[Path, ...]
    total_bytes: int
    quantized_bytes: int
    fp16_bytes: int
    vision_bytes: int
    vision_sha256: dict[str, str] = field(default_factory=dict)
    config_notes: tuple[str, ...] = ()


# --- key names -------------------------------------------------------------------------------------------------


def target_layout(adapter: ModelAdapter) -> KeyLayout:
    """exllamav2 has no key map for the newer transformers VLM names, so a VLM is always written in the legacy one."""
    name = "llava-legacy" if adapter.spec.multimodal else "causal-lm"
    return next(layout for layout in LAYOUTS if layout.name == name)


def renamer(source: KeyLayout, target: KeyLayout) -> Callable[[str], str]:
    """A function from a source key to its output key: the same tensor under the target layout's prefixes."""
    pairs = [
        (source.head_key.removesuffix("weight"), target.head_key.removesuffix("weight")),
        (source.lm_prefix, target.lm_prefix),
        (source.vision_prefix, target.vision_prefix),
        (source.projector_prefix, target.projector_prefix),
    ]

    def rename(key: str) -> str:
        for old, new in pairs:
            if old is not None and new is not None and key.startswith(old):
                return new + key[len(old) :]
        raise CompileError(f"tensor '{key}' is outside every prefix of the {source.name} layout")

    return rename


# --- planning: which tensors, in which order, from where ------------------------------------------------------


def lm_sequence(adapter: ModelAdapter) -> Iterator[tuple[str, Kind]]:
    """The language model's source weight keys in exllamav2's compile order, each with what becomes of it."""
    prefix = adapter.layout.lm_prefix
    yield f"{prefix}embed_tokens.weight", Kind.FP16
    for i in range(adapter.text.num_hidden_layers):
        layer = f"{prefix}layers.{i}."
        yield f"{layer}input_layernorm.weight", Kind.FP16
        yield from ((f"{layer}{name}.weight", Kind.QUANTIZED) for name in _ATTN_LINEARS)
        yield f"{layer}post_attention_layernorm.weight", Kind.FP16
        yield from ((f"{layer}{name}.weight", Kind.QUANTIZED) for name in _MLP_LINEARS)
    yield f"{prefix}norm.weight", Kind.FP16
    # With tied embeddings this key is absent from the source; the head is still quantized and stored under it.
    yield adapter.layout.head_key, Kind.QUANTIZED


def plan_tensors(adapter: ModelAdapter, tensors_dir: Path) -> list[PlannedTensor]:
    """Every output tensor in write order: the language model as exllamav2 orders it, then projector and tower.

    exllamav2 appends the projector tensors before the vision tower's (conversion/compile.py, `extra_tensors`);
    we keep that order, each part in the source's own key order.
    """
    rename = renamer(adapter.layout, target_layout(adapter))
    sequence = list(lm_sequence(adapter))
    planned: list[PlannedTensor] = []
    for key, kind in sequence:
        if kind is Kind.QUANTIZED:
            planned += _plan_quantized(adapter, key, Path(tensors_dir), rename)
        else:
            planned.append(_plan_fp16(adapter, key, rename(key)))
    for role in (Role.PROJECTOR, Role.VISION):
        planned += [_plan_copied(adapter, key, rename(key)) for key in adapter.keys_with_role(role)]
    _check_coverage(adapter, planned, [key for key, _ in sequence])
    return planned


def _plan_fp16(adapter: ModelAdapter, key: str, out_key: str) -> PlannedTensor:
    info = adapter.tensors[key]
    return PlannedTensor(out_key, Kind.FP16, "F16", info.shape, info.numel * 2, key)


def _plan_copied(adapter: ModelAdapter, key: str, out_key: str) -> PlannedTensor:
    entry = adapter.files.entry(key)
    if entry.dtype not in EXLLAMAV2_DTYPES:
        raise CompileError(
            f"{entry.file}: vision tensor '{key}' is {entry.dtype}; it is copied verbatim, and exllamav2 loads only "
            f"{', '.join(sorted(EXLLAMAV2_DTYPES))}: convert the source model's vision tower first"
        )
    return PlannedTensor(out_key, Kind.COPIED, entry.dtype, entry.shape, entry.nbytes, key)


def _plan_quantized(
    adapter: ModelAdapter, weight_key: str, tensors_dir: Path, rename: Callable[[str], str]
) -> list[PlannedTensor]:
    """The packed tensors of one linear, checked against the source weight's shape, plus a loose fp16 bias."""
    module = weight_key.removesuffix(".weight")
    out_module = rename(weight_key).removesuffix(".weight")
    path = tensors_dir / f"{module}.safetensors"
    if not path.is_file():
        raise CompileError(
            f"{path}: missing; the quantize pass writes one file per quantized linear: run or resume it first"
        )
    entries, _ = read_header(path)
    prefix = _packed_prefix(entries, (module, out_module), path)
    parts = {key[len(prefix) + 1 :]: entry for key, entry in entries.items()}
    # A tied head has no weight of its own: it is quantized from the embedding, whose shape it shares.
    source_weight = adapter.lm_key("lm_head.weight") if weight_key == adapter.layout.head_key else weight_key
    out_features, in_features = adapter.tensors[source_weight].shape
    check_packed(parts, out_features=out_features, in_features=in_features, where=path)
    planned = [
        PlannedTensor(f"{out_module}.{s}", Kind.QUANTIZED, e.dtype, e.shape, e.nbytes, e.key, e)
        for s, e in sorted(parts.items(), key=lambda item: list(_PACKED).index(item[0]))
    ]
    source_bias = f"{module}.bias"
    if source_bias in adapter.tensors and "bias" not in parts:
        planned.append(_plan_fp16(adapter, source_bias, f"{out_module}.bias"))
    elif "bias" in parts and source_bias not in adapter.tensors:
        raise CompileError(f"{path}: has a bias, but the source linear '{weight_key}' has none (exllamav2 asserts)")
    return planned


def _packed_prefix(entries: dict[str, TensorEntry], candidates: Sequence[str], path: Path) -> str:
    for prefix in dict.fromkeys(candidates):
        if entries and all(key.startswith(prefix + ".") for key in entries):
            return prefix
    shown = ", ".join(sorted(entries)[:3]) or "no tensors"
    raise CompileError(f"{path}: holds {shown}; expected every key under '{candidates[0]}.'")


def check_packed(parts: dict[str, TensorEntry], *, out_features: int, in_features: int, where: Path) -> None:
    """Sanity of one linear's packed tensors: keys, dtypes, ranks, and the shapes exllamav2's loader checks."""
    missing = [s for s in REQUIRED_PACKED if s not in parts]
    unknown = sorted(set(parts) - set(_PACKED))
    if missing or unknown:
        raise CompileError(f"{where}: packed tensors missing {missing}, unexpected {unknown}")
    for suffix, entry in parts.items():
        dtype, rank = _PACKED[suffix]
        if entry.dtype != dtype or len(entry.shape) != rank:
            raise CompileError(
                f"{where}: '{entry.key}' is {entry.dtype} {list(entry.shape)}, expected {rank}-D {dtype}"
            )
    padded = math.ceil(out_features / 32) * 32  # exllamav2 pads a linear's width to 32 columns
    rows, width = parts["q_weight"].shape
    groups = parts["q_scale"].shape[0]
    expected = {
        "q_weight width": (width, padded),
        "q_scale columns x 8": (parts["q_scale"].shape[1] * 8, padded),
        "q_scale_max length": (parts["q_scale_max"].shape[0], groups),
        "q_groups length": (parts["q_groups"].shape[0], 2 * groups),
        "q_invperm length": (parts["q_invperm"].shape[0], in_features),
    }
    if "q_perm" in parts:
        expected["q_perm length"] = (parts["q_perm"].shape[0], in_features)
    for what, (got, want) in expected.items():
        if got != want:
            raise CompileError(f"{where}: {what} is {got}, expected {want} for a {in_features}x{out_features} linear")
    # Between 2 and 8 bits per weight row: rows of 32 weights pack into `bits` int32 words.
    if not in_features * 2 // 32 <= rows <= math.ceil(in_features * 8 / 32):
        raise CompileError(f"{where}: q_weight has {rows} rows, impossible for K={in_features} at 2..8 bits")
    if "bias" in parts and parts["bias"].shape[0] not in (out_features, padded):
        raise CompileError(f"{where}: bias has {parts['bias'].shape[0]} values, expected {out_features}")


def _check_coverage(adapter: ModelAdapter, planned: list[PlannedTensor], sequence: list[str]) -> None:
    """Every source tensor goes somewhere: a new tensor kind must not vanish from the quant unnoticed."""
    covered = set(sequence) | {t.source_key for t in planned if t.kind is not Kind.QUANTIZED}
    left = []
    for key, info in adapter.tensors.items():
        if info.role is Role.IGNORED:
            log.info("compile: not copying '%s' (a derived buffer exllamav2 recomputes)", key)
        elif key not in covered and not (info.role is Role.LINEAR_BIAS and key[: -len("bias")] + "weight" in covered):
            left.append(key)
    if left:
        raise CompileError(f"{adapter.model_dir}: compile has no place for {len(left)} tensor(s): {left[:3]}")
    keys = [t.key for t in planned]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise CompileError(f"{adapter.model_dir}: output tensor names collide: {dupes[:3]}")


# --- sharding --------------------------------------------------------------------------------------------------


def header_bytes(tensors: Sequence[PlannedTensor]) -> bytes:
    """A safetensors header for `tensors` laid out back to back: length prefix, JSON, space padding to 8 bytes."""
    fields: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        fields[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(fields, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _header_cost(t: PlannedTensor, limit: int) -> int:
    """An upper bound on the header bytes `t` adds to a shard of at most `limit` bytes (offsets <= limit)."""
    info = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [limit, limit]}
    return len(json.dumps(t.key)) + 1 + len(json.dumps(info, separators=(",", ":"))) + 1


def plan_shards(tensors: Sequence[PlannedTensor], *, limit_bytes: int) -> list[Shard]:
    """Split `tensors`, in order, into files of at most `limit_bytes` each, header included.

    A sequential fill: unlike exllamav2, which fills a shard greedily and lets a later small tensor jump ahead of a
    large one, order is kept; the cost is at most one tensor's worth of slack per shard.
    """
    base = len(header_bytes([])) + 7  # length prefix, metadata, braces, worst-case padding
    groups: list[list[PlannedTensor]] = []
    size = base
    for t in tensors:
        cost = _header_cost(t, limit_bytes) + t.nbytes
        if base + cost > limit_bytes:
            raise CompileError(
                f"tensor '{t.key}' ({t.nbytes / 2**20:.2f} MiB) does not fit in a shard of "
                f"{limit_bytes / 2**20:.2f} MiB: raise the shard size"
            )
        if not groups or size + cost > limit_bytes:
            groups.append([])
            size = base
        groups[-1].append(t)
        size += cost
    return [Shard(name, tuple(group)) for name, group in zip(shard_names(len(groups)), groups, strict=True)]


def shard_names(count: int) -> list[str]:
    """exllamav2's names: `output.safetensors` alone, else `output-00001-of-0000N.safetensors`."""
    if count == 1:
        return ["output.safetensors"]
    return [f"output-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def shard_limit_bytes(shard_size_mb: float) -> int:
    if shard_size_mb < 0:
        raise CompileError(f"shard size {shard_size_mb} MB is negative (0 means no limit)")
    return int((shard_size_mb or UNLIMITED_SHARD_MB) * 1024**2)


# --- writing ---------------------------------------------------------------------------------------------------


def tensor_bytes(adapter: ModelAdapter, t: PlannedTensor) -> bytes:
    """The bytes of one output tensor, read only now so that one tensor at a time is in memory."""
    if t.kind is Kind.COPIED:
        return adapter.files.raw_bytes(t.source_key)
    if t.kind is Kind.QUANTIZED:
        assert t.packed is not None
        return _read_range(t.packed)
    return fp16_bytes(adapter, t.source_key)


def fp16_bytes(adapter: ModelAdapter, key: str) -> bytes:
    """The source tensor rounded to float16 (`.half()`, as exllamav2 does), refusing values float16 cannot hold."""
    source = adapter.files.get(key)
    half = source.to(torch.float16)
    bad = ~torch.isfinite(half)
    if bad.any():
        worst = source[bad].double().abs().max().item()
        entry = adapter.files.entry(key)
        raise CompileError(
            f"{entry.file}: tensor '{key}' ({entry.dtype}) has {int(bad.sum())} value(s) float16 cannot hold "
            f"(largest magnitude {worst:g}, float16 max ±{FP16_MAX:g}); exllamav2 stores it as float16, so the "
            "quant would carry inf: this checkpoint cannot be converted to EXL2 as it is"
        )
    return half.contiguous().view(torch.uint8).numpy().tobytes()


def _read_range(entry: TensorEntry) -> bytes:
    with entry.file.open("rb") as f:
        f.seek(entry.start)
        return f.read(entry.nbytes)


def write_shard(path: Path, shard: Shard, read: Callable[[PlannedTensor], bytes]) -> None:
    """Header first (known from shapes and dtypes), then each tensor's bytes as they are read: never the shard."""
    with path.open("wb") as f:
        f.write(header_bytes(shard.tensors))
        for t in shard.tensors:
            data = read(t)
            if len(data) != t.nbytes:
                raise CompileError(f"{path.name}: '{t.key}' came to {len(data)} bytes, its header says {t.nbytes}")
            f.write(data)


def write_index(folder: Path, shards: Sequence[Shard]) -> None:
    """The Hugging Face weight map: exllamav2 ignores it, other tools look for it."""
    weight_map = {t.key: shard.name for shard in shards for t in shard.tensors}
    total = sum(shard.data_bytes for shard in shards)
    _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


# --- the post-compile check ------------------------------------------------------------------------------------


def verify_output(
    folder: Path, shards: Sequence[Shard], planned: Sequence[PlannedTensor], adapter: ModelAdapter
) -> dict[str, str]:
    """Re-open the written shards and prove them: every planned tensor with its dtype and shape, every quantized
    module complete, every vision/projector tensor's bytes equal to the source's. Returns output key -> sha256."""
    written = _read_written(folder, shards)
    planned_keys = {t.key for t in planned}
    if set(written) != planned_keys:
        missing, extra = sorted(planned_keys - set(written)), sorted(set(written) - planned_keys)
        raise CompileError(f"{folder}: shards are missing {missing[:3]} and have unexpected {extra[:3]}")
    for t in planned:
        entry = written[t.key]
        if (entry.dtype, entry.shape) != (t.dtype, t.shape):
            raise CompileError(f"{entry.file.name}: '{t.key}' is {entry.dtype} {list(entry.shape)}, planned {t.dtype}")
    modules = {t.key.rsplit(".", 1)[0] for t in planned if t.kind is Kind.QUANTIZED}
    for module in sorted(modules):
        absent = [s for s in REQUIRED_PACKED if f"{module}.{s}" not in written]
        if absent:
            raise CompileError(f"{folder}: quantized module '{module}' lacks {absent}")
    return {t.key: _check_copy(adapter, t, written[t.key]) for t in planned if t.kind is Kind.COPIED}


def _read_written(folder: Path, shards: Sequence[Shard]) -> dict[str, TensorEntry]:
    written: dict[str, TensorEntry] = {}
    for shard in shards:
        path = folder / shard.name
        entries, _ = read_header(path)
        # The reference reader must accept the file too: it checks what ours does not (ordering, no gaps).
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(entries):
                raise CompileError(f"{path}: the safetensors library reads other keys than the header holds")
        written |= entries
    return written


def _check_copy(adapter: ModelAdapter, t: PlannedTensor, entry: TensorEntry) -> str:
    source = adapter.files.entry(t.source_key)
    if (source.dtype, source.shape) != (entry.dtype, entry.shape):
        raise CompileError(
            f"{entry.file.name}: '{t.key}' is {entry.dtype} {list(entry.shape)}, "
            f"the source '{t.source_key}' is {source.dtype} {list(source.shape)}"
        )
    # Both sides are hashed straight from the files, independently of the path that wrote the copy.
    want, got = sha256_range(source), sha256_range(entry)
    if want != got:
        raise CompileError(
            f"{entry.file.name}: vision tensor '{t.key}' differs from the source '{t.source_key}' "
            f"(sha256 {got[:16]} vs {want[:16]}); the output is not a faithful copy"
        )
    return want


def sha256_range(entry: TensorEntry, *, chunk: int = 1 << 24) -> str:
    """sha256 of a tensor's stored bytes, read in chunks."""
    digest = hashlib.sha256()
    with entry.file.open("rb") as f:
        f.seek(entry.start)
        left = entry.nbytes
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise CompileError(f"{entry.file}: ends inside tensor '{entry.key}'")
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


# --- config.json and the other files ---------------------------------------------------------------------------


def quantization_block(caller: dict[str, Any]) -> dict[str, Any]:
    """exllamav2's `quantization_config` (quant_method, version, bits, head_bits, calibration), ours the version."""
    block = {"quant_method": "exl2", "version": prov.tool_version()} | dict(caller)
    missing = [k for k in ("bits", "head_bits") if k not in block]
    if missing:
        raise CompileError(f"quantization_config lacks {missing}; exllamav2 writes bits and head_bits")
    _require_json("quantization_config", block)
    if block["quant_method"] != "exl2":
        raise CompileError(f"quantization_config says quant_method {block['quant_method']!r}, this writes 'exl2'")
    return block


def _require_json(name: str, value: Any) -> None:
    """Refuse a caller's record that config.json cannot hold before any work, not after the shards are written."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise CompileError(f"{name} is not JSON-serialisable ({exc}); pass strings, numbers, lists and dicts") from exc


def exllamav2_config(source: dict[str, Any], *, multimodal: bool) -> tuple[dict[str, Any], list[str]]:
    """The source config with what exllamav2 needs spelled its way, and a note for each change.

    transformers 5 folds `rope_theta` (and the scaling) into `rope_parameters`; exllamav2 reads only `rope_theta`,
    falling back to 10000 for the language model, which would silently break a model trained at another base,
    and requires `vision_config.rope_theta` outright.
    """
    config = copy.deepcopy(source)
    text = config.get("text_config") if multimodal else config
    notes = _flatten_rope(text, "text_config" if multimodal else "config") if isinstance(text, dict) else []
    vision = config.get("vision_config")
    if multimodal and isinstance(vision, dict):
        notes += _flatten_rope(vision, "vision_config", scaling=False)
    return config, notes


def _flatten_rope(section: dict[str, Any], where: str, *, scaling: bool = True) -> list[str]:
    params = section.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return []
    notes = []
    if section.get("rope_theta") is None:
        section["rope_theta"] = params["rope_theta"]
        notes.append(f"{where}.rope_theta = {params['rope_theta']} copied from rope_parameters")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling and rope_type != "default" and section.get("rope_scaling") is None:
        section["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        notes.append(f"{where}.rope_scaling ({rope_type}) copied from rope_parameters")
    return notes


def exllamav2_gaps(config: dict[str, Any], model_dir: Path, *, multimodal: bool) -> list[str]:
    """What exllamav2 will refuse at load time and compile cannot invent (its config.py, pixtral branch)."""
    if not multimodal:
        return []
    gaps = []
    if not (model_dir / "preprocessor_config.json").is_file():
        gaps.append("no preprocessor_config.json (exllamav2 requires one for a vision model)")
    vision = config.get("vision_config") or {}
    absent = [k for k in _VISION_REQUIRED if k not in vision]
    if absent:
        gaps.append(f"vision_config lacks {absent}")
    if "vision_feature_layer" not in config:
        gaps.append("config lacks vision_feature_layer")
    return gaps


def copy_side_files(source_dir: Path, folder: Path) -> list[str]:
    """Copy every top-level non-tensor file (tokenizer, processor, chat template, generation config, README).

    Subfolders are left out, as exllamav2 does; so are weight files, the old index and build markers.
    """
    copied = []
    for path in sorted(source_dir.iterdir()):
        name = path.name
        if not path.is_file():
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json") or name in _NOT_COPIED:
            log.info("compile: not copying %s (weights, an index or a marker; compile writes its own)", name)
            continue
        shutil.copyfile(path, folder / name)  # follows the symlinks of a Hugging Face cache snapshot
        copied.append(name)
    return copied


def write_tabby_config(folder: Path) -> None:
    """TabbyAPI's per-model settings with vision on, keeping anything a copied source file already said."""
    path = folder / TABBY_CONFIG
    settings = yaml.safe_load(path.read_text()) if path.is_file() else None
    settings = settings if isinstance(settings, dict) else {}
    model = settings.get("model")
    settings["model"] = {**(model if isinstance(model, dict) else {}), "vision": True}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def _write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    path.write_text(json.dumps(data, indent=indent) + "\n")


# --- the whole compile -----------------------------------------------------------------------------------------


def compile_quant(
    adapter: ModelAdapter,
    tensors_dir: Path | str,
    out_dir: Path | str,
    *,
    quantization_config: dict[str, Any],
    provenance: dict[str, Any],
    shard_size_mb: float = 8192,
    overwrite: bool = False,
) -> CompileResult:
    """Write the finished EXL2 folder `out_dir` from the source `adapter` and the quantize pass's `tensors_dir`.

    `quantization_config` must give at least `bits` and `head_bits` (and may give `calibration`); `provenance` is
    the caller's record (command, recipe, calibration fingerprint, seed...), stored with compile's own
    measurements under config.json's `exl2_vlm`. An existing non-empty `out_dir` is replaced only with `overwrite`.
    """
    start = time.monotonic()
    out_dir = Path(out_dir)
    _check_target(out_dir, adapter.model_dir, Path(tensors_dir), overwrite=overwrite)
    qconfig = quantization_block(quantization_config)
    _require_json("provenance", provenance)
    planned = plan_tensors(adapter, Path(tensors_dir))
    shards = plan_shards(planned, limit_bytes=shard_limit_bytes(shard_size_mb))
    if adapter.layout != target_layout(adapter):
        target = target_layout(adapter).name
        log.info("compile: source uses the %s layout; writing exllamav2's %s names", adapter.layout.name, target)
    partial = _fresh_partial(out_dir)
    try:
        for shard in shards:
            write_shard(partial / shard.name, shard, lambda t: tensor_bytes(adapter, t))
        write_index(partial, shards)
        hashes = verify_output(partial, shards, planned, adapter)
        notes = _write_folder_files(adapter, partial, qconfig, provenance, hashes, start)
        result = _result(out_dir, partial, shards, planned, hashes, notes)
        _write_vision_check(partial, planned, hashes, adapter)
        _write_json(partial / MARKER, _marker(partial, result, time.monotonic() - start))
        _install(partial, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("compile: wrote %s (%d shard(s), %.1f MiB)", out_dir, len(shards), result.total_bytes / 2**20)
    return result


def _write_folder_files(
    adapter: ModelAdapter,
    folder: Path,
    qconfig: dict[str, Any],
    caller: dict[str, Any],
    hashes: dict[str, str],
    start: float,
) -> list[str]:
    """Side files, config.json and tabby_config.yml; returns the notes on what was changed or is missing."""
    multimodal = adapter.spec.multimodal
    copy_side_files(adapter.model_dir, folder)
    config, notes = exllamav2_config(adapter.config, multimodal=multimodal)
    for gap in exllamav2_gaps(config, adapter.model_dir, multimodal=multimodal):
        log.warning("compile: exllamav2 will not load this folder as it is: %s", gap)
        notes.append(f"exllamav2 gap: {gap}")
    for note in notes:
        log.info("compile: config.json: %s", note)
    measured = prov.measured_record(
        model_dir=adapter.model_dir,
        architecture=adapter.spec.name,
        layout=adapter.layout.name,
        compile_seconds=time.monotonic() - start,
        vision_sha256=hashes,
        config_notes=notes,
    )
    config["quantization_config"] = qconfig
    config[prov.PROVENANCE_KEY] = prov.merge(caller, measured)
    _write_json(folder / "config.json", config, indent=4)  # indent 4, as exllamav2 writes it
    if multimodal:
        write_tabby_config(folder)
    return notes


def _write_vision_check(
    folder: Path, planned: Sequence[PlannedTensor], hashes: dict[str, str], adapter: ModelAdapter
) -> None:
    tensors = {
        t.key: {"source_key": t.source_key, "dtype": t.dtype, "shape": list(t.shape), "sha256": hashes[t.key]}
        for t in planned
        if t.kind is Kind.COPIED
    }
    record = {"algorithm": "sha256", "source": str(adapter.model_dir.resolve()), "identical": True, "tensors": tensors}
    _write_json(folder / VISION_CHECK, record)


def _result(
    out_dir: Path,
    partial: Path,
    shards: Sequence[Shard],
    planned: Sequence[PlannedTensor],
    hashes: dict[str, str],
    notes: list[str],
) -> CompileResult:
    def part(kind: Kind) -> int:
        return sum(t.nbytes for t in planned if t.kind is kind)

    return CompileResult(
        out_dir=out_dir,
        shards=tuple(out_dir / s.name for s in shards),
        total_bytes=sum((partial / s.name).stat().st_size for s in shards),
        quantized_bytes=part(Kind.QUANTIZED),
        fp16_bytes=part(Kind.FP16),
        vision_bytes=part(Kind.COPIED),
        vision_sha256=dict(hashes),
        config_notes=tuple(notes),
    )


def _marker(partial: Path, result: CompileResult, seconds: float) -> dict[str, Any]:
    return {
        "tool_version": prov.tool_version(),
        "shards": [{"name": p.name, "bytes": (partial / p.name).stat().st_size} for p in result.shards],
        "total_bytes": result.total_bytes,
        "quantized_bytes": result.quantized_bytes,
        "fp16_bytes": result.fp16_bytes,
        "vision_bytes": result.vision_bytes,
        "vision_tensors": len(result.vision_sha256),
        "vision_check": VISION_CHECK,
        "seconds": round(seconds, 3),
    }


# --- atomic installation ---------------------------------------------------------------------------------------


def is_complete(out_dir: Path) -> bool:
    """True when a compile finished in `out_dir` (its marker is written last)."""
    return (Path(out_dir) / MARKER).is_file()


def _check_target(out_dir: Path, model_dir: Path, tensors_dir: Path, *, overwrite: bool) -> None:
    target = out_dir.resolve()
    for other in (model_dir.resolve(), tensors_dir.resolve()):
        if target == other or target in other.parents or other in target.parents:
            raise CompileError(f"{out_dir}: overlaps {other}; write the quant to a folder of its own")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CompileError(f"{out_dir}: exists and is not a folder")
    if overwrite or not any(out_dir.iterdir()):
        return
    if is_complete(out_dir):
        raise CompileError(f"{out_dir}: already holds a complete quant ({MARKER}); pass overwrite to replace it")
    raise CompileError(f"{out_dir}: exists, is not empty and holds no complete quant; remove it or pass overwrite")


def _fresh_partial(out_dir: Path) -> Path:
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    if partial.exists():  # left by an earlier failed call of this same process
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _install(partial: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename the finished folder into place; an old one is moved aside first and deleted only afterwards."""
    if out_dir.exists():
        if not overwrite and any(out_dir.iterdir()):
            raise CompileError(f"{out_dir}: appeared while compiling; pass overwrite to replace it")
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out_dir)
