"""EXL2 packing, unpacking and dequantization against docs/exl2-format.md §1 and exllamav2's kernels.

Layouts are checked against a pure-Python bitstream (Python ints, no torch) and hand-computed words; the
dequantization against hand-computed fp16 values and a numpy oracle that rounds at the kernel's steps.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from quantize.errors import ModelFormatError, UnsupportedArchitectureError
from quantize.format import (
    check_writable,
    dequantize,
    dequantize_codes,
    dequantize_tensors,
    pack,
    padded_width,
    scale_values,
    unpack,
)
from quantize.qlinear import QuantizedLinear
from quantize.qparams import QParams

KEY = "language_model.model.layers.0.self_attn.q_proj"


def make_linear(
    groups: list[tuple[int, int]], n: int, *, seed: int = 0, bias: bool = False, identity: bool = False
) -> QuantizedLinear:
    """A random QuantizedLinear with the given (bits, rows) groups."""
    gen = torch.Generator().manual_seed(seed)
    k = sum(r for _, r in groups)
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen, dtype=torch.int16) for b, r in groups])
    return QuantizedLinear(
        perm=torch.arange(k) if identity else torch.randperm(k, generator=gen),
        group_bits=[b for b, _ in groups],
        group_rows=[r for _, r in groups],
        codes=codes,
        scale_codes=torch.randint(1, 17, (len(groups), n), generator=gen, dtype=torch.int16),
        scale_max=(torch.rand(len(groups), generator=gen) * 0.05 + 1e-4).half(),
        bias=torch.randn(n, generator=gen).half() if bias else None,
    )


def assert_same(a: QuantizedLinear, b: QuantizedLinear) -> None:
    assert a.group_bits == b.group_bits and a.group_rows == b.group_rows
    assert a.perm.dtype == b.perm.dtype == torch.int64 and torch.equal(a.perm, b.perm)
    assert a.codes.dtype == b.codes.dtype == torch.int16 and torch.equal(a.codes, b.codes)
    assert a.scale_codes.dtype == b.scale_codes.dtype == torch.int16 and torch.equal(a.scale_codes, b.scale_codes)
    assert a.scale_max.dtype == b.scale_max.dtype == torch.float16 and torch.equal(a.scale_max, b.scale_max)
    assert (a.bias is None) == (b.bias is None)
    assert a.bias is None or (b.bias is not None and torch.equal(a.bias, b.bias))
    assert a.prescale == b.prescale


def reference_words(column: list[int], bits: int) -> list[int]:
    """The LSB-first bitstream of one column's codes as unsigned 32-bit words, with Python ints."""
    stream = sum(code << (bits * i) for i, code in enumerate(column))
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(len(column) * bits // 32)]


def unsigned(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.tolist()]


# --- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_round_trip_each_width(bits: int) -> None:
    ql = make_linear([(bits, 64)] * 4, 64, seed=bits)
    tensors = pack(ql)
    assert_same(unpack(tensors, out_features=64), ql)
    assert tensors["q_weight"].shape == (256 * bits // 32, 64)


@pytest.mark.parametrize(
    ("qp", "k", "n"),
    [
        (QParams.make([8, 4], [0.05, 0.95], [32, 128]), 320, 100),  # short last 4-bit group, N padded
        (QParams.make([6, 3, 2], [0.05, 0.2, 0.75], [32, 64, 64]), 224, 72),
        (QParams.make([4], [1], 128), 160, 33),  # K not a multiple of the group size
        (QParams.make([5, 4], [0.1, 0.9], 32), 256, 1),
        (QParams.make([2], [1], 16), 64, 32),  # 16-row 2-bit groups
    ],
)
def test_round_trip_mixed(qp: QParams, k: int, n: int) -> None:
    ql = make_linear(qp.groups(k), n, seed=k)
    assert_same(unpack(pack(ql), out_features=n), ql)


def test_round_trip_groups_of_the_doc_examples() -> None:
    assert QParams.make([8, 4], [0.05, 0.95], [32, 128]).groups(320) == [(8, 32), (4, 128), (4, 128), (4, 32)]
    assert QParams.make([6, 3, 2], [0.05, 0.2, 0.75], [32, 64, 64]).groups(224) == [(6, 32), (3, 64), (2, 64), (2, 64)]


def test_round_trip_bias_prescale_and_key() -> None:
    ql = make_linear([(4, 64), (3, 64)], 64, bias=True)
    ql.prescale = 0.25
    tensors = pack(ql, key=KEY)
    assert sorted(tensors) == sorted(
        f"{KEY}.{s}" for s in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias")
    )
    assert_same(unpack(tensors, key=KEY, out_features=64, prescale=0.25), ql)
    bare = {name.removeprefix(KEY + "."): t for name, t in tensors.items()}
    assert_same(unpack(bare, key=KEY, prescale=0.25), ql)  # N from the width: no padding here


def test_unpack_without_out_features_keeps_padding() -> None:
    ql = make_linear([(4, 32)], 20)
    back = unpack(pack(ql))
    assert back.out_features == 32
    assert torch.equal(back.codes[:, :20], ql.codes)
    assert bool((back.codes[:, 20:] == 8).all()) and bool((back.scale_codes[:, 20:] == 16).all())
    assert bool((dequantize(back)[20:] == 0).all())  # padding dequantizes to zeros


# --- packed layout -------------------------------------------------------------------------------------------------


def test_packed_tensors_dtypes_shapes_and_groups() -> None:
    ql = make_linear(QParams.make([6, 3, 2], [0.05, 0.2, 0.75], [32, 64, 64]).groups(224), 72)
    t = pack(ql)
    assert t["q_weight"].dtype == torch.int32 and tuple(t["q_weight"].shape) == (6 + 6 + 4 + 4, 96)
    assert t["q_scale"].dtype == torch.int32 and tuple(t["q_scale"].shape) == (4, 12)
    assert t["q_scale_max"].dtype == torch.float16 and tuple(t["q_scale_max"].shape) == (4,)
    assert t["q_groups"].dtype == torch.int16 and t["q_groups"].tolist() == [6, 0, 3, 6, 2, 12, 2, 16]
    assert t["q_invperm"].dtype == torch.int32 and torch.equal(t["q_invperm"].long(), torch.argsort(ql.perm))
    assert "bias" not in t and "q_perm" not in t
    assert [padded_width(n) for n in (1, 32, 33, 72, 14336)] == [32, 32, 64, 96, 14336]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_bitstream_matches_python_reference(bits: int) -> None:
    ql = make_linear([(bits, 64), (bits, 32)], 5, seed=10 + bits, identity=True)
    words = pack(ql)["q_weight"]
    for n in range(5):
        column = ql.codes[:, n].tolist()
        first = 64 * bits // 32  # the second group starts a fresh word
        assert unsigned(words[:first, n]) == reference_words(column[:64], bits)
        assert unsigned(words[first:, n]) == reference_words(column[64:], bits)


def test_3bit_rows_10_and_21_straddle_words() -> None:
    """Row 10 is bits 30..32 (w0[30:31] + w1[0]); row 21 is bits 63..65 (w1[31] + w2[0:1]); row 31 is w2[29:31]."""
    codes = torch.zeros(32, 1, dtype=torch.int16)
    codes[10], codes[21], codes[31] = 0b101, 0b111, 0b110
    ql = make_linear([(3, 32)], 1, identity=True)
    ql.codes = codes
    assert unsigned(pack(ql)["q_weight"][:, 0]) == [0x40000000, 0x80000001, 0xC0000003]


def test_6bit_rows_5_and_10_straddle_words() -> None:
    """Row 5 is bits 30..35 (w0[30:31] + w1[0:3]); row 10 is bits 60..65 (w1[28:31] + w2[0:1])."""
    codes = torch.zeros(32, 1, dtype=torch.int16)  # two 16-row blocks of 3 words; K must be a multiple of 32
    codes[5], codes[10], codes[15] = 0b111111, 0b100001, 0b101010
    codes[16 + 5] = 0b000011
    ql = make_linear([(6, 32)], 1, identity=True)
    ql.codes = codes
    assert unsigned(pack(ql)["q_weight"][:, 0]) == [0xC0000000, 0x1000000F, 0xA8000002, 0xC0000000, 0, 0]


def test_5bit_straddles_at_rows_6_12_19_25() -> None:
    straddling = [i for i in range(32) if (5 * i) % 32 + 5 > 32]
    assert straddling == [6, 12, 19, 25]
    codes = torch.zeros(32, 1, dtype=torch.int16)
    codes[6] = 0b11111  # bits 30..34
    ql = make_linear([(5, 32)], 1, identity=True)
    ql.codes = codes
    assert unsigned(pack(ql)["q_weight"][:, 0]) == [0xC0000000, 0x7, 0, 0, 0]


@pytest.mark.parametrize(("bits", "word"), [(2, 0xAAAAAAAA), (4, 0x88888888), (8, 0x80808080), (3, None), (6, None)])
def test_padding_columns_hold_the_zero_code(bits: int, word: int | None) -> None:
    ql = make_linear([(bits, 32)], 3)
    q = pack(ql)["q_weight"]
    assert q.shape[1] == 32
    expected = reference_words([1 << (bits - 1)] * 32, bits)
    if word is not None:
        assert set(expected) == {word}
    for n in range(3, 32):
        assert unsigned(q[:, n]) == expected


def test_scale_nibbles_and_the_padding_0xF_quirk() -> None:
    """Codes 1, 16, 5 store as nibbles 0, F, 4; the zero-padded columns underflow to 0xF in every later nibble."""
    ql = make_linear([(4, 32)], 3)
    ql.scale_codes = torch.tensor([[1, 16, 5]], dtype=torch.int16)
    q_scale = pack(ql)["q_scale"]
    assert tuple(q_scale.shape) == (1, 4)
    assert unsigned(q_scale[0]) == [0xFFFFF4F0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF]


def test_scale_nibbles_without_padding() -> None:
    ql = make_linear([(4, 32)], 32)
    ql.scale_codes = (torch.arange(32, dtype=torch.int16) % 16 + 1).unsqueeze(0)
    assert unsigned(pack(ql)["q_scale"][0]) == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]


# --- dequantization ------------------------------------------------------------------------------------------------


def half_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float16).view(torch.int16)) & 0xFFFF


