"""Choose one measured EXL2 option per decoder-layer slot so the model hits a target bits per weight.

The input is a measurement in exllamav2's `measurement.json` schema: per attention and MLP slot, a list of options,
each with its exact size (`total_bits`) and the block's relative output error (`1 - accuracy`). The objective is
exllamav2's (`conversion/optimize.py`): for a norm p, minimize Σ err^p subject to Σ bits ≤ int(numel · bpw); choose
p from a 3-stage sweep (80 norms over [1.5, 3.5], then 80 around the best) as the one whose solution has the
smallest max err; keep that solution; then greedily move slots to their next option while the budget allows.
exllamav2 solves each norm with simulated annealing (1975 temperatures × 1000 proposals, 240 runs, seeded from
std::random_device), which would take minutes in Python, and whose temperatures stay far above typical differences
of err^p, so that its runs end near random points under the budget. Here each norm is solved exactly instead: for
one norm the problem is a multiple-choice knapsack; a Lagrangian relaxation gives a bound and a choice within one
option of the optimum, and a Pareto dynamic programme restricted by that bound closes the gap in milliseconds. The
result is never worse than any annealing run at the same norm, draws no random numbers, and an 88-layer model takes
about half a second. On degenerate inputs (many layers with exactly the same errors) the programme's front can
grow too large; the sweep then keeps the Lagrangian choices and `Strategy.proven_optimal` says so. `anneal` keeps
exllamav2's annealer (vectorised over runs, seeded numpy RNG) as a reference and as `method="anneal"`.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np

from quantize.errors import Exl2Error

# exllamav2's schedule (conversion/optimize.py and ext_quant.cpp:sim_anneal).
NORM_RANGE = (1.5, 3.5)
NORM_STAGE2_WIDTH = 0.15
RUNS_PER_STAGE = 80
ANNEAL_TEMP_MAX = 2.0
ANNEAL_TEMP_MIN = 1e-4
ANNEAL_COOLING = 0.995
ANNEAL_PROPOSALS = 1000

# Module modes of decoder-layer entries in a measurement (`<key>.<mode>`); the rest (norm, linear, pos_emb) are null.
_LAYER_KEY = re.compile(
    r"^(?P<prefix>.*)layers\.(?P<layer>\d+)\.(?P<mode>self_attn|mlp|block_sparse_moe|parallel_decoder)$"
)
# Any real option is 2..8 bpw plus overhead; outside this window the shapes given do not describe the measured layer.
_SANE_BPW = (0.5, 32.0)
# Σ log err is reported; an error of exactly 0 (a lossless option) would make it -inf, which JSON cannot hold.
_LOG_ERR_FLOOR = 1e-12
# Relative difference below which two sums of err^p are the same sum added in a different order.
_SAME_VALUE = 1e-12
# Largest Pareto front the exact search keeps per step during the norm sweep and for the final norm; real
# measurements stay far below the first (see _minimize and _exact_solver).
_MAX_FRONT = 4096
_MAX_FRONT_FINAL = 65536
_GAVE_UP = np.empty(0, dtype=np.int64)
# Padding cost for ragged option tables: large enough to never fit, small enough that λ·cost stays finite.
_PAD_COST = 2**62

Method = Literal["exact", "anneal"]


class OptimizeError(Exl2Error):
    """A measurement is unusable for this model, or a target bpw is outside what it allows."""


# ---------------------------------------------------------------------------------------------------------------------
# Sizes


def linear_numel(in_features: int, out_features: int, *, pad32: bool = True) -> int:
    """exllamav2's `ExLlamaV2Linear.numel()`: K · N with N padded up to a multiple of 32 (decoder linears pad)."""
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"linear shape ({in_features}, {out_features}) must be positive")
    padded = out_features + (-out_features % 32 if pad32 else 0)
    return in_features * padded


def slot_numel(shapes: Iterable[tuple[int, int]], *, pad32: bool = True) -> int:
    """Σ K · N_padded over a slot's linears, each given as (in_features, out_features); MoE: list every expert."""
    total = sum(linear_numel(k, n, pad32=pad32) for k, n in shapes)
    if total == 0:
        raise ValueError("a slot needs at least one linear")
    return total


def numel_per_slot(
    prefix: str,
    num_layers: int,
    attn_shapes: Iterable[tuple[int, int]],
    mlp_shapes: Iterable[tuple[int, int]],
    *,
    mlp_mode: str = "mlp",
) -> dict[str, int]:
    """Slot key → numel for a model of identical layers, keyed like exllamav2 (`<prefix>layers.<i>.self_attn`)."""
    attn, mlp = slot_numel(attn_shapes), slot_numel(mlp_shapes)
    out: dict[str, int] = {}
    for i in range(num_layers):
        out[f"{prefix}layers.{i}.self_attn"] = attn
        out[f"{prefix}layers.{i}.{mlp_mode}"] = mlp
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Slots and validation


