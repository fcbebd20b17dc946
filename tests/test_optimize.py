"""The optimizer: budget use, monotonicity, sensitivity, determinism, exactness, validation, speed, schema."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest

from quantize.errors import Exl2Error
from quantize.optimize import (
    OptimizeError,
    Option,
    Slot,
    achievable_bpw,
    anneal,
    greedy_fill,
    linear_numel,
    load_measurement,
    minimize_norm_sum,
    numel_per_slot,
    optimize,
    optimize_many,
    slot_numel,
    slots_from_measurement,
)

PREFIX = "language_model.model."
# bpw of exllamav2's 19 attention and 17 MLP candidate rows at Pixtral-Large shapes (docs/exl2-format.md §2.4).
ATTN_BPW = [2.120, 2.177, 2.209, 2.656, 3.140, 3.141, 4.036, 4.037, 4.070, 4.130, 4.141, 4.174, 4.206, 4.266]
ATTN_BPW += [5.175, 5.266, 6.036, 6.207, 8.036]
MLP_BPW = [2.234, 2.317, 2.587, 2.904, 3.270, 3.361, 3.614, 4.133, 4.194, 4.254, 4.344, 5.237, 5.328, 6.068]
MLP_BPW += [6.273, 6.838, 8.033]
SENSITIVE = (0, 7)


def make_measurement(layers, attn_shapes, mlp_shapes, *, noise=0.0, seed=0):
    """An exllamav2-schema measurement: errors fall with bits; layers 0 and 7 are 4x as sensitive."""
    rng = np.random.default_rng(seed)
    numel = numel_per_slot(PREFIX, layers, attn_shapes, mlp_shapes)
    entries = {}
    for i in range(layers):
        for mode, table in (("self_attn", ATTN_BPW), ("mlp", MLP_BPW)):
            key = f"{PREFIX}layers.{i}.{mode}"
            base = (0.02 if mode == "self_attn" else 0.03) * (1 + 0.07 * i) * (4 if i in SENSITIVE else 1)
            options = []
            for bpw in table:
                err = base * 2 ** (-1.1 * (bpw - 2)) * math.exp(noise * rng.normal())
                options.append({"accuracy": 1 - err, "total_bits": round(bpw * numel[key]), "note": f"{bpw}"})
            entries[key] = options
    entries[f"{PREFIX}norm.norm"] = None
    entries["language_model.lm_head.linear"] = None
    return {"measurement": entries, "last_module_idx": 2 * layers + 2}, numel


SMALL_ATTN = [(1024, 1024), (1024, 256), (1024, 256), (1024, 1024)]
SMALL_MLP = [(1024, 2816), (1024, 2816), (2816, 1024)]


@pytest.fixture(scope="module")
def small():
    measurement, numel = make_measurement(8, SMALL_ATTN, SMALL_MLP)
    return slots_from_measurement(measurement, numel)


def brute_force(slots, budget, norm):
    best = math.inf
    for combo in itertools.product(*(range(len(s.options)) for s in slots)):
        if sum(s.options[j].total_bits for s, j in zip(slots, combo, strict=True)) <= budget:
            best = min(best, sum(s.options[j].err ** norm for s, j in zip(slots, combo, strict=True)))
    return best


def norm_sum(slots, indices, norm):
    return sum(s.options[j].err ** norm for s, j in zip(slots, indices, strict=True))


# --- sizes -----------------------------------------------------------------------------------------------------------


def test_numel_pads_output_features_to_32():
    assert linear_numel(5120, 4096) == 5120 * 4096
    assert linear_numel(64, 100) == 64 * 128
    assert linear_numel(64, 100, pad32=False) == 6400
    assert slot_numel([(10, 1), (10, 33)]) == 10 * 32 + 10 * 64
    numel = numel_per_slot("m.", 2, [(8, 32)], [(8, 64)], mlp_mode="block_sparse_moe")
    assert numel == {"m.layers.0.self_attn": 256, "m.layers.0.block_sparse_moe": 512, **numel} and len(numel) == 4


# --- (a) the budget ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [2.3, 3.0, 4.0, 4.65, 5.0, 6.0, 7.5])
def test_bpw_at_most_target_and_within_one_option_step(small, target):
    s = optimize(small, target, seed=0)
    numel = sum(x.numel for x in small)
    assert s.budget_bits == int(numel * target)
    assert s.total_bits <= s.budget_bits and s.bpw <= target
    # Leftover budget is smaller than any slot's step to its next option (the greedy fill spent the rest).
    steps = [
        slot.options[i + 1].total_bits - slot.options[i].total_bits
        for slot, i in zip(small, s.indices, strict=True)
        if i + 1 < len(slot.options)
    ]
    assert s.budget_bits - s.total_bits < min(steps)
    assert target - s.bpw < max(steps) / numel


# --- (b) more bits, less error ---------------------------------------------------------------------------------------


def test_higher_target_never_worse(small):
    targets = [2.3, 2.6, 3.0, 4.0, 5.0, 6.0, 8.0]
    strategies = optimize_many(small, targets, seed=0)
    for lo, hi in itertools.pairwise(strategies):
        assert hi.total_bits >= lo.total_bits
        assert hi.max_err <= lo.max_err
        assert hi.sum_log_err <= lo.sum_log_err + 1e-12
    numel = sum(x.numel for x in small)
    # At one norm the exact optimum is monotone in the budget by construction.
    values = [norm_sum(small, minimize_norm_sum(small, int(numel * t), 2.5), 2.5) for t in targets]
    assert values == sorted(values, reverse=True)


# --- (c) sensitivity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [3.0, 4.0, 5.0])
def test_sensitive_layers_get_more_bits(small, target):
    s = optimize(small, target, seed=0)
    for mode in ("self_attn", "mlp"):
        rows = [c for c in s.choices if c.key.endswith(mode)]
        sensitive = [c.bpw for n, c in enumerate(rows) if n in SENSITIVE]
        others = [c.bpw for n, c in enumerate(rows) if n not in SENSITIVE]
        assert min(sensitive) > max(others)


# --- (d) determinism -----------------------------------------------------------------------------------------------


def test_deterministic_per_seed(small):
    a = optimize(small, 4.0, seed=7).to_json()
    assert optimize(small, 4.0, seed=7).to_json() == a
    # The exact search draws no random numbers: the seed is only recorded.
    b = optimize(small, 4.0, seed=8).to_json()
    assert b.pop("seed") == 8 and {**b, "seed": 7} == a


def test_anneal_is_seeded_and_never_beats_the_exact_search(small):
    numel = sum(x.numel for x in small)
    budget = int(numel * 4.0)
    runs = anneal(small, budget, [2.5] * 8, seed=3, proposals=10)
    assert runs == anneal(small, budget, [2.5] * 8, seed=3, proposals=10)
    assert runs != anneal(small, budget, [2.5] * 8, seed=4, proposals=10)
    exact = norm_sum(small, minimize_norm_sum(small, budget, 2.5), 2.5)
    for run in runs:
        assert sum(s.options[i].total_bits for s, i in zip(small, run, strict=True)) <= budget
        assert norm_sum(small, run, 2.5) >= exact
    full = optimize(small, 4.0, seed=5, method="anneal", anneal_proposals=2)
    assert full.to_json() == optimize(small, 4.0, seed=5, method="anneal", anneal_proposals=2).to_json()
    assert full.total_bits <= full.budget_bits and full.method == "anneal"


# --- (e) exactness -------------------------------------------------------------------------------------------------


def tiny_slots(costs, errs):
    return [
        Slot(f"s{i}", 100, tuple(Option(j, c, e, {}) for j, (c, e) in enumerate(zip(cs, es, strict=True))))
        for i, (cs, es) in enumerate(zip(costs, errs, strict=True))
    ]


def test_agrees_with_brute_force_on_3_slots_x_4_options():
    slots = tiny_slots(
        [[200, 260, 410, 800], [210, 300, 420, 790], [190, 330, 400, 810]],
        [[0.09, 0.05, 0.02, 0.004], [0.2, 0.06, 0.03, 0.01], [0.05, 0.03, 0.025, 0.002]],
    )
    for target in (2.0, 2.3, 2.7, 3.2, 4.0, 5.0, 8.0):
        s = optimize(slots, target, seed=0, fill=False)
        assert norm_sum(slots, s.indices, s.norm) == pytest.approx(brute_force(slots, s.budget_bits, s.norm), rel=1e-9)
        filled = optimize(slots, target, seed=0)
        assert filled.indices == tuple(greedy_fill(slots, s.indices, s.budget_bits))


def test_agrees_with_brute_force_on_random_instances():
    rng = np.random.default_rng(11)
    for _ in range(60):
        n_slots, n_opts = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        costs = rng.integers(1, 40, size=(n_slots, n_opts)).tolist()
        errs = np.round(rng.random((n_slots, n_opts)) * 0.9, int(rng.integers(1, 4))).tolist()  # with ties
        slots = tiny_slots(costs, errs)
        budget = int(rng.integers(sum(map(min, costs)), sum(map(max, costs)) + 1))
        norm = float(rng.uniform(1.5, 3.5))
        chosen = minimize_norm_sum(slots, budget, norm)
        assert sum(s.options[j].total_bits for s, j in zip(slots, chosen, strict=True)) <= budget
        assert norm_sum(slots, chosen, norm) <= brute_force(slots, budget, norm) * (1 + 1e-9)


def test_agrees_with_an_integer_budget_dp_on_medium_instances():
    rng = np.random.default_rng(5)
    for trial in range(20):
        costs = rng.integers(1, 40, size=(int(rng.integers(8, 25)), int(rng.integers(2, 8))))
        errs = rng.random(costs.shape) * 0.9
        if trial % 4 == 0:  # identical slots: many ties
            costs[:], errs[:] = costs[0], errs[0]
        slots = tiny_slots(costs.tolist(), errs.tolist())
        budget = int(rng.integers(costs.min(axis=1).sum(), costs.max(axis=1).sum() + 1))
        norm = float(rng.uniform(1.5, 3.5))
        values = errs**norm
        best = np.full(budget + 1, np.inf)  # best[b]: least Σ v with total cost exactly b
        best[0] = 0.0
        for c_row, v_row in zip(costs, values, strict=True):
            step = np.full(budget + 1, np.inf)
            for c, v in zip(c_row, v_row, strict=True):
                step[c:] = np.minimum(step[c:], best[: budget + 1 - c] + v)
            best = step
        chosen = minimize_norm_sum(slots, budget, norm)
        assert norm_sum(slots, chosen, norm) == pytest.approx(best.min(), rel=1e-9)


def test_gives_up_gracefully_when_the_exact_search_outgrows_its_front(small, monkeypatch):
    import quantize.optimize as opt

    exact = optimize(small, 4.0, seed=0)
    assert exact.proven_optimal
    monkeypatch.setattr(opt, "_MAX_FRONT", 2)
    monkeypatch.setattr(opt, "_MAX_FRONT_FINAL", 2)
    rough = optimize(small, 4.0, seed=0, fill=False)
    assert not rough.proven_optimal and rough.total_bits <= rough.budget_bits
    # The fallback (Lagrangian choice plus greedy improvement) is close to the optimum at its norm.
    monkeypatch.undo()
    optimum = norm_sum(small, minimize_norm_sum(small, rough.budget_bits, rough.norm), rough.norm)
    assert optimum <= norm_sum(small, rough.indices, rough.norm) <= optimum * 1.05


# --- (f) validation ------------------------------------------------------------------------------------------------


@pytest.fixture()
def good():
    return make_measurement(8, SMALL_ATTN, SMALL_MLP)


def test_empty_measurement(good, tmp_path):
    _, numel = good
    for empty in ({}, {"measurement": {}, "last_module_idx": 0}):
        with pytest.raises(OptimizeError, match=r"^m\.json: empty measurement"):
            slots_from_measurement(empty, numel, source="m.json")
    path = tmp_path / "measurement.json"
    path.write_text("")
    with pytest.raises(OptimizeError, match=r"measurement\.json: the measurement file is empty"):
        load_measurement(path)
    path.write_text("{not json")
    with pytest.raises(OptimizeError, match=r"measurement\.json: not JSON \(line 1"):
        load_measurement(path)
    with pytest.raises(OptimizeError, match="no 'measurement' object"):
        slots_from_measurement({"bits": 4.0}, numel)


def test_truncated_measurement(good):
    measurement, numel = good
    entries = dict(itertools.islice(measurement["measurement"].items(), 11))  # layers 0-4 and layer 5's attention
    with pytest.raises(
        OptimizeError, match=r"^m\.json: measurement is truncated \(last_module_idx 11\).*layers\.5\.self_attn, 5 of 16"
    ):
        slots_from_measurement({"measurement": entries, "last_module_idx": 11}, numel, source="m.json")
    every_slot = {k: v for k, v in measurement["measurement"].items() if ".layers." in k}
    with pytest.raises(OptimizeError, match="stops before the head"):
        slots_from_measurement({"measurement": every_slot, "last_module_idx": 16}, numel)
    with pytest.raises(OptimizeError, match="truncated: last_module_idx 18, the model's last module is 19"):
        slots_from_measurement(measurement, numel, num_modules=20)
    assert len(slots_from_measurement(measurement, numel, num_modules=19)) == 16


def test_measurement_for_another_model(good):
    measurement, _ = good
    more_layers = numel_per_slot(PREFIX, 12, SMALL_ATTN, SMALL_MLP)
    with pytest.raises(
        OptimizeError, match=r"different model: it has 8 layers under 'language_model\.model\.'.*has 12"
    ):
        slots_from_measurement(measurement, more_layers)
    fewer_layers = numel_per_slot(PREFIX, 6, SMALL_ATTN, SMALL_MLP)
    with pytest.raises(OptimizeError, match=r"different model: it has 8 layers.*the model has 6 layers"):
        slots_from_measurement(measurement, fewer_layers)
    other_prefix = numel_per_slot("model.", 8, SMALL_ATTN, SMALL_MLP)
    with pytest.raises(OptimizeError, match=r"different model.*the model has 8 layers under 'model\.'"):
        slots_from_measurement(measurement, other_prefix)
    bigger = numel_per_slot(PREFIX, 8, [(4096, 4096)] * 4, [(4096, 14336)] * 3)
    with pytest.raises(OptimizeError, match=r"option 0 is 0\.\d+ bpw for this model's shapes: .*different model"):
        slots_from_measurement(measurement, bigger)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"accuracy": 0.0, "total_bits": 100}, r"accuracy must be in \(0, 1\], got 0\.0"),
        ({"accuracy": 1.5, "total_bits": 100}, "accuracy must be in"),
        ({"accuracy": "0.9", "total_bits": 100}, "accuracy must be in"),
        ({"total_bits": 100}, "accuracy must be in .* got None"),
        ({"accuracy": 0.9, "total_bits": 0}, "total_bits must be a positive integer, got 0"),
        ({"accuracy": 0.9, "total_bits": 1.5}, "total_bits must be a positive integer, got 1.5"),
        ({"accuracy": 0.9, "total_bits": True}, "total_bits must be a positive integer"),
        ("A0", "expected an object, got str"),
    ],
)
def test_bad_option(good, entry, message):
    measurement, numel = good
    bad = json.loads(json.dumps(measurement))
    bad["measurement"][f"{PREFIX}layers.3.mlp"][2] = entry
    with pytest.raises(OptimizeError, match=rf"slot {PREFIX}layers\.3\.mlp option 2: {message}"):
        slots_from_measurement(bad, numel)


@pytest.mark.parametrize("options", [[], None, {}])
def test_slot_without_options(good, options):
    measurement, numel = good
    bad = json.loads(json.dumps(measurement))
    bad["measurement"][f"{PREFIX}layers.2.self_attn"] = options
    with pytest.raises(OptimizeError, match=r"layers\.2\.self_attn: no options"):
        slots_from_measurement(bad, numel)


def test_unreachable_targets(small):
    lo, hi = achievable_bpw(small)
    assert 2.1 < lo < 2.3 and 8.0 < hi < 8.1
    with pytest.raises(
        OptimizeError, match=r"^target 1\.8 bpw is below the smallest this measurement allows \(2\.\d\d bpw"
    ):
        optimize(small, 1.8, seed=0)
    with pytest.raises(OptimizeError, match=r"^target 8\.5 bpw is above the largest .* \(8\.0\d bpw"):
        optimize(small, 8.5, seed=0)
    for bad in (0, -1.0, math.nan, math.inf, "4.0"):
        with pytest.raises(OptimizeError, match="not a positive number"):
            optimize(small, bad, seed=0)  # type: ignore[arg-type]
    # All targets are checked before any work, and the error is an Exl2Error the CLI turns into one line.
    with pytest.raises(Exl2Error, match="below"):
        optimize_many(small, [4.0, 1.0], seed=0)
    # The printed bounds are themselves accepted.
    with pytest.raises(OptimizeError) as below:
        optimize(small, 1.0, seed=0)
    edge = float(str(below.value).split("(")[1].split(" ")[0])
    assert optimize(small, edge, seed=0).bpw <= edge
    with pytest.raises(OptimizeError) as above:
        optimize(small, 9.0, seed=0)
    edge = float(str(above.value).split("(")[1].split(" ")[0])
    assert optimize(small, edge, seed=0).bpw <= edge


# --- (g) realistic size ----------------------------------------------------------------------------------------------


def test_realistic_size_88_layers(record_property):
    large_attn = [(12288, 12288), (12288, 1024), (12288, 1024), (12288, 12288)]
    large_mlp = [(12288, 28672), (12288, 28672), (28672, 12288)]
    measurement, numel = make_measurement(88, large_attn, large_mlp, noise=0.05, seed=1)
    slots = slots_from_measurement(measurement, numel)
    assert len(slots) == 176 and {len(s.options) for s in slots} == {19, 17}
    start = time.perf_counter()
    strategies = optimize_many(slots, [2.5, 4.0, 4.65, 6.0], seed=0)
    seconds = (time.perf_counter() - start) / 4
    record_property("seconds_per_target", seconds)
    print(f"\n88 layers x 19/17 options: {seconds:.2f} s per target")
    for s, target in zip(strategies, [2.5, 4.0, 4.65, 6.0], strict=True):
        assert target - 0.001 < s.bpw <= target
        assert 1.5 <= s.norm <= 3.6 and s.proven_optimal


# --- schema ----------------------------------------------------------------------------------------------------------

# exllamav2's measurement.json for a 2-layer Pixtral-style model (hidden 128, q 128, kv 64, ffn 256), laid out
# like measure.py's json.dumps(indent=4) with the qparams objects compacted: 3 attention and 2 MLP rows, norm
# and head null, last_module_idx 6 (module 0, the embedding, is never measured).
EXLLAMAV2_MEASUREMENT = """{
    "measurement": {
        "language_model.model.layers.0.self_attn": [
            {
                "accuracy": 0.97312,
                "total_bits": 105216,
                "q_proj": {"group_size": {"3": 64, "2": 64},
                    "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
                "k_proj": {"group_size": {"3": 64, "2": 64},
                    "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
                "v_proj": {"group_size": {"3": 64, "2": 64},
                    "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
                "o_proj": {"group_size": {"3": 64, "2": 64},
                    "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4}
            },
            {
                "accuracy": 0.99101,
                "total_bits": 201984,
                "q_proj": {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4},
                "k_proj": {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4},
                "v_proj": {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4},
                "o_proj": {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4}
            },
            {
                "accuracy": 0.99912,
                "total_bits": 397312,
                "q_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4},
                "k_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4},
                "v_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4},
                "o_proj": {"group_size": {"8": 128}, "bits": [8], "bits_prop": [1], "scale_bits": 4}
            }
        ],
        "language_model.model.layers.0.mlp": [
            {
                "accuracy": 0.96205,
                "total_bits": 219648,
                "gate_proj": {"group_size": {"3": 64, "2": 64},
                    "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
                "up_proj": {"group_size": {"3": 64, "2": 64},
                    "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4},
                "down_proj": {"group_size": {"6": 32, "3": 64, "2": 64},
                    "bits": [6, 3, 2], "bits_prop": [0.05, 0.2, 0.75], "scale_bits": 4}
            },
            {
                "accuracy": 0.99003,
                "total_bits": 405504,
                "gate_proj": {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4},
                "up_proj": {"group_size": {"4": 32}, "bits": [4], "bits_prop": [1], "scale_bits": 4},
                "down_proj": {"group_size": {"8": 32, "4": 128},
                    "bits": [8, 4], "bits_prop": [0.05, 0.95], "scale_bits": 4}
            }
        ],
        "language_model.model.layers.1.self_attn": [
            {"accuracy": 0.98011, "total_bits": 105216, "q_proj": {}, "k_proj": {}, "v_proj": {}, "o_proj": {}},
            {"accuracy": 0.99402, "total_bits": 201984, "q_proj": {}, "k_proj": {}, "v_proj": {}, "o_proj": {}},
            {"accuracy": 0.99950, "total_bits": 397312, "q_proj": {}, "k_proj": {}, "v_proj": {}, "o_proj": {}}
        ],
        "language_model.model.layers.1.mlp": [
            {"accuracy": 0.95001, "total_bits": 219648, "gate_proj": {}, "up_proj": {}, "down_proj": {}},
            {"accuracy": 0.98777, "total_bits": 405504, "gate_proj": {}, "up_proj": {}, "down_proj": {}}
        ],
        "language_model.model.norm.norm": null,
        "language_model.lm_head.linear": null
    },
    "last_module_idx": 6
}"""


def test_reads_exllamav2_schema(tmp_path):
    path = tmp_path / "measurement.json"
    path.write_text(EXLLAMAV2_MEASUREMENT)
    numel = numel_per_slot(PREFIX, 2, [(128, 128), (128, 64), (128, 64), (128, 128)], [(128, 256)] * 2 + [(256, 128)])
    assert numel[f"{PREFIX}layers.0.self_attn"] == 49152 and numel[f"{PREFIX}layers.0.mlp"] == 98304
    raw = load_measurement(path)
    slots = slots_from_measurement(raw, numel, source=path, num_modules=7)
    assert [len(s.options) for s in slots] == [3, 2, 3, 2]
    assert slots[0].options[0].err == pytest.approx(1 - 0.97312)
    s = optimize(slots, 4.2, seed=0)
    stored = json.loads(json.dumps(s.to_json()))
    # The strategy holds the chosen measurement entries verbatim, under exllamav2's strategy keys.
    assert list(stored["strategy"]) == list(numel)
    for key, index in zip(numel, s.indices, strict=True):
        assert stored["strategy"][key] == raw["measurement"][key][index]
    assert stored["total_bits"] == s.total_bits <= stored["budget_bits"] == int(sum(numel.values()) * 4.2)
    assert len(s.table()) == 4 and s.format_table().count("\n") == 4


def test_reads_parallel_decoder_entries():
    attn = [{"accuracy": 0.9, "total_bits": 250}, {"accuracy": 0.99, "total_bits": 500}]
    mlp = [{"accuracy": 0.8, "total_bits": 600}, {"accuracy": 0.95, "total_bits": 1200}]
    raw = {
        "measurement": {"model.layers.0.parallel_decoder": {"attn": attn, "mlp": mlp}, "lm_head.linear": None},
        "last_module_idx": 2,
    }
    slots = slots_from_measurement(raw, {"model.layers.0.self_attn": 100, "model.layers.0.mlp": 200})
    assert [s.key for s in slots] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    assert slots[1].options[1].total_bits == 1200