def test_scale_values_hand_computed_subnormal_tie() -> None:
    """q_scale_max = fp16(0.01) = 1311·2^-17. M' = 1311·2^-25 = 655.5·2^-24 is subnormal and a tie: RNE gives
    656·2^-24 = 41·2^-20. S(c=16) = 256·41·2^-20 exactly; S(c=13) = 169·41 = 6929·2^-20 needs 13 bits, rounds to
    6928·2^-20; S(c=1) = M' (subnormal)."""
    scale_max = torch.tensor([0.01], dtype=torch.float16)
    assert scale_max.item() == 1311 * 2.0**-17
    s = scale_values(torch.tensor([[16, 13, 1]], dtype=torch.int16), scale_max)
    assert s.dtype == torch.float16
    assert s[0].tolist() == [256 * 41 * 2.0**-20, 6928 * 2.0**-20, 656 * 2.0**-24]
    assert half_bits(s[0, 2].item()) == 656  # a subnormal's bits are its multiple of 2^-24


def test_dequantize_hand_computed_values() -> None:
    """8-bit, z = 128: code 255 -> 127·S, S = 6928·2^-20 (above): 879856·2^-20 needs 16 bits, RNE to 879616·2^-20;
    code 0 -> -128·S exact; code 128 -> 0. With a subnormal M' = 2^-22 (q_scale_max 2^-14) and c = 1: code 131 ->
    3·2^-22, still subnormal and exact."""
    codes = torch.full((32, 2), 128, dtype=torch.int16)
    codes[0, 0], codes[1, 0], codes[0, 1] = 255, 0, 131
    ql = QuantizedLinear(
        perm=torch.arange(32),
        group_bits=[8],
        group_rows=[32],
        codes=codes,
        scale_codes=torch.tensor([[13, 1]], dtype=torch.int16),
        scale_max=torch.tensor([0.01], dtype=torch.float16),
    )
    w = dequantize(ql)
    assert w.dtype == torch.float16 and tuple(w.shape) == (2, 32)
    assert w[0, 0].item() == 879616 * 2.0**-20
    assert w[0, 1].item() == -128 * 6928 * 2.0**-20
    assert w[0, 2].item() == 0.0
    ql.scale_max = torch.tensor([2.0**-14], dtype=torch.float16)
    w = dequantize(ql)
    assert w[1, 0].item() == 3 * 2.0**-22 and half_bits(w[1, 0].item()) == 12


