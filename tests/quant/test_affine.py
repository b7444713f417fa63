"""Integer affine quantization against an independent float64 reference (torchao's formulas)."""
import math

import pytest
import torch

from qcompile.quant import affine
from qcompile.quant.metrics import sqnr_db


def reference_symmetric(x, group, bits):
    """float64: scale = amax / ((qmax - qmin) / 2), q = clamp(round(x / scale))."""
    g = x.double().reshape(*x.shape[:-1], -1, group)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    amax = torch.maximum(-g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0))
    scale = (amax / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(g / scale.unsqueeze(-1)).clamp(qmin, qmax)
    return q.reshape(x.shape), scale, (q * scale.unsqueeze(-1)).reshape(x.shape)


def reference_asymmetric(x, group, bits, signed):
    g = x.double().reshape(*x.shape[:-1], -1, group)
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = (torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(qmin, qmax)
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(x.shape)


def mismatch_fraction(a, b):
    return (a.double() - b.double()).abs().gt(0).double().mean().item()


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (3, 64), (2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_symmetric_matches_float64_reference(bits, group, dtype):
    x = torch.randn(16, 256).to(dtype)
    scale = affine.choose_qparams_symmetric(x, group, bits)
    q = affine.quantize_symmetric(x, scale, group, bits)
    q_ref, scale_ref, _ = reference_symmetric(x, group, bits)
    assert torch.allclose(scale.double(), scale_ref, rtol=1e-6)
    # float32 (x * 1/scale, as torchao) vs float64 (x / scale) rounding differs only at .5 ties, by one step:
    # each group's extreme sits exactly on a tie (amax / scale = qmax + 0.5), the rest almost never do
    n_groups = x.numel() // group
    assert mismatch_fraction(q, q_ref) * x.numel() <= n_groups + 1e-3 * x.numel()
    assert (q.double() - q_ref).abs().max() <= 1
    dq = affine.dequantize_symmetric(q, scale, group, torch.float32)
    assert ((dq.double() - x.double()).abs() <= scale.double().repeat_interleave(group, -1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bits,expected_db", [(8, 40.0), (4, 17.0)])
def test_gaussian_sqnr_is_the_scheme_noise(bits, expected_db):
    # per-row int8 on Gaussian data ~ 40 dB; 4-bit group-32 symmetric ~ 17-18 dB (6 dB per bit)
    x = torch.randn(64, 512)
    group = 512 if bits == 8 else 32
    scale = affine.choose_qparams_symmetric(x, group, bits)
    dq = affine.dequantize_symmetric(affine.quantize_symmetric(x, scale, group, bits), scale, group, torch.float32)
    assert expected_db - 2 < sqnr_db(x, dq) < expected_db + 4


@pytest.mark.parametrize("bits,signed", [(8, True), (4, False), (4, True)])
def test_asymmetric_matches_float64_reference(bits, signed):
    x = torch.randn(8, 128) + 0.7
    scale, zero = affine.choose_qparams_asymmetric(x, 32, bits, signed)
    dq = affine.dequantize_asymmetric(affine.quantize_asymmetric(x, scale, zero, 32, bits, signed), scale, zero, 32,
                                      torch.float32)
    ref = reference_asymmetric(x, 32, bits, signed)
    assert sqnr_db(ref, dq) > 50  # identical up to float32 rounding at ties
    zero_in = torch.zeros(1, 32)
    s, z = affine.choose_qparams_asymmetric(zero_in, 32, bits, signed)
    assert torch.equal(affine.dequantize_asymmetric(affine.quantize_asymmetric(zero_in, s, z, 32, bits, signed),
                                                    s, z, 32, torch.float32), zero_in)  # 0.0 is exact


def test_tinygemm_float_zero_domain():
    x = torch.randn(8, 256)
    scale, zero = affine.choose_qparams_tinygemm(x, 128)
    q = affine.quantize_tinygemm(x, scale, zero, 128)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    g = x.double().reshape(8, 2, 128)
    lo, hi = g.amin(-1), g.amax(-1)
    assert torch.allclose(scale.double(), (hi - lo) / 15, rtol=1e-6)
    assert torch.allclose(zero.double(), lo + (hi - lo) / 15 * 8, rtol=1e-5, atol=1e-6)
    dq = affine.dequantize_tinygemm(q, scale, zero, 128, torch.float32)
    step = scale.repeat_interleave(128, -1)
    assert ((dq - x).abs() <= step / 2 + 1e-5).all()
    assert 17 < sqnr_db(x, dq) < 22  # int4 group-128 asymmetric on Gaussian data: ~19-20 dB


def test_all_zero_rows_give_zeros_not_nan():
    x = torch.randn(4, 64)
    x[1] = 0
    for dq in _all_round_trips(x, group=32):
        assert torch.isfinite(dq[1]).all() and (dq[1] == 0).all()


def test_one_huge_outlier_stays_in_its_group():
    x = torch.randn(4, 128)
    x[2, 5] = 1e4
    for dq in _all_round_trips(x, group=32):
        assert torch.isfinite(dq).all()
        assert abs(dq[2, 5].item() - 1e4) / 1e4 < 0.1
        others = torch.ones_like(x, dtype=torch.bool)
        others[2, :32] = False  # the outlier's group loses its small values; every other group is intact
        assert sqnr_db(x[others], dq[others]) > 15


def test_nan_and_inf_propagate_to_their_group_only():
    x = torch.randn(4, 128)
    x[0, 3] = float("nan")
    x[3, 70] = float("inf")
    for dq in _all_round_trips(x, group=32):
        assert not torch.isfinite(dq[0, :32]).all() and not torch.isfinite(dq[3, 64:96]).all()
        assert torch.isfinite(dq[1:3]).all() and torch.isfinite(dq[0, 32:]).all()


def _all_round_trips(x, group):
    s = affine.choose_qparams_symmetric(x, group, 4)
    yield affine.dequantize_symmetric(affine.quantize_symmetric(x, s, group, 4), s, group, torch.float32)
    s, z = affine.choose_qparams_asymmetric(x, group, 4, signed=False)
    yield affine.dequantize_asymmetric(affine.quantize_asymmetric(x, s, z, group, 4, False), s, z, group, torch.float32)
    s, z = affine.choose_qparams_tinygemm(x, group)
    yield affine.dequantize_tinygemm(affine.quantize_tinygemm(x, s, z, group), s, z, group, torch.float32)


def test_group_must_divide_k():
    with pytest.raises(ValueError, match="not divisible by group_size 32"):
        affine.choose_qparams_symmetric(torch.randn(2, 48), 32, 4)
    assert math.isinf(sqnr_db(torch.ones(3), torch.ones(3)))
