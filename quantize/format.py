"""The EXL2 tensors of one quantized linear: packing, unpacking with validation, and bit-exact dequantization.

`pack` turns a `QuantizedLinear` into exllamav2's `q_weight`/`q_scale`/`q_scale_max`/`q_groups`/`q_invperm`
(+ `bias`) tensors, byte for byte what `AdaptiveGPTQ.pack` writes (docs/exl2-format.md §1): N padded to a multiple
of 32 with the zero code 2^(b-1); codes as an LSB-first bitstream down K per group; scale codes minus one as
nibbles, where the zero-padded columns underflow to 0xF. `unpack` reads such a set back, checking every rule the
loader and kernels rely on and naming the tensor and the problem in a `ModelFormatError`. `dequantize` reproduces
`ext_c.reconstruct` bit for bit with fp16 rounding at exactly the kernel's steps; `scale_values` and
`dequantize_codes` are those steps, for GPTQ's fake-quant to share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from quantize.errors import ModelFormatError, UnsupportedArchitectureError
from quantize.qlinear import QuantizedLinear
from quantize.qparams import ALLOWED_BITS, QParams, bpw, total_bits

__all__ = [  # total_bits and bpw live with QParams; they are re-exported as part of the format's API
    "SUFFIXES",
    "bpw",
    "check_writable",
    "dequantize",
    "dequantize_codes",
    "dequantize_tensors",
    "pack",
    "padded_width",
    "scale_values",
    "total_bits",
    "unpack",
]

SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
MAX_ROWS = 65535  # the kernels read q_perm/q_invperm as uint16
MAX_QROWS = 32767  # q_groups holds q_weight row offsets as int16
_DTYPES = {
    "q_weight": torch.int32,
    "q_scale": torch.int32,
    "q_scale_max": torch.float16,
    "q_groups": torch.int16,
    "q_invperm": torch.int32,
    "bias": torch.float16,
}
_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements per fp32 temporary in `dequantize`
_ALLOWED = ", ".join(str(b) for b in ALLOWED_BITS)


def padded_width(out_features: int) -> int:
    """Np: exllamav2 pads every quantized linear's output features to a multiple of 32."""
    return -(-out_features // 32) * 32


def _block(bits: int) -> tuple[int, int]:
    """(rows, int32 words) of the smallest whole block of a `bits` stream: (32, 3) for 3-bit, (16, 3) for 6-bit."""
    rows = math.lcm(bits, 32) // bits
    return rows, rows * bits // 32


def _name(key: str, suffix: str) -> str:
    return f"{key}.{suffix}" if key else suffix


# --- layout rules shared by the writer check and the reader ------------------------------------------------------


def _bits_problem(group_bits: list[int]) -> str | None:
    """Why these group widths cannot be loaded (pack_columns has no 7-bit; the kernels walk 8, 6, ... 2), or None."""
    for g, bits in enumerate(group_bits):
        if bits not in ALLOWED_BITS:
            return f"group {g} has {bits} bits; allowed {_ALLOWED}"
        if g and bits > group_bits[g - 1]:
            return f"group {g} has {bits} bits after {group_bits[g - 1]}; widths must not increase along K"
    return None


def _layout_problem(group_bits: list[int], group_rows: list[int]) -> str | None:
    """Why this group layout cannot be loaded by exllamav2's kernels, or None; group numbers are 0-based."""
    problem = _bits_problem(group_bits)
    if problem is not None:
        return problem
    last = len(group_rows) - 1
    for g, (bits, rows) in enumerate(zip(group_bits, group_rows, strict=True)):
        step = 16 if bits == 2 else 32  # the reconstruct kernel checks group boundaries only every 32 (2-bit: 16) rows
        if rows <= 0 or (g < last and rows % step):
            return f"group {g} has {rows} rows at {bits} bits; all but the last group need a multiple of {step}"
        if rows * bits % 32:
            return f"group {g} has {rows} rows at {bits} bits, not a whole number of int32 words"
    return None


def check_writable(
    in_features: int, out_features: int, *, has_bias: bool = False, qparams: QParams | None = None, key: str = ""
) -> None:
    """Raise UnsupportedArchitectureError if EXL2 cannot store this linear (and `qparams`'s partition of it).

    K must be a multiple of 32 (the kernels step 32 rows) and at most 65535 (uint16 permutation); a bias needs
    N already a multiple of 32 (the loader checks bias length == padded width); q_weight's int16 row offsets cap
    Q at 32767, which any K ≤ 65535 satisfies.
    """
    where = key or "linear"
    if in_features <= 0 or in_features % 32:
        raise UnsupportedArchitectureError(f"{where}: in_features {in_features} is not a positive multiple of 32")
    if in_features > MAX_ROWS:
        raise UnsupportedArchitectureError(f"{where}: in_features {in_features} exceeds EXL2's limit of {MAX_ROWS}")
    if out_features <= 0:
        raise UnsupportedArchitectureError(f"{where}: out_features {out_features} must be positive")
    if has_bias and out_features % 32:
        raise UnsupportedArchitectureError(
            f"{where}: a bias needs out_features a multiple of 32 (exllamav2 pads {out_features} to "
            f"{padded_width(out_features)} but not the bias)"
        )
    if qparams is None:
        return
    try:
        groups = qparams.groups(in_features)
    except ValueError as exc:
        raise UnsupportedArchitectureError(f"{where}: {exc}") from None
    bits, rows = [b for b, _ in groups], [r for _, r in groups]
    problem = _layout_problem(bits, rows)
    if problem is not None:
        raise UnsupportedArchitectureError(f"{where}: {qparams.desc} at K={in_features}: {problem}")
    qrows = sum(b * r for b, r in groups) // 32
    if qrows > MAX_QROWS:
        raise UnsupportedArchitectureError(f"{where}: {qrows} q_weight rows exceed the int16 limit {MAX_QROWS}")


# --- bitstreams --------------------------------------------------------------------------------------------------


def _pack_stream(codes: Tensor, bits: int) -> Tensor:
    """Codes [R, Np] of one width (R a whole number of blocks) -> int32 [R·bits/32, Np], LSB first down R."""
    rows, words = _block(bits)
    width = codes.shape[1]
    blocks = codes.reshape(-1, rows, width)
    out = torch.zeros(blocks.shape[0], words, width, dtype=torch.int32)
    for i in range(rows):
        word, shift = divmod(bits * i, 32)
        value = blocks[:, i].to(torch.int32)
        if shift + bits > 32:  # straddles: its high bits start the next word
            out[:, word + 1] |= value >> (32 - shift)
        out[:, word] |= value.bitwise_left_shift_(shift)  # torch shifts int32 as uint32: bits past 31 drop off
    return out.reshape(-1, width)


def _unpack_stream(packed: Tensor, bits: int) -> Tensor:
    """int32 [Q, Np] of one width -> int16 codes [Q·32/bits, Np]."""
    rows, words = _block(bits)
    width = packed.shape[1]
    blocks = packed.reshape(-1, words, width)
    out = torch.empty(blocks.shape[0], rows, width, dtype=torch.int16)
    for i in range(rows):
        word, shift = divmod(bits * i, 32)
        value = blocks[:, word] >> shift  # arithmetic shift: the mask below clears the copied sign bits
        if shift + bits > 32:
            value &= (1 << (32 - shift)) - 1
            value |= blocks[:, word + 1] << (32 - shift)
        out[:, i] = value.bitwise_and_((1 << bits) - 1)
    return out.reshape(-1, width)


def _to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _pack_scales(scale_codes: Tensor, width: int) -> Tensor:
    """Scale codes [G, N] (1..16) -> int32 [G, Np/8]: nibble n%8 of word n//8 holds code-1.

    Like exllamav2's packer, the padding columns are zeros and `0 - 1` wraps to 0xFFFF in uint16 before shifting,
    so each padding nibble and every one above it in its word read 0xF.
    """
    padded = F.pad(scale_codes.to(torch.int64), (0, width - scale_codes.shape[1]))
    nibbles = ((padded - 1) & 0xFFFF).reshape(scale_codes.shape[0], width // 8, 8)
    out = torch.zeros(nibbles.shape[:2], dtype=torch.int64)
    for i in range(8):
        out |= (nibbles[..., i] << (4 * i)) & _MASK32
    return _to_int32(out)


def _unpack_scales(packed: Tensor) -> Tensor:
    """int32 [G, Np/8] -> scale codes int16 [G, Np] in 1..16."""
    words = packed.to(torch.int64) & _MASK32
    nibbles = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], dim=-1)
    return (nibbles.reshape(packed.shape[0], -1) + 1).to(torch.int16)


