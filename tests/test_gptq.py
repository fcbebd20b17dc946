"""GPTQ (quantize.gptq): error feedback beats round-to-nearest, bits order the error, the fake-quant weight is the
doc's dequantization of the returned codes and scales bit for bit, act-order, damping, the clipping search, errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from quantize.gptq import (
    HessianAccumulator,
    PreparedHessian,
    QuantizationError,
    clip_grid,
    find_params,
    gptq_quantize,
    prepare,
    rtn_quantize,
    scale_values,
)
from quantize.qlinear import QuantizedLinear
from quantize.qparams import QParams

K, N, SEQS, SEQ_LEN = 256, 96, 16, 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are too small to gain from a second thread, and on a shared 2-core machine an OpenMP team
    whose other thread is descheduled turns each ~10 µs op into milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, PreparedHessian]:
    """Correlated inputs X = (Z A) * channel gains [2048, K], a weight [N, K] and its prepared Hessian."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(K, K, generator=gen) / K**0.5
    gains = torch.rand(K, generator=gen) * 2 + 0.1
    x = (torch.randn(SEQS * SEQ_LEN, K, generator=gen) @ mix) * gains
    weight = torch.randn(N, K, generator=gen) * 0.02
    acc = HessianAccumulator(K)
    acc.add(x.view(SEQS, SEQ_LEN, K))
    return x, weight, prepare(acc.hessian())


def output_error(x: torch.Tensor, weight: torch.Tensor, fake: torch.Tensor) -> float:
    """Relative Frobenius error of the layer output, ||X W^T - X Q^T|| / ||X W^T||."""
    ref = x @ weight.T
    return float((x @ fake.float().T - ref).norm() / ref.norm())


def doc_dequantize(ql: QuantizedLinear) -> torch.Tensor:
    """exl2-format.md §1.7 on the unpacked tensors (until quantize.format.dequantize replaces it): M' =
    fp16(q_scale_max * prescale/256), S = fp16(fp16(c^2) * M'), W[perm[j]] = fp16(fp16(code - 2^(b-1)) * S)."""
    m_prime = (ql.scale_max.float() * (ql.prescale / 256)).half()
    blocks, start = [], 0
    for g, (bits, rows) in enumerate(zip(ql.group_bits, ql.group_rows, strict=True)):
        c = ql.scale_codes[g].int()
        s = (c * c).half() * m_prime[g]
        blocks.append((ql.codes[start : start + rows].int() - 2 ** (bits - 1)).half() * s)
        start += rows
    return torch.cat(blocks)[torch.argsort(ql.perm)].T


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def one_width(bits: int, group: int = 32) -> QParams:
    return QParams.make([bits], [1.0], group)


# --- accuracy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_with_same_scales(layer, bits):
    x, weight, prepared = layer
    qp = one_width(bits)
    ql, fake = gptq_quantize(weight, prepared, qp)
    _, rtn_fake = rtn_quantize(weight, qp, perm=prepared.perm)
    gptq_err, rtn_err = output_error(x, weight, fake), output_error(x, weight, rtn_fake)
    # RTN with GPTQ's own per-group scales (the only difference left is the error feedback).
    wt = weight.half().float().T[ql.perm]
    rows = torch.cat([torch.full((r,), g) for g, r in enumerate(ql.group_rows)])
    s = scale_values(ql.scale_codes, ql.scale_max[:, None]).float()[rows]
    z = 2 ** (bits - 1)
    codes = torch.clamp(torch.round(wt / s) + z, 0, 2 * z - 1)
    same_scale = ((codes - z).half() * s.half())[torch.argsort(ql.perm)].T
    same_scale_err = output_error(x, weight, same_scale)
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)
    assert gptq_err < 0.8 * same_scale_err, (gptq_err, same_scale_err)


