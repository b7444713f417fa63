"""mxfp8 and nvfp4 against brute-force float64 references."""
import torch

from qcompile.quant import microscaling as mx
from qcompile.quant.metrics import sqnr_db


def test_mxfp8_scales_are_powers_of_two_that_never_saturate():
    x = torch.randn(8, 128) * torch.logspace(-3, 3, 8)[:, None]
    q, e = mx.quantize_mxfp8(x)
    scale = mx.e8m0_to_float(e).double()
    amax = x.double().reshape(8, 4, 32).abs().amax(-1)
    assert torch.equal(scale, torch.exp2(torch.ceil(torch.log2(amax / 448))))  # RCEIL
    dq = mx.dequantize_mxfp8(q, e, torch.float32)
    assert sqnr_db(x, dq) > 28
    assert (q.float().abs() <= 448).all()


def test_mxfp8_zero_block_and_nan_block():
    x = torch.randn(2, 64)
    x[0, :32] = 0
    x[1, 40] = float("nan")
    q, e = mx.quantize_mxfp8(x)
    dq = mx.dequantize_mxfp8(q, e, torch.float32)
    assert (dq[0, :32] == 0).all() and torch.isfinite(dq[0, 32:]).all()
    assert dq[1, 32:].isnan().all() and torch.isfinite(dq[1, :32]).all()


def test_fp4_rounding_is_nearest_with_ties_to_even():
    grid = torch.tensor(mx.FP4_VALUES, dtype=torch.float64)
    v = torch.linspace(-7, 7, 2001)
    got = mx.fp4_code_to_float(mx.float_to_fp4_code(v)).double()
    # brute force: nearest grid magnitude, ties to the even index
    mag = v.double().abs().clamp(max=6)
    dist = (mag[:, None] - grid[None, :]).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = (dist == best)
    idx = torch.where(candidates[:, ::2].any(-1) & (candidates.sum(-1) > 1),
                      (candidates & (torch.arange(8) % 2 == 0)).int().argmax(-1), candidates.int().argmax(-1))
    expected = torch.where(v < 0, -grid[idx], grid[idx])
    assert torch.equal(got, expected)
    assert mx.fp4_code_to_float(mx.float_to_fp4_code(torch.tensor([0.25, 0.75, 2.5, 5.0]))).tolist() == [0.0, 1.0, 2.0, 4.0]


def test_nvfp4_round_trip():
    x = torch.randn(16, 256)
    packed, block_scale, tensor_scale = mx.quantize_nvfp4(x)
    assert packed.shape == (16, 128) and block_scale.shape == (16, 16) and block_scale.dtype == torch.float8_e4m3fn
    assert torch.allclose(tensor_scale.double(), x.double().abs().max() / (448 * 6))
    dq = mx.dequantize_nvfp4(packed, block_scale, tensor_scale, torch.float32)
    assert 17 < sqnr_db(x, dq) < 23  # 4-bit float with 16-element blocks: ~20 dB on Gaussian data
    zeros = torch.zeros(2, 32)
    assert (mx.dequantize_nvfp4(*mx.quantize_nvfp4(zeros), torch.float32) == 0).all()
