"""EXL2 quantization configs ("QParams"): bit widths, the proportion of rows at each width, group sizes.

A config splits a linear's K input rows (after act-order permutation) into contiguous groups, highest bit width
first, each group sharing one 4-bit scale code per output column and one fp16 max scale. This module holds the
config type with its exllamav2 JSON form and description string, the row partition and the bit accounting
(`total_bits`, `bpw`); `quantize.candidates` holds the candidate tables and `quantize.format` the packing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
SCALE_BITS = 4


@dataclass(frozen=True)
class QParams:
    """One quantization config. `bits` descending; `bits_prop` fractions of K summing to 1; `group_size[b]`."""

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: dict[int, int] = field(hash=False)
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        if not self.bits or len(self.bits) != len(self.bits_prop):
            raise ValueError(f"bits {self.bits} and bits_prop {self.bits_prop} must be non-empty and parallel")
        if any(b not in ALLOWED_BITS for b in self.bits):
            raise ValueError(f"bit widths {self.bits} must be in {ALLOWED_BITS}")
        if list(self.bits) != sorted(self.bits, reverse=True) or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bit widths {self.bits} must be distinct and descending")
        if sum(self.bits_prop) != 1.0:
            raise ValueError(f"bits_prop {self.bits_prop} must sum to exactly 1.0")
        if set(self.group_size) != set(self.bits):
            raise ValueError(f"group_size {self.group_size} must give one size per bit width {self.bits}")
        if self.scale_bits != SCALE_BITS:
            raise ValueError(f"scale_bits is always {SCALE_BITS}, not {self.scale_bits}")

    @classmethod
    def make(cls, bits: list[int], bits_prop: list[float], group_size: int | list[int] | dict[int, int]) -> QParams:
        """Build like exllamav2's QParams(group_size, bits, bits_prop): group_size an int, a list or a dict."""
        if isinstance(group_size, int):
            gs = dict.fromkeys(bits, group_size)
        elif isinstance(group_size, list):
            gs = dict(zip(bits, group_size, strict=True))
        else:
            gs = {int(b): int(g) for b, g in group_size.items()}
        return cls(tuple(bits), tuple(bits_prop), gs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QParams:
        """Read exllamav2's JSON form (group_size keys are strings there)."""
        return cls.make(
            list(data["bits"]), list(data["bits_prop"]), {int(b): int(g) for b, g in data["group_size"].items()}
        )

    def to_dict(self) -> dict[str, Any]:
        """exllamav2's JSON form: {"group_size": {"3": 64, ...}, "bits": [...], "bits_prop": [...], "scale_bits": 4}."""
        return {
            "group_size": {str(b): self.group_size[b] for b in self.bits},
            "bits": list(self.bits),
            "bits_prop": list(self.bits_prop),
            "scale_bits": self.scale_bits,
        }

    @property
    def desc(self) -> str:
        """exllamav2's description string, e.g. '0.05:3b_64g/0.95:2b_64g s4'."""
        parts = [f"{p}:{b}b_{self.group_size[b]}g" for b, p in zip(self.bits, self.bits_prop, strict=True)]
        return "/".join(parts) + f" s{self.scale_bits}"

    def groups(self, rows: int) -> list[tuple[int, int]]:
        """The row partition for K = `rows`: (bits, group rows) per group in layout order; the last may be short.

        Per width b with proportion p: ceil(min(K·p, remaining) / gs_b) groups of gs_b rows, highest width first,
        the final group cut at K (exllamav2's `AdaptiveGPTQ.configure`).
        """
        out: list[tuple[int, int]] = []
        remaining, start = rows, 0
        for b, p in zip(self.bits, self.bits_prop, strict=True):
            gs = self.group_size[b]
            # exllamav2 can compute a negative count here once earlier widths overshoot K; no groups, then.
            count = max(0, math.ceil(min(rows * p, remaining) / gs))
            for _ in range(count):
                size = min(gs, rows - start)
                if size <= 0:
                    break
                out.append((b, size))
                start += size
            remaining -= count * gs
        if start != rows:
            raise ValueError(f"{self.desc} covers {start} of {rows} rows")
        return out


def _group_counts(qp: QParams, rows: int) -> list[int]:
    """Groups per width as exllamav2 counts them (`configure`, `total_bits`): not clamped at 0, unlike `groups`."""
    counts: list[int] = []
    remaining = rows
    for b, p in zip(qp.bits, qp.bits_prop, strict=True):
        gs = qp.group_size[b]
        count = math.ceil(min(rows * p, remaining) / gs)
        counts.append(count)
        remaining -= count * gs
    if remaining > 0:
        raise ValueError(f"{qp.desc} covers {rows - remaining} of {rows} rows")
    return counts


def total_bits(qp: QParams, rows: int, columns: int, *, bias_numel: int = 0) -> int:
    """Stored bits of a K×N linear (K = `rows` in, N = `columns` out), as exllamav2's `QParams.total_bits`.

    q_weight rows·N·bits (rows capped at K per width), 16 per group for q_scale_max, 32 per group for q_groups,
    4·N per group for q_scale, 32 per row for q_invperm, 16 per bias element. The measurement and the optimizer
    budget use this number, so its quirks are kept: padding columns (N up to a multiple of 32) are not counted
    though they are stored, and a width whose count goes negative (only possible when a smaller group size follows
    a width that overshot K) subtracts groups and rows as exllamav2 does. exllamav2 multiplies the bias bits by the
    bias's last dimension, not its numel; that is the same thing for a linear's 1-D bias.
    """
    counts = _group_counts(qp, rows)
    total, left = 0, rows
    for b, count in zip(qp.bits, counts, strict=True):
        taken = min(qp.group_size[b] * count, left)
        left -= taken
        total += taken * columns * b
    groups = sum(counts)
    total += groups * (16 + 32 + columns * qp.scale_bits)
    return total + rows * 32 + bias_numel * 16


def bpw(qp: QParams, rows: int, columns: int, *, bias_numel: int = 0) -> float:
    """Bits per weight as exllamav2's `QParams.bpw`: `total_bits` over K·N (+ bias elements)."""
    return total_bits(qp, rows, columns, bias_numel=bias_numel) / (rows * columns + bias_numel)