def test_error_falls_as_bits_rise(layer):
    x, weight, prepared = layer
    errors = [output_error(x, weight, gptq_quantize(weight, prepared, one_width(b))[1]) for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True), errors
    assert all(hi < 0.6 * lo for lo, hi in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.006, errors


def test_identity_hessian_makes_gptq_plain_rtn():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=gen)
    prepared = prepare(HessianAccumulator(128).hessian())
    assert torch.equal(prepared.perm, torch.arange(128))
    qp = QParams.make([6, 3], [0.25, 0.75], 32)
    ql, fake = gptq_quantize(weight, prepared, qp)
    rl, rfake = rtn_quantize(weight, qp)
    assert same_bits(fake, rfake)
    assert torch.equal(ql.codes, rl.codes) and torch.equal(ql.scale_codes, rl.scale_codes)


# --- format ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "props", "groups"),
    [([8, 4], [0.05, 0.95], [32, 128]), ([6, 3, 2], [0.25, 0.25, 0.5], [32, 64, 32]), ([5], [1.0], [64])],
)
def test_fake_quant_is_the_dequantization_bit_for_bit(layer, bits, props, groups):
    _, weight, prepared = layer
    qp = QParams.make(bits, props, groups)
    ql, fake = gptq_quantize(weight.to(torch.bfloat16), prepared, qp, bias=torch.ones(N))
    assert fake.dtype == torch.float16 and fake.shape == (N, K)
    assert same_bits(fake, doc_dequantize(ql))
    assert [(b, r) for b, r in zip(ql.group_bits, ql.group_rows, strict=True)] == qp.groups(K)
    assert ql.bias is not None and ql.bias.dtype == torch.float16
    rtn, rtn_fake = rtn_quantize(weight, qp, perm=prepared.perm)
    assert same_bits(rtn_fake, doc_dequantize(rtn))


def test_codes_and_scale_codes_in_range(layer):
    _, weight, prepared = layer
    ql, _ = gptq_quantize(weight * 3, prepared, QParams.make([8, 5, 2], [0.1, 0.2, 0.7], [32, 32, 16]))
    assert ql.codes.dtype == torch.int16 and ql.scale_codes.dtype == torch.int16
    assert ql.scale_max.dtype == torch.float16 and ql.scale_max.shape == (len(ql.group_bits),)
    start = 0
    for g, (bits, rows) in enumerate(zip(ql.group_bits, ql.group_rows, strict=True)):
        block = ql.codes[start : start + rows]
        assert int(block.min()) >= 0 and int(block.max()) <= 2**bits - 1
        assert int(block.max()) - int(block.min()) >= 2 ** (bits - 1)  # the range is used, not just its middle
        # The column with the group's largest base scale always gets code 16.
        assert int(ql.scale_codes[g].min()) >= 1 and int(ql.scale_codes[g].max()) == 16
        start += rows


def test_zero_group_quantizes_to_zero_without_nan():
    # A group whose weights are all 0 gets fp16(M) = 0, so S = 0 and w/S = 0/0: the kernel maps that to maxq.
    weight = torch.zeros(32, 64)
    weight[:, 32:] = torch.randn(32, 32)
    ql, fake = gptq_quantize(weight, prepare(torch.eye(64)), one_width(4))
    assert not bool(fake.isnan().any()) and torch.equal(fake[:, :32].float(), torch.zeros(32, 32))
    assert bool((ql.codes[:32] == 15).all()) and float(ql.scale_max[0]) == 0.0
    assert same_bits(fake, doc_dequantize(ql))


# --- Hessian -----------------------------------------------------------------------------------------------------


def test_hessian_divides_by_calibration_rows_not_tokens():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 16, generator=gen)
    acc = HessianAccumulator(16)
    acc.add(x[:2])
    acc.add(x[2])  # a 2-D input is one row
    assert acc.rows == 3
    flat = x.reshape(-1, 16).double()
    torch.testing.assert_close(acc.hessian().double(), flat.T @ flat / 3, rtol=1e-5, atol=1e-5)
    acc.add(x[0], rows=5)
    assert acc.rows == 8
    with pytest.raises(QuantizationError, match="17 features"):
        acc.add(torch.randn(4, 17))


