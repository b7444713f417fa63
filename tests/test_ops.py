"""The qcompile:: reference ops against float64 formulas written out here, independently of qcompile.quant."""
import pytest
import torch

import qcompile.ops as ops
from qcompile.quant import packing

q = torch.ops.qcompile


def test_matmul_int8_is_exact_for_any_leading_shape():
    a = torch.randint(-128, 128, (2, 3, 96), dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 96), dtype=torch.int8)
    assert torch.equal(q.matmul_int8(a, b), (a.long() @ b.long().t()).int())


@pytest.mark.parametrize("bits,with_zero", [(2, False), (4, True), (4, False), (7, False), (8, True)])
def test_matmul_intx_group_sums(bits, with_zero):
    M, N, K, G = 3, 24, 128, 32
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    a_zero = torch.randint(-20, 20, (M, 1), dtype=torch.int32)
    u = torch.randint(0, 1 << bits, (N, K))
    scale = torch.rand(N, K // G) + 0.1
    zero = torch.randint(0, 1 << bits, (N, K // G), dtype=torch.uint8) if with_zero else None
    got = q.matmul_intx(a, a_zero, packing.pack_along_k(u, bits), scale, zero, bits, G)
    z = zero.double() if with_zero else torch.full((N, K // G), float(1 << (bits - 1)), dtype=torch.float64)
    w = (u.double().reshape(N, K // G, G) - z[..., None])  # integer weights per group
    x = (a.double() - a_zero.double()).reshape(M, K // G, G)
    expected = torch.einsum("mgk,ngk,ng->mn", x, w, scale.double())
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-3)


def test_scale_output_and_per_token_int8():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    xq, xs = q.quantize_int8_per_token(x)
    amax = x.double().abs().amax(-1, keepdim=True)
    assert torch.allclose(xs.double(), amax / 127.5, rtol=1e-6)
    assert ((xq.double() * xs - x.double()).abs() <= xs / 2 + 1e-6).all()
    acc = torch.randint(-1000, 1000, (4, 8), dtype=torch.int32)
    w_scale, bias = torch.rand(8), torch.randn(8)
    out = q.scale_output(acc, xs, w_scale, bias, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), acc.double() * xs * w_scale.double() + bias.double(), rtol=1e-2, atol=1e-2)


def test_asymmetric_per_token_represents_zero_and_range():
    x = torch.rand(3, 64) * 5 + 1  # all positive: asymmetric uses the full range
    xq, xs, xz = q.quantize_int8_per_token_asym(x)
    dq = (xq.double() - xz.double()) * xs.double()
    assert ((dq - x.double()).abs() <= xs.double() / 2 + 1e-5).all()
    assert torch.allclose(xs.double(), x.double().amax(-1, keepdim=True) / 255, rtol=1e-6)


def test_dequantize_int4_tinygemm_formula():
    u = torch.randint(0, 16, (8, 64))
    scale, zero = torch.rand(8, 2) + 0.1, torch.randn(8, 2)
    got = q.dequantize_int4_tinygemm(packing.pack_along_k(u, 4), scale, zero, 32, torch.float32)
    expected = (u.double().reshape(8, 2, 32) - 8) * scale.double()[..., None] + zero.double()[..., None]
    assert torch.allclose(got.double(), expected.reshape(8, 64), atol=1e-6)


def test_ops_are_visible_by_name():
    assert ops.NAMESPACE == "qcompile"
    for name in ("quantize_int8_per_token", "matmul_int8", "scale_output", "dequantize_intx", "quantize_nvfp4"):
        assert hasattr(torch.ops.qcompile, name)
