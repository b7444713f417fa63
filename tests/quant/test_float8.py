"""float8 e4m3 with float32 scales against a float64 reference; the zero-row deviation from torchao."""
import pytest
import torch

from qcompile.quant import float8
from qcompile.quant.metrics import sqnr_db


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_relative_error(granularity, dtype):
    x = torch.randn(32, 128).to(dtype)
    scale = float8.choose_scale_float8(x, granularity)
    ref_amax = x.double().abs().amax(-1, keepdim=True) if granularity == "row" else x.double().abs().amax()
    # torchao's rule: amax / 448 in x's dtype, i.e. a value of that dtype within half its ulp of the exact ratio
    assert torch.equal(scale, scale.to(dtype).float())
    half_ulp = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert torch.allclose(scale.double(), ref_amax / 448, rtol=half_ulp * 1.001, atol=0)
    dq = float8.dequantize_float8(float8.quantize_float8(x, scale), scale, torch.float32)
    normal = x.double().abs() / scale.double() >= 2 ** -6  # e4m3 normal range: 3 mantissa bits
    rel = ((dq.double() - x.double()).abs() / x.double().abs())[normal]
    assert rel.max() <= 2 ** -4 + 1e-6
    assert sqnr_db(x, dq) > 28


def test_zero_row_gives_zeros_not_nan():
    x = torch.randn(3, 64)
    x[1] = 0
    scale = float8.choose_scale_float8(x, "row")
    dq = float8.dequantize_float8(float8.quantize_float8(x, scale), scale, torch.float32)
    assert (dq[1] == 0).all() and torch.isfinite(dq).all()


def test_saturates_instead_of_overflowing():
    scale = torch.tensor(1.0)
    q = float8.quantize_float8(torch.tensor([1e6, -1e6, 3.0]), scale)
    assert q.float().tolist() == [448.0, -448.0, 3.0]


def test_nan_propagates():
    x = torch.randn(2, 16)
    x[0, 4] = float("nan")
    scale = float8.choose_scale_float8(x, "row")
    dq = float8.dequantize_float8(float8.quantize_float8(x, scale), scale, torch.float32)
    assert dq[0].isnan().any() and torch.isfinite(dq[1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_dtype_is_the_cast_on_every_float32(dtype):
    """round_to_dtype (the scale's rounding in integer ops) equals `.to(dtype)` on random bit patterns (every
    binade, subnormals, inf, NaN) and on the edges of float16's range."""
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1 << 16,), dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.0, 65520.0, -65520.0, 2 ** -24,
                          2 ** -25, 3 * 2 ** -26, 1e-45, 3.3e38])
    v = torch.cat([bits.view(torch.float32), edges])
    expected, got = v.to(dtype).float(), float8.round_to_dtype(v, dtype)
    assert torch.equal(expected.isnan(), got.isnan())
    assert torch.equal(expected.nan_to_num(), got.nan_to_num())


def test_compiled_activation_scale_keeps_the_dtype_rounding():
    """Found by tests/test_randomized.py: Inductor computes `amax / 448` of a bf16 / fp16 input in float32 and
    dropped its rounding to the input's dtype, so the compiled float8 activation (CPU, and the CUDA
    activation_quantization='graph' path) sat on another e4m3 grid than the reference's — whole e4m3 steps apart."""
    xs = [(torch.randn(16, 224) * 3).to(dtype) for dtype in (torch.bfloat16, torch.float16)]

    def scales(*xs):
        return [float8.choose_scale_float8(x, granularity) for x in xs for granularity in ("row", "tensor")]

    for compiled, eager in zip(torch.compile(scales)(*xs), scales(*xs)):
        assert torch.equal(compiled, eager)