def test_perm_is_act_order_with_stable_ties(layer):
    x, _, prepared = layer
    acc = HessianAccumulator(K)
    acc.add(x.view(SEQS, SEQ_LEN, K))
    diag = acc.hessian().diagonal()[prepared.perm]
    assert bool((diag[:-1] >= diag[1:]).all()) and float(diag[0]) > 4 * float(diag[-1])
    tied = prepare(torch.diag(torch.tensor([1.0, 3.0, 3.0, 2.0, 1.0, 3.0])))
    assert tied.perm.tolist() == [1, 2, 5, 3, 0, 4]


def test_inverse_cholesky_factor(layer):
    x, _, prepared = layer
    h = (x.T @ x / SEQS).double()[prepared.perm][:, prepared.perm]
    h += torch.eye(K, dtype=torch.float64) * prepared.damp * prepared.tries
    u = prepared.inv_chol.double()
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u @ h, torch.eye(K, dtype=torch.float64), rtol=0, atol=2e-3)


def test_damping_retries_cumulatively():
    # Eigenvalues 2.2 and -0.2 with mean diagonal 1: one damping of 0.12 is not enough, two are.
    h = torch.eye(4)
    h[0, 1] = h[1, 0] = 1.2
    prepared = prepare(h)
    assert prepared.tries == 2 and prepared.damp == pytest.approx(0.12)
    hd = h[prepared.perm][:, prepared.perm].double() + 0.24 * torch.eye(4, dtype=torch.float64)
    u = prepared.inv_chol.double()
    torch.testing.assert_close(u.T @ u @ hd, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    h[0, 1] = h[1, 0] = 5.0
    with pytest.raises(QuantizationError, match="not invertible after 10"):
        prepare(h)
    # No signal at all: the 1e-5 floor is the whole damping.
    silent = prepare(torch.zeros(8, 8))
    assert silent.tries == 1 and silent.damp == pytest.approx(1e-5)


def test_dead_input_column(layer):
    # A feature that never fires makes XᵀX singular; the first damping already fixes it, and it sorts last.
    x, weight, _ = layer
    x = x.clone()
    x[:, 7] = 0
    acc = HessianAccumulator(K)
    acc.add(x.view(SEQS, SEQ_LEN, K))
    prepared = prepare(acc.hessian())
    assert prepared.tries == 1 and int(prepared.perm[-1]) == 7
    _, fake = gptq_quantize(weight, prepared, one_width(3))
    _, rtn_fake = rtn_quantize(weight, one_width(3), perm=prepared.perm)
    assert output_error(x, weight, fake) < 0.8 * output_error(x, weight, rtn_fake)


# --- scale search ------------------------------------------------------------------------------------------------


def brute_force_p(x: torch.Tensor, trial: torch.Tensor, bits: int) -> tuple[int, torch.Tensor]:
    """Argmin over the 97-point grid of the L3.5 error, one p at a time in float64."""
    z = 2 ** (bits - 1)
    x64, errors = x.double(), []
    for i in range(97):
        s = trial.double() * (0.7 + 0.5 * i / 96)
        q = torch.clamp(torch.round(x64 / s), -z, z - 1) * s
        errors.append(float(((q - x64).abs() ** 3.5).sum()))
    err = torch.tensor(errors, dtype=torch.float64)
    return int(torch.argmin(err)), err


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_find_params_picks_the_grid_argmin(bits):
    gen = torch.Generator().manual_seed(10 + bits)
    for trial_no in range(6):
        x = torch.randn(8, 12, generator=gen) * torch.rand(12, generator=gen) * (trial_no + 1)
        found = find_params(x, bits)
        # The trial scales from the doc's formulas, independently of the module.
        base = (x.abs().amax(dim=0) + 1e-12) / ((2**bits - 1) / 2)
        top = base.max()
        codes = torch.clamp(torch.round(16 * torch.sqrt(base / top)), 1, 16)
        assert torch.equal(found.scale_codes, codes.to(torch.int16))
        best, err = brute_force_p(x, top * (codes / 16) ** 2, bits)
        assert found.p_index == best, (found.p_index, best, err[found.p_index] / err[best])
        assert found.p == pytest.approx(0.7 + 0.5 * best / 96, rel=1e-6)
        assert float(found.scale_max) == pytest.approx(float(top) * found.p, rel=1e-6)
        assert torch.equal(found.scale, scale_values(found.scale_codes, found.scale_max).float())


def test_clip_grid():
    grid = clip_grid()
    assert grid.dtype == torch.float32 and grid.numel() == 97
    assert float(grid[0]) == pytest.approx(0.7) and float(grid[-1]) == pytest.approx(1.2)
    torch.testing.assert_close(grid.double(), torch.linspace(0.7, 1.2, 97, dtype=torch.float64))


def test_scale_values_round_like_the_loader():
    # fp16(M) / 256 lands in the subnormal range for small M; the two-step fp16 rounding must be kept.
    codes = torch.arange(1, 17, dtype=torch.int16)
    for m in (3e-3, 1e-4, 0.37, 12.0):
        got = scale_values(codes, torch.tensor(m))
        m_prime = torch.tensor(m).half() * torch.tensor(1 / 256).half()
        assert same_bits(got, (codes.int() ** 2).half() * m_prime)
    assert float(scale_values(torch.tensor([16], dtype=torch.int16), torch.tensor(1e-3))[0]) != pytest.approx(1e-3)


# --- determinism and errors --------------------------------------------------------------------------------------


def test_deterministic(layer):
    _, weight, prepared = layer
    qp = QParams.make([4, 3], [0.5, 0.5], 64)
    a, fa = gptq_quantize(weight, prepared, qp)
    b, fb = gptq_quantize(weight.clone(), prepared, qp)
    assert same_bits(fa, fb) and torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale_codes, b.scale_codes) and same_bits(a.scale_max, b.scale_max)
    assert torch.equal(a.perm, b.perm) and a.perm.dtype == torch.int64