def numpy_reference(ql: QuantizedLinear) -> np.ndarray:
    """W [N, K] computed element-wise with numpy's fp32/fp16 at the kernel's rounding steps."""
    k, n = ql.in_features, ql.out_features
    group = np.repeat(np.arange(ql.num_groups), ql.group_rows)
    zero = np.repeat(np.array([1 << (b - 1) for b in ql.group_bits]), ql.group_rows)
    m = (ql.scale_max.numpy().astype(np.float32) * np.float32(ql.prescale / 256)).astype(np.float16)
    c = ql.scale_codes.numpy().astype(np.float32)
    s = ((c * c).astype(np.float16).astype(np.float32) * m.astype(np.float32)[:, None]).astype(np.float16)
    signed = (ql.codes.numpy().astype(np.int32) - zero[:, None]).astype(np.float16)
    stored = (signed.astype(np.float32) * s[group].astype(np.float32)).astype(np.float16)
    out = np.zeros((k, n), dtype=np.float16)
    out[ql.perm.numpy()] = stored  # dense row perm[j] <- stored row j
    return out.T


@pytest.mark.parametrize("prescale", [1.0, 0.3])
def test_dequantize_matches_numpy_oracle(prescale: float) -> None:
    ql = make_linear(QParams.make([8, 6, 5], [0.05, 0.1, 0.85], 32).groups(256), 48, seed=3)
    ql.scale_max = torch.tensor([3e-3, 5e-5, 0.2, 1e-4, 7e-6, 2.5e-2, 1.0, 6e-2], dtype=torch.float16)
    ql.prescale = prescale
    w = dequantize(ql)
    assert np.array_equal(w.view(torch.int16).numpy(), numpy_reference(ql).view(np.int16))