@dataclass(frozen=True)
class Option:
    """One measured candidate of a slot: its position in the measurement list, size, error, and the entry itself."""

    index: int
    total_bits: int
    err: float
    entry: Mapping[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Slot:
    """An attention or MLP block of one decoder layer: its key, weight count (the bpw denominator) and options."""

    key: str
    numel: int
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if self.numel <= 0:
            raise OptimizeError(f"slot {self.key}: numel must be positive, got {self.numel}")
        if not self.options:
            raise OptimizeError(f"slot {self.key}: no options")
        for o in self.options:
            if o.total_bits <= 0 or not 0.0 <= o.err < 1.0:
                raise OptimizeError(f"slot {self.key} option {o.index}: total_bits {o.total_bits}, err {o.err}")


def load_measurement(path: str | Path) -> dict[str, Any]:
    """Read a measurement.json (or an exllamav2 job.json); an empty or non-JSON file is a one-line error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf8")
    except OSError as e:
        raise OptimizeError(f"{path}: cannot read the measurement ({e.strerror})") from e
    if not text.strip():
        raise OptimizeError(f"{path}: the measurement file is empty (not written by a finished measurement?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptimizeError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise OptimizeError(f"{path}: not a measurement (top level is {type(data).__name__}, not an object)")
    return data


def slots_from_measurement(
    measurement: Mapping[str, Any],
    numel_per_slot: Mapping[str, int],
    *,
    source: str | Path | None = None,
    num_modules: int | None = None,
) -> list[Slot]:
    """Validate a measurement against the model's slots (key → numel, in model order) and build the slots.

    `num_modules` (exllamav2's module count: embedding, layers, norm, head) makes the completeness check exact;
    without it a measurement counts as complete when it reaches the head, which is always the last module.
    """
    where = f"{source}: " if source is not None else ""

    def fail(problem: str) -> OptimizeError:
        return OptimizeError(f"{where}{problem}")

    if not numel_per_slot:
        raise fail("the model has no slots to optimize")
    entries = _measurement_entries(measurement, fail)
    found = _layer_slots(entries)
    _check_coverage(list(numel_per_slot), found, measurement, fail)
    _check_complete(entries, measurement["last_module_idx"], num_modules, fail)
    return [_make_slot(key, numel_per_slot[key], found[key], fail) for key in numel_per_slot]


def _measurement_entries(measurement: Mapping[str, Any], fail: Callable[[str], OptimizeError]) -> Mapping[str, Any]:
    if not isinstance(measurement, Mapping) or not measurement:
        raise fail("empty measurement (exllamav2 #389: -m given a file no finished measurement wrote)")
    entries = measurement.get("measurement")
    if not isinstance(entries, Mapping):
        raise fail(f"not a measurement: no 'measurement' object (top-level keys: {_few(measurement)})")
    if not entries:
        raise fail("empty measurement: 'measurement' holds no modules")
    idx = measurement.get("last_module_idx")
    if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
        raise fail(f"'last_module_idx' must be a non-negative integer, got {idx!r}")
    return entries


def _layer_slots(entries: Mapping[str, Any]) -> dict[str, Any]:
    """Slot key → option list; a parallel-decoder entry yields exllamav2's two strategy keys (self_attn, mlp)."""
    found: dict[str, Any] = {}
    for key, value in entries.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            continue
        if m["mode"] == "parallel_decoder":
            base = key[: -len("parallel_decoder")]
            value = value if isinstance(value, Mapping) else {}
            found[base + "self_attn"] = value.get("attn")
            found[base + "mlp"] = value.get("mlp")
        else:
            found[key] = value
    return found


def _check_coverage(
    expected: list[str], found: Mapping[str, Any], measurement: Mapping[str, Any], fail: Callable[[str], OptimizeError]
) -> None:
    known = set(expected)
    foreign = [k for k in found if k not in known]
    missing = [k for k in expected if k not in found]
    reached_head = any(k.endswith(".linear") for k in measurement["measurement"])
    if foreign or not found or (missing and reached_head):
        theirs, ours = _describe(list(found)), _describe(expected)
        raise fail(f"measurement is for a different model: it has {theirs}, the model has {ours}")
    if missing:
        n_present = len(expected) - len(missing)
        if missing == expected[n_present:]:
            raise fail(
                f"measurement is truncated (last_module_idx {measurement['last_module_idx']}): it stops after "
                f"{expected[n_present - 1]}, {len(missing)} of {len(expected)} slots unmeasured; resume or redo it"
            )
        raise fail(f"measurement lacks {len(missing)} slots the model has, e.g. {missing[0]}")


def _check_complete(
    entries: Mapping[str, Any], last_idx: int, num_modules: int | None, fail: Callable[[str], OptimizeError]
) -> None:
    # Module 0 (the embedding) is never measured, so a consistent file has one entry per index 1..last_module_idx.
    if last_idx < len(entries):
        raise fail(f"last_module_idx {last_idx} is below the {len(entries)} modules the file holds: a corrupt file")
    if num_modules is not None and last_idx != num_modules - 1:
        state = "truncated" if last_idx < num_modules - 1 else "for a different model"
        raise fail(f"measurement is {state}: last_module_idx {last_idx}, the model's last module is {num_modules - 1}")
    if num_modules is None and not any(k.endswith(".linear") for k in entries):
        raise fail(f"measurement is truncated: it stops before the head (last_module_idx {last_idx}); resume it")


def _make_slot(key: str, numel: int, raw: Any, fail: Callable[[str], OptimizeError]) -> Slot:
    if not isinstance(numel, int) or isinstance(numel, bool) or numel <= 0:
        raise fail(f"slot {key}: numel must be a positive integer, got {numel!r}")
    if not isinstance(raw, list) or not raw:
        raise fail(f"slot {key}: no options (expected a non-empty list, got {type(raw).__name__})")
    options = tuple(_make_option(key, i, entry, fail) for i, entry in enumerate(raw))
    for o in options:
        bpw = o.total_bits / numel
        if not _SANE_BPW[0] <= bpw <= _SANE_BPW[1]:
            raise fail(
                f"slot {key} option {o.index} is {bpw:.3g} bpw for this model's shapes: "
                "the measurement is for a different model"
            )
    return Slot(key, numel, options)


def _make_option(key: str, index: int, entry: Any, fail: Callable[[str], OptimizeError]) -> Option:
    if not isinstance(entry, Mapping):
        raise fail(f"slot {key} option {index}: expected an object, got {type(entry).__name__}")
    acc, bits = entry.get("accuracy"), entry.get("total_bits")
    if not _is_number(acc) or not 0.0 < acc <= 1.0:
        raise fail(f"slot {key} option {index}: accuracy must be in (0, 1], got {acc!r}")
    if isinstance(bits, float) and bits.is_integer():
        bits = int(bits)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0:
        raise fail(f"slot {key} option {index}: total_bits must be a positive integer, got {bits!r}")
    return Option(index, bits, 1.0 - float(acc), dict(entry))


def _is_number(x: Any) -> TypeGuard[float]:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(map(repr, keys[:n])) + (", ..." if len(keys) > n else "") if keys else "none"


def _describe(keys: list[str]) -> str:
    """'40 layers under 'language_model.model.' (self_attn, mlp)' for a set of slot keys."""
    if not keys:
        return "no decoder-layer slots"
    parts = [m for m in map(_LAYER_KEY.match, keys) if m is not None]
    if not parts:
        return f"slots {_few(keys)}"
    prefixes = sorted({m["prefix"] for m in parts})
    layers = len({(m["prefix"], m["layer"]) for m in parts})
    modes = ", ".join(sorted({m["mode"] for m in parts}))
    return f"{layers} layers under {' / '.join(map(repr, prefixes))} ({modes})"


# ---------------------------------------------------------------------------------------------------------------------
# Strategy


@dataclass(frozen=True)
class Choice:
    """The option chosen for one slot."""

    key: str
    index: int
    total_bits: int
    numel: int
    err: float
    entry: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def bpw(self) -> float:
        return self.total_bits / self.numel


@dataclass(frozen=True)
class Strategy:
    """One option per slot for a target bpw, with the numbers exllamav2 prints for it."""

    target_bpw: float
    budget_bits: int
    numel: int
    norm: float
    choices: tuple[Choice, ...]
    method: str
    seed: int
    # True when the choice before the greedy fill is the proven minimum of Σ err^norm within the budget.
    proven_optimal: bool = False

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.choices)

    @property
    def total_bits(self) -> int:
        return sum(c.total_bits for c in self.choices)

    @property
    def bpw(self) -> float:
        return self.total_bits / self.numel

    @property
    def max_err(self) -> float:
        return max(c.err for c in self.choices)

    @property
    def sum_log_err(self) -> float:
        return sum(math.log(max(c.err, _LOG_ERR_FLOOR)) for c in self.choices)

    def to_json(self) -> dict[str, Any]:
        """Summary numbers plus "strategy": {slot key: chosen measurement entry}, i.e. exllamav2's job["strategy"]."""
        return {
            "target_bpw": self.target_bpw,
            "bpw": self.bpw,
            "total_bits": self.total_bits,
            "budget_bits": self.budget_bits,
            "numel": self.numel,
            "norm": self.norm,
            "max_err": self.max_err,
            "sum_log_err": self.sum_log_err,
            "method": self.method,
            "seed": self.seed,
            "proven_optimal": self.proven_optimal,
            "strategy": {c.key: dict(c.entry) for c in self.choices},
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per slot: key, option index, bpw, expected error, total bits."""
        return [
            {"slot": c.key, "option": c.index, "bpw": c.bpw, "err": c.err, "total_bits": c.total_bits}
            for c in self.choices
        ]

    def format_table(self) -> str:
        lines = [f"{c.key:50} {c.bpw:7.4f} bpw  err {c.err:.8f}  option {c.index}" for c in self.choices]
        lines.append(f"{'total':50} {self.bpw:7.4f} bpw  max err {self.max_err:.6f}  Σ log err {self.sum_log_err:.4f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer


def achievable_bpw(slots: Sequence[Slot]) -> tuple[float, float]:
    """The smallest and largest bpw any choice of options reaches."""
    numel = sum(s.numel for s in slots)
    lo, hi = _bit_range(slots)
    return lo / numel, hi / numel


def _bit_range(slots: Sequence[Slot]) -> tuple[int, int]:
    lo = sum(min(o.total_bits for o in s.options) for s in slots)
    hi = sum(max(o.total_bits for o in s.options) for s in slots)
    return lo, hi


def optimize(
    slots: Sequence[Slot],
    target_bpw: float,
    *,
    seed: int = 0,
    method: Method = "exact",
    fill: bool = True,
    anneal_proposals: int = ANNEAL_PROPOSALS,
) -> Strategy:
    """Pick one option per slot for `target_bpw` with exllamav2's objective (see the module docstring).

    `method="exact"` draws no random numbers (the result does not depend on `seed`); `method="anneal"` runs
    exllamav2's annealer with numpy's PCG64 seeded by `seed`: full fidelity needs `anneal_proposals=1000`, which
    takes minutes. `fill=False` skips exllamav2's final greedy fill, which moves a slot to its next option whenever
    that fits, even where the measured error of that option is higher (it only acts on leftover budget).
    """
    return optimize_many(slots, [target_bpw], seed=seed, method=method, fill=fill, anneal_proposals=anneal_proposals)[0]


def optimize_many(
    slots: Sequence[Slot],
    targets: Iterable[float],
    *,
    seed: int = 0,
    method: Method = "exact",
    fill: bool = True,
    anneal_proposals: int = ANNEAL_PROPOSALS,
) -> list[Strategy]:
    """`optimize` for several targets from one measurement, each independent; all targets are checked first."""
    if not slots:
        raise OptimizeError("no slots to optimize")
    if method not in ("exact", "anneal"):
        raise ValueError(f"method must be 'exact' or 'anneal', not {method!r}")
    tables = _Tables.build(slots)
    targets = list(targets)
    budgets = [_budget(slots, t) for t in targets]
    out = []
    for target, budget in zip(targets, budgets, strict=True):
        if method == "exact":
            solve = _exact_solver(tables, budget)
        else:
            solve = _anneal_solver(tables, budget, seed, anneal_proposals)
        norm, run = _sweep_norms(solve)
        idx = [int(i) for i in run.indices]
        if fill:
            idx = greedy_fill(slots, idx, budget)
        out.append(_strategy(slots, idx, target, budget, norm, method, seed, proven=run.proven))
    return out


def _budget(slots: Sequence[Slot], target_bpw: float) -> int:
    if not _is_number(target_bpw) or target_bpw <= 0:
        raise OptimizeError(f"target {target_bpw!r} bpw is not a positive number")
    numel = sum(s.numel for s in slots)
    budget = int(numel * target_bpw)  # exllamav2's weight_budget
    lo, hi = _bit_range(slots)
    # Round the range inward so the numbers printed are themselves accepted.
    lo_bpw, hi_bpw = math.ceil(lo / numel * 100) / 100, math.floor(hi / numel * 100) / 100
    if budget < lo:
        raise OptimizeError(
            f"target {target_bpw} bpw is below the smallest this measurement allows ({lo_bpw:.2f} bpw; "
            f"range {lo_bpw:.2f}-{hi_bpw:.2f})"
        )
    if budget > hi:
        raise OptimizeError(
            f"target {target_bpw} bpw is above the largest this measurement allows ({hi_bpw:.2f} bpw; "
            f"range {lo_bpw:.2f}-{hi_bpw:.2f})"
        )
    return budget


def _strategy(
    slots: Sequence[Slot],
    idx: Sequence[int],
    target: float,
    budget: int,
    norm: float,
    method: str,
    seed: int,
    *,
    proven: bool,
) -> Strategy:
    choices = []
    for s, i in zip(slots, idx, strict=True):
        o = s.options[int(i)]
        choices.append(Choice(s.key, o.index, o.total_bits, s.numel, o.err, o.entry))
    strategy = Strategy(target, budget, sum(s.numel for s in slots), norm, tuple(choices), method, seed, proven)
    if strategy.total_bits > budget:  # a broken invariant, not a user error
        raise AssertionError(f"strategy uses {strategy.total_bits} bits over the budget {budget}")
    return strategy


def greedy_fill(slots: Sequence[Slot], indices: Sequence[int], budget_bits: int) -> list[int]:
    """exllamav2's final tweak: sweep the slots, moving each to its next option while the total still fits."""
    idx = [int(i) for i in indices]
    cost = sum(s.options[i].total_bits for s, i in zip(slots, idx, strict=True))
    changed = True
    while changed:
        changed = False
        for n, s in enumerate(slots):
            if idx[n] + 1 < len(s.options):
                step = s.options[idx[n] + 1].total_bits - s.options[idx[n]].total_bits
                if cost + step <= budget_bits:
                    cost += step
                    idx[n] += 1
                    changed = True
    return idx


@dataclass(frozen=True)
class _Run:
    """One solve at one norm: the chosen option per slot, its max err and its Σ err^norm."""

    indices: np.ndarray
    max_err: float
    value: float
    proven: bool = False


# A solver returns one run per norm given; with stage3=True the norm is the final one, where the annealer makes
# RUNS_PER_STAGE runs (exllamav2's third stage) and the exact solver reuses its earlier, already optimal, run.
_Solver = Callable[[Sequence[float], bool], list[_Run]]


def _sweep_norms(solve: _Solver) -> tuple[float, _Run]:
    """exllamav2's 3 stages: pick the norm with the smallest max err, then the best Σ err^norm at that norm."""
    lo, hi = NORM_RANGE
    n = RUNS_PER_STAGE
    stage1 = [(1 - t) * lo + t * hi for t in (i / (n - 1) for i in range(n))]
    best_norm, best_max = _best_by_max_err(stage1, solve(stage1, False), math.inf, math.nan)
    # exllamav2 computes t = i/(n-1) - 1 for i in n..2n-1, so its second sweep is shifted up by one step: kept.
    a, b = best_norm - NORM_STAGE2_WIDTH / 2, best_norm + NORM_STAGE2_WIDTH / 2
    stage2 = [(1 - t) * a + t * b for t in (i / (n - 1) - 1 for i in range(n, 2 * n))]
    best_norm, _ = _best_by_max_err(stage2, solve(stage2, False), best_max, best_norm)
    runs = solve([best_norm], True)
    return best_norm, min(runs, key=lambda r: r.value)  # first of equal values, like exllamav2's strict '<'


def _best_by_max_err(
    norms: Sequence[float], runs: list[_Run], best_max: float, best_norm: float
) -> tuple[float, float]:
    for norm, run in zip(norms, runs, strict=True):
        if run.max_err < best_max:
            best_max, best_norm = run.max_err, norm
    return best_norm, best_max


@dataclass(frozen=True)
class _Tables:
    """Options as padded (slots × max options) arrays; padding has an unaffordable cost and infinite error^p."""

    cost: np.ndarray  # int64
    err: np.ndarray  # float64
    valid: np.ndarray  # bool
    counts: np.ndarray  # options per slot
    _powers: dict[float, np.ndarray] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, slots: Sequence[Slot]) -> _Tables:
        width = max(len(s.options) for s in slots)
        cost = np.full((len(slots), width), _PAD_COST, dtype=np.int64)
        err = np.zeros((len(slots), width))
        valid = np.zeros((len(slots), width), dtype=bool)
        for n, s in enumerate(slots):
            k = len(s.options)
            cost[n, :k] = [o.total_bits for o in s.options]
            err[n, :k] = [o.err for o in s.options]
            valid[n, :k] = True
        return cls(cost, err, valid, valid.sum(axis=1))

    def values(self, norm: float) -> np.ndarray:
        """err^norm with padding at +inf, cached because every target sweeps the same stage-1 norms."""
        v = self._powers.get(norm)
        if v is None:
            v = np.where(self.valid, self.err**norm, np.inf)
            self._powers[norm] = v
        return v

    def run(self, idx: np.ndarray, norm: float, *, proven: bool = False) -> _Run:
        rows = np.arange(len(idx))
        return _Run(idx, float(self.err[rows, idx].max()), float(self.values(norm)[rows, idx].sum()), proven)


def _exact_solver(tables: _Tables, budget: int) -> _Solver:
    cache: dict[float, _Run] = {}
    # After one search gives up (a degenerate input), the rest of the sweep uses incumbents, and only the final
    # norm is searched again with a larger front: this bounds the time whatever the input.
    front = [_MAX_FRONT]

    def solve(norms: Sequence[float], stage3: bool) -> list[_Run]:
        for norm in norms:
            if stage3 and norm in cache and not cache[norm].proven:
                del cache[norm]
                front[0] = _MAX_FRONT_FINAL
            if norm not in cache:
                idx, proven = _minimize(tables.values(norm), tables.cost, budget, max_front=front[0])
                cache[norm] = tables.run(idx, norm, proven=proven)
                if not proven:
                    front[0] = 0
        return [cache[norm] for norm in norms]

    return solve


def minimize_norm_sum(slots: Sequence[Slot], budget_bits: int, norm: float) -> list[int]:
    """Option indices minimizing Σ err^norm with Σ total_bits ≤ budget_bits: exact, up to float rounding, except
    on degenerate inputs too large for the search (then within one option of the optimum; see `_minimize`).
    """
    tables = _Tables.build(slots)
    if int(tables.cost.min(axis=1).sum()) > budget_bits:
        raise OptimizeError(f"budget {budget_bits} bits is below the cheapest choice")
    return [int(i) for i in _minimize(tables.values(norm), tables.cost, budget_bits, max_front=_MAX_FRONT_FINAL)[0]]


def _minimize(values: np.ndarray, cost: np.ndarray, budget: int, *, max_front: int) -> tuple[np.ndarray, bool]:
    """Exact multiple-choice knapsack: a Lagrangian bound and incumbent, then Pareto DPs in a widening band.

    For λ ≥ 0 every choice x has Σ v(x) = L(λ) + Σ r(x) + λ·(B − cost(x)) with reduced costs r ≥ 0, so a choice
    worth at most L + g has Σ r ≤ g. The DP over the choices with Σ r ≤ g is therefore exact as soon as its best
    is worth ≤ L + g; g starts small (the search is cheap there) and doubles up to the incumbent's gap. Returns
    the choice and whether it is proven optimal: a DP whose front outgrows `max_front` (inputs with many exactly
    identical layers) is abandoned for the incumbent, which is within one option of the optimum.
    """
    costf = cost.astype(np.float64)
    free = _argmin_rows(values, costf, 0.0)
    if _total(cost, free) <= budget:
        return free, True  # the budget does not bind: every slot takes its best option
    lam_lo, lam_hi = _bracket_multiplier(values, costf, cost, budget)
    incumbent = _improve(values, cost, _argmin_rows(values, costf, lam_hi), budget)
    upper = _total(values, incumbent)
    if max_front == 0:
        return incumbent, False
    # Both ends of the bracket give valid bounds; the better one also gives the tighter reduced costs.
    lam, lower = max(((x, _dual(values, costf, budget, x)) for x in (lam_lo, lam_hi)), key=lambda p: p[1])
    tol = 1e-9 * max(abs(upper), np.finfo(float).tiny)  # rounding of float sums, far below any real difference
    gap = upper - lower + tol
    reduced = values + lam * costf
    reduced -= reduced.min(axis=1, keepdims=True)
    band = gap / 256
    while True:
        last = band >= gap
        limit = upper + tol if last else lower + band
        found = _pareto_dp(values, cost, reduced, budget, band, limit, max_front=max_front)
        if found is _GAVE_UP:
            return incumbent, False
        if found is not None:
            return (found if _total(values, found) < upper else incumbent), True
        if last:
            return incumbent, True  # nothing beats the incumbent
        band = min(band * 2, gap)


def _argmin_rows(values: np.ndarray, costf: np.ndarray, lam: float) -> np.ndarray:
    return np.argmin(values + lam * costf, axis=1)


def _total(table: np.ndarray, idx: np.ndarray) -> Any:
    total = table[np.arange(len(idx)), idx].sum()
    return int(total) if table.dtype.kind == "i" else float(total)


def _dual(values: np.ndarray, costf: np.ndarray, budget: int, lam: float) -> float:
    """L(λ) = Σ_slots min_o (v + λ·c) − λ·B: a lower bound on the optimum for every λ ≥ 0."""
    return float((values + lam * costf).min(axis=1).sum() - lam * budget)


def _bracket_multiplier(values: np.ndarray, costf: np.ndarray, cost: np.ndarray, budget: int) -> tuple[float, float]:
    """λ_lo whose relaxed choice is over budget and λ_hi whose choice fits, close together (bisection)."""
    finite = values[np.isfinite(values)]
    spread = float(finite.max() - finite.min()) or 1.0
    # Start far below any useful multiplier; doubling then reaches one within a factor of 2 in a few dozen steps.
    lam_hi = spread / float(costf[costf < _PAD_COST].max()) * 1e-6
    lam_lo = 0.0
    while _total(cost, _argmin_rows(values, costf, lam_hi)) > budget:
        lam_lo, lam_hi = lam_hi, lam_hi * 2
    for _ in range(48):
        mid = 0.5 * (lam_lo + lam_hi)
        if _total(cost, _argmin_rows(values, costf, mid)) > budget:
            lam_lo = mid
        else:
            lam_hi = mid
    return lam_lo, lam_hi


def _improve(values: np.ndarray, cost: np.ndarray, idx: np.ndarray, budget: int) -> np.ndarray:
    """Spend leftover budget: repeatedly take the single-slot change that lowers Σ v the most and still fits."""
    idx = idx.copy()
    rows = np.arange(len(idx))
    while True:
        slack = budget - _total(cost, idx)
        dv = values - values[rows, idx][:, None]
        fits = (cost - cost[rows, idx][:, None] <= slack) & (dv < 0)
        if not fits.any():
            return idx
        flat = int(np.argmin(np.where(fits, dv, np.inf)))
        idx[flat // values.shape[1]] = flat % values.shape[1]


def _pareto_dp(
    values: np.ndarray,
    cost: np.ndarray,
    reduced: np.ndarray,
    budget: int,
    band: float,
    limit: float,
    *,
    max_front: int,
) -> np.ndarray | None:
    """The best choice worth ≤ limit among those whose options all have r ≤ band, None if there is none, or
    _GAVE_UP once the front outgrows `max_front`.

    Slots with one admissible option are fixed; the others are added one at a time, keeping only the Pareto front
    of partial (cost, Σ v) states: of two partial choices the cheaper-and-better one has every completion better.
    A state is dropped when the rest cannot fit the budget or when even the LP relaxation of the rest, given the
    budget left, takes it past `limit`.
    """
    admissible = reduced <= band
    idx = np.argmax(admissible, axis=1)  # the fixed slots' single option; the open ones are overwritten below
    open_slots = np.flatnonzero(admissible.sum(axis=1) > 1)
    rows = np.arange(len(idx))
    fixed = np.ones(len(idx), dtype=bool)
    fixed[open_slots] = False
    state_cost = np.array([cost[rows, idx][fixed].sum()], dtype=np.int64)
    state_val = np.array([values[rows, idx][fixed].sum()])
    tails = _lp_tails(values[open_slots], cost[open_slots], admissible[open_slots])
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for k, slot in enumerate(open_slots):
        opts = np.flatnonzero(admissible[slot])
        c = (state_cost[:, None] + cost[slot, opts]).ravel()
        v = (state_val[:, None] + values[slot, opts]).ravel()
        least, steps_cost, steps_val = tails[k + 1]
        left = (budget - least - c).astype(np.float64)
        keep = np.flatnonzero((left >= 0) & (v + np.interp(left, steps_cost, steps_val) <= limit))
        if len(keep) == 0:
            return None
        keep = keep[_pareto(c[keep], v[keep])]
        if len(keep) > max_front:
            return _GAVE_UP
        trail.append((keep // len(opts), opts[keep % len(opts)]))
        state_cost, state_val = c[keep], v[keep]
    best = int(np.argmin(state_val))
    for slot, (parent, choice) in zip(open_slots[::-1], trail[::-1], strict=True):
        idx[slot] = choice[best]
        best = int(parent[best])
    return idx


def _lp_tails(values: np.ndarray, cost: np.ndarray, admissible: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """For each k, the LP relaxation of slots k.. as a function of the budget above their cheapest choice.

    Returned as (cheapest total cost, breakpoints' extra cost, breakpoints' value): the relaxation starts every
    slot at its cheapest option and buys convex-hull steps in order of value gained per bit, the last one in part,
    so it is piecewise linear through those breakpoints and flat after the last.
    """
    n = len(values)
    start_cost, start_val = np.zeros(n, dtype=np.int64), np.zeros(n)
    owner, d_cost, d_val = [], [], []
    for k in range(n):
        opts = np.flatnonzero(admissible[k])
        hull = _lower_hull(cost[k, opts], values[k, opts])
        start_cost[k], start_val[k] = hull[0]
        for (c0, v0), (c1, v1) in itertools.pairwise(hull):
            owner.append(k)
            d_cost.append(c1 - c0)
            d_val.append(v1 - v0)
    dc, dv, who = np.array(d_cost, dtype=np.float64), np.array(d_val), np.array(owner, dtype=np.int64)
    order = np.argsort(dv / dc, kind="stable")  # most negative Δv per bit first
    dc, dv, who = dc[order], dv[order], who[order]
    tails = []
    for k in range(n + 1):
        mine = who >= k
        xs = np.concatenate([[0.0], np.cumsum(dc[mine])])
        ys = start_val[k:].sum() + np.concatenate([[0.0], np.cumsum(dv[mine])])
        tails.append((int(start_cost[k:].sum()), xs, ys))
    return tails


def _lower_hull(cost: np.ndarray, val: np.ndarray) -> list[tuple[int, float]]:
    """The lower-left convex hull of a slot's (cost, value) points, cheapest first, value strictly decreasing."""
    hull: list[tuple[int, float]] = []
    for i in _pareto(cost, val):
        p = (int(cost[i]), float(val[i]))
        while len(hull) >= 2 and _not_convex(hull[-2], hull[-1], p):
            hull.pop()
        hull.append(p)
    return hull


def _not_convex(a: tuple[int, float], b: tuple[int, float], c: tuple[int, float]) -> bool:
    """b lies on or above the segment a-c, so it is never an LP breakpoint."""
    return (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0])


def _pareto(cost: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Positions of the non-dominated (cost, value) pairs, cheapest first; ties keep the earliest.

    Values within a relative 1e-12 count as equal: sums of the same options added in another order differ in the
    last bits, and without this, identical layers would keep every permutation of the same choice alive.
    """
    order = np.lexsort((val, cost))
    v = val[order]
    best_before = np.minimum.accumulate(v)
    keep = np.ones(len(v), dtype=bool)
    keep[1:] = v[1:] < best_before[:-1] * (1 - _SAME_VALUE)
    return order[keep]


# ---------------------------------------------------------------------------------------------------------------------
# exllamav2's annealer, for reference and for method="anneal"


def anneal(
    slots: Sequence[Slot],
    budget_bits: int,
    norms: Sequence[float],
    *,
    seed: int,
    proposals: int = ANNEAL_PROPOSALS,
) -> list[list[int]]:
    """exllamav2's `sim_anneal`, one independent run per norm, all runs advanced together as numpy vectors.

    Every run starts from option 0 in every slot; each proposal is a random slot and option, rejected if it breaks
    the budget, else accepted by Metropolis on Σ err^norm at the current temperature (2 → 1e-4, ×0.995).
    """
    tables = _Tables.build(slots)
    runs = _anneal_runs(tables, budget_bits, list(norms), np.random.default_rng(seed), proposals)
    return [[int(i) for i in r.indices] for r in runs]


def _anneal_solver(tables: _Tables, budget: int, seed: int, proposals: int) -> _Solver:
    rng = np.random.default_rng(seed)

    def solve(norms: Sequence[float], stage3: bool) -> list[_Run]:
        # The third stage is RUNS_PER_STAGE runs at the one best norm.
        runs = _anneal_runs(tables, budget, list(norms) * (RUNS_PER_STAGE if stage3 else 1), rng, proposals)
        over = [r for r in runs if _total(tables.cost, r.indices) > budget]
        if over:
            raise OptimizeError("annealing ended over budget: option 0 of every slot does not fit the target")
        return runs

    return solve


def _anneal_runs(
    tables: _Tables, budget: int, norms: list[float], rng: np.random.Generator, proposals: int
) -> list[_Run]:
    n_runs, n_slots = len(norms), tables.cost.shape[0]
    values = np.stack([tables.values(n) for n in norms])  # runs × slots × options
    runs = np.arange(n_runs)
    idx = np.zeros((n_runs, n_slots), dtype=np.int64)
    spent = np.full(n_runs, tables.cost[:, 0].sum(), dtype=np.int64)
    temp = ANNEAL_TEMP_MAX
    steps = int(math.log(ANNEAL_TEMP_MIN / ANNEAL_TEMP_MAX) / math.log(ANNEAL_COOLING))
    for _ in range(steps):
        # One block of random numbers per temperature: slot, option (scaled per slot below) and acceptance draw.
        slot_draw = rng.integers(0, n_slots, size=(proposals, n_runs))
        option_draw = rng.random((proposals, n_runs))
        accept_draw = rng.random((proposals, n_runs))
        for k in range(proposals):
            s = slot_draw[k]
            new = (option_draw[k] * tables.counts[s]).astype(np.int64)
            old = idx[runs, s]
            d_cost = tables.cost[s, new] - tables.cost[s, old]
            d_val = values[runs, s, new] - values[runs, s, old]
            with np.errstate(over="ignore"):
                ok = (spent + d_cost <= budget) & ((d_val < 0) | (accept_draw[k] < np.exp(-d_val / temp)))
            idx[runs[ok], s[ok]] = new[ok]
            spent += np.where(ok, d_cost, 0)
        temp *= ANNEAL_COOLING
    return [tables.run(idx[r], norm) for r, norm in enumerate(norms)]