def test_weight_is_read_as_fp16(layer):
    _, weight, prepared = layer
    qp = QParams.make([4, 3], [0.5, 0.5], 64)
    fa = gptq_quantize(weight, prepared, qp)[1]
    fb = gptq_quantize(weight.half(), prepared, qp)[1]
    assert same_bits(fa, fb)


def test_input_weight_untouched(layer):
    _, weight, prepared = layer
    before = weight.clone()
    gptq_quantize(weight, prepared, one_width(4))
    assert torch.equal(weight, before)


def test_errors(layer):
    _, weight, prepared = layer
    with pytest.raises(QuantizationError, match="256 input features, the weight has 128"):
        gptq_quantize(weight[:, :128], prepared, one_width(4))
    bad = weight.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or inf"):
        gptq_quantize(bad, prepared, one_width(4))
    big = weight.to(torch.bfloat16)
    big[0, 0] = 1e5  # finite in bf16, inf in fp16
    with pytest.raises(QuantizationError, match="fp16 range"):
        rtn_quantize(big, one_width(4))
    h = torch.eye(8)
    h[2, 2] = float("inf")
    with pytest.raises(QuantizationError, match="NaN or inf"):
        prepare(h)
    with pytest.raises(QuantizationError, match="square"):
        prepare(torch.ones(3, 4))


def test_uncovered_partition_is_a_typed_error(layer):
    _, weight, prepared = layer

    class Short(QParams):
        def groups(self, rows: int) -> list[tuple[int, int]]:
            raise ValueError(f"covers 0 of {rows} rows")

    with pytest.raises(QuantizationError, match="does not partition K=256"):
        gptq_quantize(weight, prepared, Short((4,), (1.0,), {4: 32}))
