"""The candidate configs of the measurement pass and the head options, as exllamav2 0.3.2 defines them.

Each attention row gives one config to q/k/v/o_proj and each MLP row one to gate/up/down_proj
(`exllamav2/conversion/qparams.py`: `qparams_attn`, `qparams_mlp`, `qparams_headoptions`). The tables are written in
the notation of docs/exl2-format.md §2.4, `bits:proportion@group_size` joined by "/", and parsed once into
`QParams`. A proportion written "1" stays the int 1 and "1.0" the float, as in exllamav2, because the description
string (and so the de-duplication key and measurement.json) prints them differently. The measurement quantizes each
linear once per distinct config (`distinct_configs`) and then evaluates every row (`candidate_rows`) from those.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantize.qparams import QParams, total_bits

ATTN_SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_SLOTS = ("gate_proj", "up_proj", "down_proj")
HEAD_BITS = (2, 3, 4, 5, 6, 8)

Row = tuple[QParams, ...]
Shape = tuple[int, int]  # (K in_features, N out_features) of the transposed weight Wt

# fmt: off
_ATTN_TABLE = (
    ("3:0.05@64/2:0.95@64", "3:0.05@64/2:0.95@64", "3:0.05@64/2:0.95@64", "3:0.05@64/2:0.95@64"),
    ("3:0.1@64/2:0.9@64",   "3:0.1@64/2:0.9@64",   "3:0.25@64/2:0.75@64", "3:0.1@64/2:0.9@64"),
    ("3:0.1@64/2:0.9@64",   "3:0.1@64/2:0.9@64",   "4:0.1@128/3:0.9@128", "3:0.1@64/2:0.9@64"),
    ("3:0.1@64/2:0.9@64",   "3:0.1@64/2:0.9@64",   "4:0.1@128/3:0.9@128", "4:0.1@128/3:0.9@128"),
    ("4:0.1@128/3:0.9@128", "4:0.1@128/3:0.9@128", "4:0.1@128/3:0.9@128", "4:0.1@128/3:0.9@128"),
    ("4:0.1@128/3:0.9@128", "4:0.1@128/3:0.9@128", "4:0.1@64/3:0.9@64",   "4:0.1@128/3:0.9@128"),
    ("4:1@128",             "4:1@128",             "4:1@128",             "4:1@128"),
    ("4:1@128",             "4:1@128",             "4:1@64",              "4:1@128"),
    ("4:1@64",              "4:1@64",              "4:1@32",              "4:1@64"),
    ("4:1@32",              "4:1@32",              "4:1@32",              "4:1@32"),
    ("5:0.1@128/4:0.9@128", "5:0.1@128/4:0.9@128", "5:0.1@64/4:0.9@64",   "5:0.1@128/4:0.9@128"),
    ("5:0.1@64/4:0.9@64",   "5:0.1@64/4:0.9@64",   "5:0.1@32/4:0.9@32",   "5:0.1@64/4:0.9@64"),
    ("5:0.1@64/4:0.9@64",   "5:0.1@64/4:0.9@64",   "5:1@64",              "5:0.1@64/4:0.9@64"),
    ("5:0.1@32/4:0.9@32",   "5:0.1@32/4:0.9@32",   "5:1@32",              "5:0.1@32/4:0.9@32"),
    ("6:0.1@128/5:0.9@128", "6:0.1@128/5:0.9@128", "6:1@128",             "6:0.1@128/5:0.9@128"),
    ("6:0.1@32/5:0.9@32",   "6:0.1@32/5:0.9@32",   "6:1@32",              "6:0.1@32/5:0.9@32"),
    ("6:1@128",             "6:1@128",             "6:1@128",             "6:1@128"),
    ("6:1@32",              "6:1@32",              "8:1@32",              "6:1@32"),
    ("8:1@128",             "8:1@128",             "8:1@128",             "8:1@128"),
)

_MLP_TABLE = (
    ("3:0.05@64/2:0.95@64", "3:0.05@64/2:0.95@64",   "6:0.05@32/3:0.2@64/2:0.75@64"),
    ("3:0.1@64/2:0.9@64",   "3:0.25@64/2:0.75@64",   "6:0.05@32/3:0.2@64/2:0.75@64"),
    ("3:0.1@64/2:0.9@64",   "3:0.3@64/2:0.7@64",     "5:0.05@32/3:0.95@32"),
    ("3:0.1@64/2:0.9@64",   "3:0.3@64/2:0.7@64",     "5:0.05@32/4:0.95@32"),
    ("4:0.1@128/3:0.9@128", "4:0.25@128/3:0.75@128", "8:0.05@32/4:0.1@128/3:0.85@128"),
    ("4:0.1@32/3:0.9@32",   "4:0.25@32/3:0.75@32",   "8:0.05@32/4:0.1@32/3:0.85@32"),
    ("4:0.1@32/3:0.9@32",   "4:0.25@32/3:0.75@32",   "8:0.05@32/4:0.95@128"),
    ("4:1@128",             "4:1@32",                "8:0.05@32/4:0.95@128"),
    ("4:1@32",              "4:1@32",                "8:0.05@32/4:0.95@32"),
    ("5:0.1@128/4:0.9@128", "5:0.25@128/4:0.75@128", "8:0.05@32/5:0.1@128/4:0.85@128"),
    ("5:0.1@32/4:0.9@32",   "5:0.25@32/4:0.75@32",   "8:0.05@32/5:0.1@32/4:0.85@32"),
    ("6:0.1@128/5:0.9@128", "6:0.25@128/5:0.75@128", "8:0.05@32/6:0.1@128/5:0.85@128"),
    ("6:0.1@32/5:0.9@32",   "6:0.25@32/5:0.75@32",   "8:0.05@32/6:0.1@32/5:0.85@32"),
    ("6:1@128",             "6:1@128",               "8:0.05@32/6:0.95@128"),
    ("8:0.1@128/6:0.9@128", "8:0.1@128/6:0.9@128",   "8:0.15@128/6:0.85@128"),
    ("8:0.1@128/6:0.9@128", "8:0.1@128/6:0.9@128",   "8:1@128"),
    ("8:1@128",             "8:1@128",               "8:1@128"),
)

_HEAD_TABLE = {
    2: "4:0.3@32/2:0.7@32",
    3: "4:0.15@32/3:0.85@32",
    4: "6:0.15@32/4:0.85@32",
    5: "6:0.15@128/5:0.85@128",
    6: "8:0.15@128/6:0.85@128",
    8: "8:1.0@128",  # exllamav2 writes [1.0] here (desc "1.0:8b_128g"), [1] in the measurement tables
}
# fmt: on


def parse_config(text: str) -> QParams:
    """'8:0.05@32/4:0.95@128' -> QParams(bits [8, 4], bits_prop [0.05, 0.95], group_size {8: 32, 4: 128})."""
    bits: list[int] = []
    props: list[float] = []
    sizes: dict[int, int] = {}
    for part in text.split("/"):
        width, rest = part.split(":")
        prop, size = rest.split("@")
        bits.append(int(width))
        props.append(int(prop) if prop.isdigit() else float(prop))
        sizes[int(width)] = int(size)
    return QParams.make(bits, props, sizes)


ATTN_ROWS: tuple[Row, ...] = tuple(tuple(parse_config(c) for c in row) for row in _ATTN_TABLE)
MLP_ROWS: tuple[Row, ...] = tuple(tuple(parse_config(c) for c in row) for row in _MLP_TABLE)
HEAD_OPTIONS: dict[int, QParams] = {b: parse_config(c) for b, c in _HEAD_TABLE.items()}
_MODES = {"self_attn": (ATTN_SLOTS, ATTN_ROWS), "mlp": (MLP_SLOTS, MLP_ROWS)}  # measurement.json's mode names


def head_config(head_bits: int) -> QParams:
    """The lm_head config for `-hb head_bits` (§2.5); exllamav2 accepts only these six values."""
    if head_bits not in HEAD_OPTIONS:
        allowed = ", ".join(str(b) for b in HEAD_BITS)
        raise ValueError(f"head bits {head_bits} not available; allowed {allowed}")
    return HEAD_OPTIONS[head_bits]


def reduce_rows(rows: Sequence[Row]) -> tuple[list[list[QParams]], list[list[int]]]:
    """exllamav2's `get_qparams_reduced`: per slot, the configs in first-seen order, de-duplicated by desc; and per
    row, each slot's index into them. Slots are independent, so a gateless MLP just ignores slot 0."""
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError("candidate rows must all have the same number of slots")
    index: list[dict[str, int]] = [{} for _ in range(width)]
    distinct: list[list[QParams]] = [[] for _ in range(width)]
    maps = []
    for row in rows:
        for slot, qp in enumerate(row):
            if qp.desc not in index[slot]:
                index[slot][qp.desc] = len(distinct[slot])
                distinct[slot].append(qp)
        maps.append([index[slot][qp.desc] for slot, qp in enumerate(row)])
    return distinct, maps