def _sections(group_bits: list[int], group_rows: list[int]) -> list[tuple[int, int, int]]:
    """(bits, first row, end row) per run of equal widths; each run is one continuous bitstream in q_weight."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for bits, rows in zip(group_bits, group_rows, strict=True):
        if out and out[-1][0] == bits:
            out[-1] = (bits, out[-1][1], start + rows)
        else:
            out.append((bits, start, start + rows))
        start += rows
    return out


# --- writer ------------------------------------------------------------------------------------------------------


def _check_quantized(ql: QuantizedLinear) -> None:
    """ValueError for a QuantizedLinear that breaks its own contract (shapes, dtypes, ranges)."""
    if ql.codes.dtype != torch.int16 or ql.codes.dim() != 2:
        raise ValueError(f"codes must be int16 [K, N], got {ql.codes.dtype} {list(ql.codes.shape)}")
    k, n, g = ql.in_features, ql.out_features, ql.num_groups
    if g == 0 or len(ql.group_rows) != g or sum(ql.group_rows) != k:
        raise ValueError(f"group_bits {ql.group_bits} and group_rows {ql.group_rows} must partition K={k}")
    if ql.scale_codes.dtype != torch.int16 or tuple(ql.scale_codes.shape) != (g, n):
        raise ValueError(
            f"scale_codes must be int16 [{g}, {n}], got {ql.scale_codes.dtype} {list(ql.scale_codes.shape)}"
        )
    if int(ql.scale_codes.min()) < 1 or int(ql.scale_codes.max()) > 16:
        raise ValueError("scale_codes must lie in 1..16")
    if ql.scale_max.dtype != torch.float16 or tuple(ql.scale_max.shape) != (g,):
        raise ValueError(f"scale_max must be float16 [{g}], got {ql.scale_max.dtype} {list(ql.scale_max.shape)}")
    if tuple(ql.perm.shape) != (k,) or not torch.equal(torch.sort(ql.perm).values.cpu(), torch.arange(k)):
        raise ValueError(f"perm must be a permutation of 0..{k - 1}")
    if ql.bias is not None and (ql.bias.dtype != torch.float16 or tuple(ql.bias.shape) != (n,)):
        raise ValueError(f"bias must be float16 [{n}], got {ql.bias.dtype} {list(ql.bias.shape)}")
    for bits, start, end in _sections(ql.group_bits, ql.group_rows):
        part = ql.codes[start:end]
        if int(part.min()) < 0 or int(part.max()) >= 1 << bits:
            raise ValueError(f"codes of rows {start}..{end - 1} exceed {bits} bits")


def pack(ql: QuantizedLinear, *, key: str = "") -> dict[str, Tensor]:
    """The tensors exllamav2 loads for this layer, keyed by suffix, or by `key.suffix` when `key` is given."""
    check_writable(ql.in_features, ql.out_features, has_bias=ql.bias is not None, key=key)
    _check_quantized(ql)
    problem = _layout_problem(ql.group_bits, ql.group_rows)
    if problem is not None:
        raise ValueError(f"{key or 'linear'}: {problem}")
    width = padded_width(ql.out_features)
    codes = ql.codes.cpu()
    streams = []
    for bits, start, end in _sections(ql.group_bits, ql.group_rows):
        part = codes[start:end]
        if width > ql.out_features:  # padding columns get the zero code 2^(b-1)
            part = F.pad(part, (0, width - ql.out_features), value=1 << (bits - 1))
        streams.append(_pack_stream(part, bits))
    starts = [0]
    for bits, rows in zip(ql.group_bits, ql.group_rows, strict=True):
        starts.append(starts[-1] + rows * bits // 32)
    groups = [v for bits, start in zip(ql.group_bits, starts, strict=False) for v in (bits, start)]
    out = {
        "q_weight": torch.cat(streams),
        "q_scale": _pack_scales(ql.scale_codes.cpu(), width),
        "q_scale_max": ql.scale_max.detach().cpu().clone(),
        "q_groups": torch.tensor(groups, dtype=torch.int16),
        "q_invperm": torch.argsort(ql.perm.cpu()).to(torch.int32),
    }
    if ql.bias is not None:
        out["bias"] = ql.bias.detach().cpu().clone()
    return {_name(key, s): t for s, t in out.items()}


# --- reader ------------------------------------------------------------------------------------------------------


def _fetch(tensors: Mapping[str, Tensor], key: str, suffix: str, *, required: bool = True) -> Tensor | None:
    """The tensor of `suffix`, keyed either by the bare suffix or by `key.suffix`; dtype and rank checked."""
    name = _name(key, suffix)
    tensor = tensors.get(suffix, tensors.get(name)) if key else tensors.get(suffix)
    if tensor is None:
        if required:
            raise ModelFormatError(f"{name}: missing")
        return None
    if tensor.dtype != _DTYPES[suffix]:
        want = str(_DTYPES[suffix]).removeprefix("torch.")
        got = str(tensor.dtype).removeprefix("torch.")
        raise ModelFormatError(f"{name}: dtype {got}; EXL2 stores it as {want}")
    rank = 2 if suffix in ("q_weight", "q_scale") else 1
    if tensor.dim() != rank:
        raise ModelFormatError(f"{name}: {tensor.dim()}-D shape {list(tensor.shape)}; expected {rank}-D")
    return tensor.cpu()


def _read_groups(q_groups: Tensor, qrows: int, key: str) -> tuple[list[int], list[int], list[int]]:
    """(bits, rows, first q_weight row) per group from q_groups and Q, as the loader's group map derives them."""
    name = _name(key, "q_groups")
    values = q_groups.tolist()
    if not values or len(values) % 2:
        raise ModelFormatError(f"{name}: {len(values)} entries; expected (bits, q_weight row) pairs, at least one")
    bits, starts = values[0::2], values[1::2]
    last = len(bits) - 1
    problem = _bits_problem(bits)  # before the row counts, which divide by the widths
    if problem is not None:
        raise ModelFormatError(f"{name}: {problem}")
    if starts[0] != 0:
        raise ModelFormatError(f"{name}: group 0 starts at q_weight row {starts[0]}, not 0")
    rows = []
    for g, (b, start) in enumerate(zip(bits, starts, strict=True)):
        end = starts[g + 1] if g < last else qrows
        if g < last and end <= start:
            raise ModelFormatError(f"{name}: group {g + 1} starts at q_weight row {end}, not after group {g} ({start})")
        if g < last and (end - start) * 32 % b:
            raise ModelFormatError(f"{name}: group {g} spans {end - start} q_weight rows, not whole {b}-bit rows")
        if g == last and (end <= start or (end - start) * 32 % b):
            raise ModelFormatError(
                f"{_name(key, 'q_weight')}: {qrows} rows leave the last group ({b}-bit, from row {start}) "
                f"{end - start} q_weight rows, not a whole positive number of {b}-bit rows"
            )
        rows.append((end - start) * 32 // b)
    problem = _layout_problem(bits, rows)
    if problem is not None:
        raise ModelFormatError(f"{name}: {problem}")
    return bits, rows, starts


def _read_invperm(q_invperm: Tensor, rows: int, key: str) -> Tensor:
    """perm = argsort(q_invperm), after checking that q_invperm is a permutation of 0..K-1."""
    name = _name(key, "q_invperm")
    if rows % 32:
        raise ModelFormatError(f"{name}: K={rows} rows is not a multiple of 32")
    if rows > MAX_ROWS:
        raise ModelFormatError(f"{name}: K={rows} rows exceeds EXL2's limit of {MAX_ROWS}")
    values = q_invperm.to(torch.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= rows:
        raise ModelFormatError(f"{name}: value {low if low < 0 else high} outside 0..{rows - 1}")
    counts = torch.bincount(values, minlength=rows)
    if int(counts.max()) > 1:
        dup = int(torch.argmax(counts))
        raise ModelFormatError(f"{name}: not a permutation; {dup} appears {int(counts[dup])} times")
    return torch.argsort(values)


def _read_width(q_weight: Tensor, q_scale: Tensor, out_features: int | None, bias: Tensor | None, key: str) -> int:
    """N, checked against the padded width Np of q_weight, q_scale and the bias."""
    width = q_weight.shape[1]
    if width == 0 or width % 32:
        raise ModelFormatError(f"{_name(key, 'q_weight')}: width {width} is not a positive multiple of 32")
    if q_scale.shape[1] * 8 != width:
        name = _name(key, "q_scale")
        raise ModelFormatError(
            f"{name}: width {q_scale.shape[1]}; expected Np/8 = {width // 8} for q_weight width {width}"
        )
    if bias is not None and bias.numel() != width:
        raise ModelFormatError(
            f"{_name(key, 'bias')}: {bias.numel()} entries; exllamav2 needs q_weight's width {width}"
        )
    n = out_features if out_features is not None else width
    if padded_width(n) != width or n <= 0:
        raise ModelFormatError(
            f"{_name(key, 'q_weight')}: width {width}, but out_features {n} pads to {padded_width(n)}"
        )
    return n


def unpack(
    tensors: Mapping[str, Tensor], *, key: str = "", out_features: int | None = None, prescale: float = 1.0
) -> QuantizedLinear:
    """Read and validate one layer's EXL2 tensors (keyed by suffix or `key.suffix`); errors name `key.suffix`.

    `out_features` drops the padding columns; without it N is the padded width (the padding then reads as columns
    of zeros). `q_perm`, if present, is ignored as exllamav2 ignores it.
    """
    q_weight, q_scale, q_scale_max, q_groups, q_invperm = (_fetch(tensors, key, s) for s in SUFFIXES)
    bias = _fetch(tensors, key, "bias", required=False)
    assert q_weight is not None and q_scale is not None and q_scale_max is not None  # required=True
    assert q_groups is not None and q_invperm is not None
    n = _read_width(q_weight, q_scale, out_features, bias, key)
    bits, rows, starts = _read_groups(q_groups, q_weight.shape[0], key)
    g = len(bits)
    if q_scale.shape[0] != g:
        raise ModelFormatError(f"{_name(key, 'q_scale')}: {q_scale.shape[0]} rows, but q_groups describes {g} groups")
    if q_scale_max.shape[0] != g:
        name = _name(key, "q_scale_max")
        raise ModelFormatError(f"{name}: {q_scale_max.shape[0]} entries, but q_groups describes {g} groups")
    if not bool(torch.isfinite(q_scale_max).all()):
        raise ModelFormatError(f"{_name(key, 'q_scale_max')}: not finite")
    k = sum(rows)
    if q_invperm.numel() != k:
        name = _name(key, "q_weight")
        raise ModelFormatError(
            f"{name}: {q_weight.shape[0]} rows make K={k} via q_groups; q_invperm has {q_invperm.numel()}"
        )
    perm = _read_invperm(q_invperm, k, key)
    parts = []
    for b, start, end in _sections(bits, rows):
        first = starts[bits.index(b)]
        parts.append(_unpack_stream(q_weight[first : first + (end - start) * b // 32], b))
    return QuantizedLinear(
        perm=perm,
        group_bits=bits,
        group_rows=rows,
        codes=torch.cat(parts)[:, :n].contiguous(),
        scale_codes=_unpack_scales(q_scale)[:, :n].contiguous(),
        scale_max=q_scale_max.clone(),
        bias=None if bias is None else bias[:n].clone(),
        prescale=prescale,
    )


# --- dequantization ----------------------------------------------------------------------------------------------


def scale_values(scale_codes: Tensor, scale_max: Tensor, *, prescale: float = 1.0) -> Tensor:
    """The fp16 scale S [G, N] of each (group, column), rounded exactly as exllamav2's loader and kernel do.

    M' = fp16(fp32(q_scale_max) · fp32(prescale/256)) (the loader's in-place half multiply), then
    S = fp16(fp16(c²) · M') (`dq_scale`); a product of two halves is exact in fp32, so one rounding to fp16 is RNE.
    M' is often subnormal, and subnormals are kept. `scale_max` holds one value per row of `scale_codes` ([G]
    against [G, N], a scalar against [N]) or already broadcasts against it ([G, 1]).
    """
    factor = torch.tensor(prescale / 256, dtype=torch.float32)
    m = (scale_max.to(torch.float32) * factor).to(torch.float16).float()
    if m.dim() == scale_codes.dim() - 1:
        m = m.unsqueeze(-1)
    c = scale_codes.to(torch.float32)
    return ((c * c).to(torch.float16).float() * m).to(torch.float16)


def dequantize_codes(codes: Tensor, bits: int, scale: Tensor) -> Tensor:
    """fp16(fp16(code - 2^(bits-1)) · S): one weight as the kernel's `__hmul2` yields it (`scale` broadcasts)."""
    signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.float32)
    return (signed * scale.to(torch.float32)).to(torch.float16)


def _runs(group_bits: list[int], group_rows: list[int]) -> list[tuple[int, int, int]]:
    """(bits, rows per group, group count) per run of consecutive groups alike in both."""
    out: list[tuple[int, int, int]] = []
    for bits, rows in zip(group_bits, group_rows, strict=True):
        if out and out[-1][:2] == (bits, rows):
            out[-1] = (bits, rows, out[-1][2] + 1)
        else:
            out.append((bits, rows, 1))
    return out


def dequantize(ql: QuantizedLinear) -> Tensor:
    """The fp16 weight W [N, K] (nn.Linear orientation) exllamav2's `reconstruct` produces, bit for bit."""
    _check_quantized(ql)
    scales = scale_values(ql.scale_codes, ql.scale_max, prescale=ql.prescale).float().to(ql.codes.device)
    n = ql.out_features
    stored = torch.empty(ql.in_features, n, dtype=torch.float16, device=ql.codes.device)  # permuted row order
    row = group = 0
    for bits, rows, count in _runs(ql.group_bits, ql.group_rows):
        step = max(1, _CHUNK // (rows * n))  # groups per pass, bounding the fp32 temporary
        for first in range(group, group + count, step):
            take = min(step, group + count - first)
            block = ql.codes[row : row + take * rows].to(torch.float32).reshape(take, rows, n)
            block -= 1 << (bits - 1)  # code - z is exact in fp16 and fp32; the product of two halves is exact in fp32
            block *= scales[first : first + take].unsqueeze(1)
            stored[row : row + take * rows] = block.reshape(-1, n)  # the single rounding, as __hmul2
            row += take * rows
        group += count
    return stored[torch.argsort(ql.perm).to(stored.device)].T.contiguous()  # dense row perm[j] <- stored row j


def dequantize_tensors(
    tensors: Mapping[str, Tensor], out_features: int, *, key: str = "", prescale: float = 1.0
) -> Tensor:
    """`dequantize(unpack(...))`: a layer's fp16 weight [out_features, K] straight from its EXL2 tensors."""
    return dequantize(unpack(tensors, key=key, out_features=out_features, prescale=prescale))
