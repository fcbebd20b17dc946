"""The candidate tables and bit accounting against exllamav2 0.3.2 (docs/exl2-format.md §2.3-2.5).

The expected bpw values are the doc's tables, which were computed with exllamav2's own `QParams.total_bits`; a row's
bpw is the sum of its linears' total bits over the sum of their K·N.
"""

from __future__ import annotations

import json

import pytest

from quantize import candidates as cand
from quantize.qparams import QParams, bpw, total_bits

PIXTRAL_12B = {"hidden": 5120, "q_dim": 4096, "kv_dim": 1024, "ffn": 14336}
PIXTRAL_LARGE = {"hidden": 12288, "q_dim": 12288, "kv_dim": 1024, "ffn": 28672}

# (bpw 12B, bpw Large) per row, docs/exl2-format.md §2.4
ATTN_BPW = [
    ("2.130", "2.120"), ("2.193", "2.177"), ("2.275", "2.209"), ("2.669", "2.656"), ("3.153", "3.140"),
    ("3.156", "3.141"), ("4.043", "4.036"), ("4.046", "4.037"), ("4.081", "4.070"), ("4.137", "4.130"),
    ("4.156", "4.141"), ("4.185", "4.174"), ("4.268", "4.206"), ("4.328", "4.266"), ("5.243", "5.175"),
    ("5.328", "5.266"), ("6.043", "6.036"), ("6.337", "6.207"), ("8.043", "8.036"),
]  # fmt: skip
MLP_BPW = [
    ("2.236", "2.234"), ("2.319", "2.317"), ("2.588", "2.587"), ("2.904", "2.904"), ("3.274", "3.270"),
    ("3.364", "3.361"), ("3.618", "3.614"), ("4.136", "4.133"), ("4.197", "4.194"), ("4.257", "4.254"),
    ("4.347", "4.344"), ("5.240", "5.237"), ("5.330", "5.328"), ("6.071", "6.068"), ("6.269", "6.273"),
    ("6.835", "6.838"), ("8.035", "8.033"),
]  # fmt: skip
HEAD_BPW = {2: "2.725", 3: "3.275", 4: "4.425", 5: "5.181", 6: "6.331", 8: "8.031"}


def _attn(dims: dict[str, int]) -> tuple[tuple[int, int], ...]:
    return cand.attn_shapes(dims["hidden"], dims["q_dim"], dims["kv_dim"])


def _mlp(dims: dict[str, int]) -> tuple[tuple[int, int], ...]:
    return cand.mlp_shapes(dims["hidden"], dims["ffn"])


def test_table_sizes() -> None:
    assert len(cand.ATTN_ROWS) == 19 and all(len(row) == 4 for row in cand.ATTN_ROWS)
    assert len(cand.MLP_ROWS) == 17 and all(len(row) == 3 for row in cand.MLP_ROWS)
    assert sorted(cand.HEAD_OPTIONS) == list(cand.HEAD_BITS) == [2, 3, 4, 5, 6, 8]


def test_distinct_configs_per_slot() -> None:
    assert [len(cand.distinct_configs("self_attn", s)) for s in cand.ATTN_SLOTS] == [14, 14, 15, 14]
    assert [len(cand.distinct_configs("mlp", s)) for s in cand.MLP_SLOTS] == [13, 13, 14]
    for mode, rows in (("self_attn", cand.ATTN_ROWS), ("mlp", cand.MLP_ROWS)):
        distinct, maps = cand.reduce_rows(rows)
        for row, indices in zip(rows, maps, strict=True):  # every row is rebuilt from the distinct configs
            assert [distinct[s][i].desc for s, i in enumerate(indices)] == [qp.desc for qp in row]
        for slot, configs in enumerate(distinct):
            assert len({qp.desc for qp in configs}) == len(configs)
            assert configs == cand.distinct_configs(
                mode, (cand.ATTN_SLOTS if mode == "self_attn" else cand.MLP_SLOTS)[slot]
            )


def test_first_distinct_q_configs_in_exllamav2_order() -> None:
    descs = [qp.desc for qp in cand.distinct_configs("self_attn", "q_proj")]
    assert descs[:6] == [
        "0.05:3b_64g/0.95:2b_64g s4",
        "0.1:3b_64g/0.9:2b_64g s4",
        "0.1:4b_128g/0.9:3b_128g s4",
        "1:4b_128g s4",
        "1:4b_64g s4",
        "1:4b_32g s4",
    ]
    assert descs[-1] == "1:8b_128g s4"