def test_dequantize_orientation_follows_perm() -> None:
    ql = make_linear([(4, 32), (2, 32)], 8, seed=5)
    w = dequantize(ql)
    scales = scale_values(ql.scale_codes, ql.scale_max)
    j = 40  # a stored row of group 1
    expected = dequantize_codes(ql.codes[j], 2, scales[1])
    assert torch.equal(w[:, int(ql.perm[j])], expected)


def test_dequantize_tensors_drops_padding() -> None:
    ql = make_linear(QParams.make([8, 4], [0.05, 0.95], [32, 128]).groups(320), 100, seed=9)
    w = dequantize_tensors(pack(ql, key=KEY), 100, key=KEY)
    assert tuple(w.shape) == (100, 320) and torch.equal(w.view(torch.int16), dequantize(ql).view(torch.int16))


def test_scale_values_broadcasting() -> None:
    codes = torch.randint(1, 17, (3, 8), dtype=torch.int16)
    maxes = torch.tensor([0.5, 1e-3, 2e-2], dtype=torch.float16)
    full = scale_values(codes, maxes)
    assert torch.equal(scale_values(codes, maxes.unsqueeze(1)), full)
    assert torch.equal(scale_values(codes[1], maxes[1]), full[1])


# --- writer limits -------------------------------------------------------------------------------------------------


def test_check_writable_limits() -> None:
    check_writable(5120, 131072, qparams=QParams.make([8, 6], [0.15, 0.85], 128))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"{KEY}: in_features 100 is not a positive")):
        check_writable(100, 64, key=KEY)
    with pytest.raises(UnsupportedArchitectureError, match="in_features 65536 exceeds EXL2's limit of 65535"):
        check_writable(65536, 64)
    with pytest.raises(UnsupportedArchitectureError, match="a bias needs out_features a multiple of 32"):
        check_writable(64, 100, has_bias=True)
    with pytest.raises(UnsupportedArchitectureError, match="group 0 has 48 rows at 4 bits; all but the last"):
        check_writable(96, 64, qparams=QParams.make([4], [1], 48))


