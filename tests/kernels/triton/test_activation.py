"""The fused activation-quantization kernel against the reference ops: bit-exact on fresh random rows
(including a row length that is not a power of two and an all-zero row)."""
import pytest
import torch

from qcompile import ops
from qcompile.kernels.triton.linear import quantize_activation

from triton_cases import DEVICE


def _x():
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16) * torch.tensor([[1.0], [30.0], [1e-3], [0.0]],
                                                                            device=DEVICE, dtype=torch.bfloat16)
    x[3] = 0  # an all-zero row takes the eps / smallest-scale branch
    return x


@pytest.mark.parametrize("activation, reference", [
    ("int8_sym", lambda x: ops.quantize_int8_per_token(x)),
    ("int8_asym", lambda x: ops.quantize_int8_per_token_asym(x)),
    ("fp8_row", lambda x: ops.quantize_float8(x, "row")),
    ("fp8_tensor", lambda x: ops.quantize_float8(x, "tensor")),
])
def test_quantized_activation_is_bit_exact(activation, reference):
    x = _x()
    got = [t for t in quantize_activation(x, activation) if t is not None]
    want = reference(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.float(), w.float().reshape(g.shape)), activation


@pytest.mark.parametrize("activation, round_trip", [
    ("mxfp8", lambda x: ops.dequantize_mxfp8(*ops.quantize_mxfp8(x), x.dtype)),
    ("nvfp4", lambda x: ops.dequantize_nvfp4(*ops.quantize_nvfp4(x), x.dtype)),
])
def test_block_scaled_round_trip_is_bit_exact(activation, round_trip):
    x = _x()
    q, scale, zero = quantize_activation(x, activation)
    assert scale is None and zero is None and q.dtype == x.dtype
    assert torch.equal(q, round_trip(x))


@pytest.mark.parametrize("activation", ["int8_sym", "int8_asym", "fp8_row", "fp8_tensor"])
def test_dequantized_activation_is_the_quantized_one_back_on_its_grid(activation):
    """dequantize=True (what dequantize-then-cuBLAS multiplies) writes (q - zero) * scale in x's dtype in one
    pass: bit-exact against the quantized output taken back through float32."""
    x = _x()
    q, scale, zero = quantize_activation(x, activation)
    values = q.float() - (zero.float() if zero is not None else 0.0)
    want = (values * scale.float()).to(x.dtype)
    got, no_scale, no_zero = quantize_activation(x, activation, dequantize=True)
    assert no_scale is None and no_zero is None and got.dtype == x.dtype
    assert torch.equal(got, want), activation


@pytest.mark.parametrize("activation, scale_of", [
    ("int8_sym", lambda x: ops.quantize_int8_per_token(x)[1]),
    ("int8_asym", lambda x: ops.quantize_int8_per_token_asym(x)[1]),
    ("fp8_row", lambda x: ops.quantize_float8(x, "row")[1]),
    ("mxfp8", None),
])
def test_nan_and_inf_rows_keep_a_non_finite_scale(activation, scale_of):
    """Found by tests/test_randomized.py: tl.max skips NaNs (nanmax here, maxnum on the GPU), so a row holding a
    NaN got a finite scale and finite, wrong outputs; as the reference, its scale is NaN (inf for an inf row)."""
    x = _x()
    x[0, 5], x[1, 7] = float("nan"), -float("inf")
    q, scale, _ = quantize_activation(x, activation)
    if scale_of is None:  # mxfp8 writes the round trip: the block holding the NaN / inf is NaN
        assert q[:2].isnan().any(-1).all() and q[2:].isfinite().all()
        return
    expected = scale_of(x).reshape(scale.shape)
    assert scale[0].isnan() and torch.equal(scale[1:], expected[1:])