def _table(mode: str) -> tuple[tuple[str, ...], tuple[Row, ...]]:
    if mode not in _MODES:
        raise ValueError(f"no candidate table for module mode {mode!r}; known: {', '.join(_MODES)}")
    return _MODES[mode]


def candidate_rows(mode: str) -> list[dict[str, QParams]]:
    """The rows of a measurement slot ("self_attn": 19, "mlp": 17) in table order, each keyed by linear name."""
    slots, rows = _table(mode)
    return [dict(zip(slots, row, strict=True)) for row in rows]


def distinct_configs(mode: str, slot: str) -> list[QParams]:
    """The configs one linear of a slot is quantized with, once each: (14, 14, 15, 14) for q/k/v/o_proj and
    (13, 13, 14) for gate/up/down_proj; first-seen order, de-duplicated by desc."""
    slots, rows = _table(mode)
    if slot not in slots:
        raise ValueError(f"{mode} has no linear {slot!r}; its linears are {', '.join(slots)}")
    return reduce_rows(rows)[0][slots.index(slot)]


def attn_shapes(hidden: int, q_dim: int, kv_dim: int) -> tuple[Shape, ...]:
    """(K, N) of q/k/v/o_proj: q_dim = heads·head_dim, kv_dim = kv_heads·head_dim."""
    return ((hidden, q_dim), (hidden, kv_dim), (hidden, kv_dim), (q_dim, hidden))


def mlp_shapes(hidden: int, intermediate: int) -> tuple[Shape, ...]:
    """(K, N) of gate/up/down_proj."""
    return ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))


def row_total_bits(row: Row, shapes: Sequence[Shape], *, bias_numels: Sequence[int] | None = None) -> int:
    """A row's size: the sum of its linears' `total_bits`, the `total_bits` of a measurement.json entry."""
    biases = bias_numels if bias_numels is not None else [0] * len(row)
    parts = zip(row, shapes, biases, strict=True)
    return sum(total_bits(qp, k, n, bias_numel=bias) for qp, (k, n), bias in parts)


def row_bpw(row: Row, shapes: Sequence[Shape], *, bias_numels: Sequence[int] | None = None) -> float:
    """A row's bits per weight: its total bits over the total numel (K·N + bias) of the block's linears."""
    biases = bias_numels if bias_numels is not None else [0] * len(row)
    numel = sum(k * n for k, n in shapes) + sum(biases)
    return row_total_bits(row, shapes, bias_numels=biases) / numel