def test_every_candidate_config_is_writable_at_pixtral_shapes() -> None:
    from quantize import candidates as cand

    for hidden, q_dim, kv_dim, ffn in ((5120, 4096, 1024, 14336), (12288, 12288, 1024, 28672)):
        for mode, shapes in (
            ("self_attn", cand.attn_shapes(hidden, q_dim, kv_dim)),
            ("mlp", cand.mlp_shapes(hidden, ffn)),
        ):
            slots = cand.ATTN_SLOTS if mode == "self_attn" else cand.MLP_SLOTS
            for slot, (k, n) in zip(slots, shapes, strict=True):
                for qp in cand.distinct_configs(mode, slot):
                    check_writable(k, n, qparams=qp)
        for qp in cand.HEAD_OPTIONS.values():
            check_writable(hidden, 131072, qparams=qp)


def test_pack_rejects_inconsistent_linear() -> None:
    ql = make_linear([(4, 64)], 32)
    ql.codes[3, 4] = 16
    with pytest.raises(ValueError, match=re.escape("codes of rows 0..63 exceed 4 bits")):
        pack(ql)
    ql = make_linear([(3, 32), (4, 32)], 32)
    with pytest.raises(ValueError, match="group 1 has 4 bits after 3; widths must not increase"):
        pack(ql)
    with pytest.raises(UnsupportedArchitectureError, match="in_features 48"):
        pack(make_linear([(2, 48)], 32))


# --- malformed tensor sets -----------------------------------------------------------------------------------------


@pytest.fixture
def good() -> dict[str, torch.Tensor]:
    """K=128, N=40 (Np=64): groups 4-bit 64 rows, 3-bit 32, 2-bit 32 -> q_groups [4, 0, 3, 8, 2, 11], Q=13."""
    t = pack(make_linear([(4, 64), (3, 32), (2, 32)], 40, seed=1))
    assert t["q_groups"].tolist() == [4, 0, 3, 8, 2, 11] and t["q_weight"].shape[0] == 13
    return t


def expect(tensors: dict[str, torch.Tensor], message: str, **kwargs: int) -> None:
    with pytest.raises(ModelFormatError, match="^" + re.escape(f"{KEY}.{message}") + "$"):
        unpack({f"{KEY}.{s}": t for s, t in tensors.items()}, key=KEY, **kwargs)


def test_good_set_unpacks(good: dict[str, torch.Tensor]) -> None:
    assert unpack(good, out_features=40).group_rows == [64, 32, 32]


def test_rejects_int64_invperm(good: dict[str, torch.Tensor]) -> None:
    expect({**good, "q_invperm": good["q_invperm"].long()}, "q_invperm: dtype int64; EXL2 stores it as int32")


def test_rejects_q_weight_rows_not_matching_q_groups(good: dict[str, torch.Tensor]) -> None:
    expect({**good, "q_weight": good["q_weight"][:12]}, "q_weight: 12 rows make K=112 via q_groups; q_invperm has 128")
    groups = torch.tensor([4, 0, 3, 8], dtype=torch.int16)  # now the 3-bit group is last and gets 5 q_weight rows
    expect(
        {**good, "q_groups": groups, "q_scale": good["q_scale"][:2], "q_scale_max": good["q_scale_max"][:2]},
        "q_weight: 13 rows leave the last group (3-bit, from row 8) 5 q_weight rows, not a whole positive number "
        "of 3-bit rows",
    )


def test_rejects_increasing_bits(good: dict[str, torch.Tensor]) -> None:
    groups = torch.tensor([4, 0, 2, 8, 3, 11], dtype=torch.int16)
    expect({**good, "q_groups": groups}, "q_groups: group 2 has 3 bits after 2; widths must not increase along K")


def test_rejects_7bit_group(good: dict[str, torch.Tensor]) -> None:
    groups = torch.tensor([4, 0, 7, 8, 2, 11], dtype=torch.int16)
    expect({**good, "q_groups": groups}, "q_groups: group 1 has 7 bits; allowed 2, 3, 4, 5, 6, 8")