def test_candidate_rows_keyed_by_linear() -> None:
    rows = cand.candidate_rows("mlp")
    assert list(rows[4]) == ["gate_proj", "up_proj", "down_proj"]
    assert rows[4]["down_proj"].desc == "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g s4"
    assert rows[4]["down_proj"].group_size == {8: 32, 4: 128, 3: 128}
    with pytest.raises(ValueError, match="no candidate table for module mode 'norm'"):
        cand.candidate_rows("norm")
    with pytest.raises(ValueError, match="mlp has no linear 'q_proj'"):
        cand.distinct_configs("mlp", "q_proj")


def test_measurement_json_form() -> None:
    """A0's q_proj as measurement.json stores it (doc §3), and the int/float proportions exllamav2 prints."""
    first = cand.candidate_rows("self_attn")[0]["q_proj"]
    assert json.dumps(first.to_dict()) == (
        '{"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4}'
    )
    assert json.dumps(cand.ATTN_ROWS[6][0].to_dict()["bits_prop"]) == "[1]"
    assert cand.head_config(8).desc == "1.0:8b_128g s4"
    assert QParams.from_dict(first.to_dict()) == first


@pytest.mark.parametrize("row", range(19))
def test_attention_row_bpw(row: int) -> None:
    got = [f"{cand.row_bpw(cand.ATTN_ROWS[row], _attn(d)):.3f}" for d in (PIXTRAL_12B, PIXTRAL_LARGE)]
    assert tuple(got) == ATTN_BPW[row]


@pytest.mark.parametrize("row", range(17))
def test_mlp_row_bpw(row: int) -> None:
    got = [f"{cand.row_bpw(cand.MLP_ROWS[row], _mlp(d)):.3f}" for d in (PIXTRAL_12B, PIXTRAL_LARGE)]
    assert tuple(got) == MLP_BPW[row]


def test_a0_total_bits_matches_measurement_json() -> None:
    assert cand.row_total_bits(cand.ATTN_ROWS[0], _attn(PIXTRAL_12B)) == 111655168


@pytest.mark.parametrize("head_bits", [2, 3, 4, 5, 6, 8])
def test_head_options_bpw(head_bits: int) -> None:
    assert f"{bpw(cand.head_config(head_bits), 5120, 131072):.3f}" == HEAD_BPW[head_bits]


def test_head_bits_outside_table() -> None:
    with pytest.raises(ValueError, match="head bits 7 not available; allowed 2, 3, 4, 5, 6, 8"):
        cand.head_config(7)


def test_total_bits_terms() -> None:
    """4-bit, gs 128, K=256, N=100: two groups; padding columns not counted; 16 bits per bias element."""
    qp = QParams.make([4], [1], 128)
    weight, per_group, invperm = 256 * 100 * 4, 16 + 32 + 100 * 4, 256 * 32
    assert total_bits(qp, 256, 100) == weight + 2 * per_group + invperm
    assert total_bits(qp, 256, 100, bias_numel=100) == weight + 2 * per_group + invperm + 1600
    assert bpw(qp, 256, 100, bias_numel=100) == total_bits(qp, 256, 100, bias_numel=100) / (256 * 100 + 100)


def test_total_bits_short_last_group() -> None:
    """Pixtral-12B down_proj at [8,4]/[0.05,0.95]/[32,128]: 23 8-bit groups, 107 4-bit groups (the last 32 rows);
    q_weight rows are capped at K while every group counts its overhead."""
    qp = QParams.make([8, 4], [0.05, 0.95], [32, 128])
    k, n = 14336, 5120
    expected = (736 * 8 + (k - 736) * 4) * n + 130 * (16 + 32 + 4 * n) + 32 * k
    assert total_bits(qp, k, n) == expected
    assert qp.groups(k)[-1] == (4, 32)


def test_total_bits_negative_count_quirk() -> None:
    """exllamav2 lets a width's group count go negative when a smaller group size follows an overshoot.

    K=64 at [4,3]/[0.5,0.5]/{4: 128, 3: 32}: the 4-bit width takes ceil(32/128) = 1 group (128 rows, capped to 64),
    leaving -64 rows, so the 3-bit width counts ceil(-64/32) = -2 groups: -64 rows of 3 bits and -1 group in all.
    """
    qp = QParams.make([4, 3], [0.5, 0.5], {4: 128, 3: 32})
    n = 32
    assert total_bits(qp, 64, n) == 64 * n * 4 - 64 * n * 3 - (16 + 32 + 4 * n) + 64 * 32
    assert qp.groups(64) == [(4, 64)]  # the real partition is unaffected


def test_parse_config_round_trip() -> None:
    qp = cand.parse_config("8:0.05@32/6:0.1@128/5:0.85@128")
    assert qp.bits == (8, 6, 5) and qp.bits_prop == (0.05, 0.1, 0.85) and qp.group_size == {8: 32, 6: 128, 5: 128}
    assert qp.desc == "0.05:8b_32g/0.1:6b_128g/0.85:5b_128g s4"