def test_rejects_q_scale_width(good: dict[str, torch.Tensor]) -> None:
    expect({**good, "q_scale": good["q_scale"][:, :4]}, "q_scale: width 4; expected Np/8 = 8 for q_weight width 64")


def test_rejects_non_permutation(good: dict[str, torch.Tensor]) -> None:
    invperm = good["q_invperm"].clone()
    invperm[invperm == 5] = 6
    expect({**good, "q_invperm": invperm}, "q_invperm: not a permutation; 6 appears 2 times")
    invperm[0] = 128
    expect({**good, "q_invperm": invperm}, "q_invperm: value 128 outside 0..127")


def test_rejects_group_count_mismatch(good: dict[str, torch.Tensor]) -> None:
    expect({**good, "q_scale_max": good["q_scale_max"][:2]}, "q_scale_max: 2 entries, but q_groups describes 3 groups")
    expect({**good, "q_scale": good["q_scale"][:2]}, "q_scale: 2 rows, but q_groups describes 3 groups")


def test_rejects_group_sizes_the_kernels_cannot_step(good: dict[str, torch.Tensor]) -> None:
    groups = torch.tensor([4, 0, 4, 6, 3, 8, 2, 11], dtype=torch.int16)  # 48 + 16 rows at 4 bits
    scale = torch.cat([good["q_scale"][:1], good["q_scale"]])
    scale_max = torch.cat([good["q_scale_max"][:1], good["q_scale_max"]])
    expect(
        {**good, "q_groups": groups, "q_scale": scale, "q_scale_max": scale_max},
        "q_groups: group 0 has 48 rows at 4 bits; all but the last group need a multiple of 32",
    )


def test_rejects_k_not_multiple_of_32(good: dict[str, torch.Tensor]) -> None:
    invperm = torch.randperm(112).to(torch.int32)  # the last 2-bit group cut to 16 rows: K=112
    expect(
        {**good, "q_weight": good["q_weight"][:12], "q_invperm": invperm},
        "q_invperm: K=112 rows is not a multiple of 32",
    )


def test_rejects_other_malformations(good: dict[str, torch.Tensor]) -> None:
    expect({s: t for s, t in good.items() if s != "q_groups"}, "q_groups: missing")
    expect(
        {**good, "q_groups": good["q_groups"][:5]},
        "q_groups: 5 entries; expected (bits, q_weight row) pairs, at least one",
    )
    expect(
        {**good, "q_groups": torch.tensor([4, 1, 3, 8, 2, 11], dtype=torch.int16)},
        "q_groups: group 0 starts at q_weight row 1, not 0",
    )
    expect(
        {**good, "q_groups": torch.tensor([4, 0, 3, 8, 2, 8], dtype=torch.int16)},
        "q_groups: group 2 starts at q_weight row 8, not after group 1 (8)",
    )
    expect({**good, "q_weight": good["q_weight"][:, :40]}, "q_weight: width 40 is not a positive multiple of 32")
    expect({**good, "q_groups": good["q_groups"].view(2, 3)}, "q_groups: 2-D shape [2, 3]; expected 1-D")
    expect(good, "q_weight: width 64, but out_features 20 pads to 32", out_features=20)
    expect(
        {**good, "bias": torch.zeros(40, dtype=torch.float16)}, "bias: 40 entries; exllamav2 needs q_weight's width 64"
    )
    expect(
        {**good, "q_scale_max": good["q_scale_max"].float()}, "q_scale_max: dtype float32; EXL2 stores it as float16"
    )
    inf = good["q_scale_max"].clone()
    inf[1] = float("inf")
    expect({**good, "q_scale_max": inf}, "q_scale_max: not finite")


# --- speed ---------------------------------------------------------------------------------------------------------


def test_pack_unpack_4096_square_is_fast() -> None:
    """A guard against per-element Python loops: well under a second on a laptop core; the bound is generous."""
    ql = make_linear(QParams.make([4, 3], [0.1, 0.9], 128).groups(4096), 4096, seed=2)
    start = time.perf_counter()
    back = unpack(pack(ql), out_features=4096)
    assert time.perf_counter() - start < 5.0
    assert torch.equal(back.codes, ql.codes)
