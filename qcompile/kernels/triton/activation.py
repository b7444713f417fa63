"""Dynamic activation quantization as one Triton kernel per call: one program per row, the whole row in
registers. Formats follow qcompile.quant exactly (round half to even, the same eps and clamps):

  int8_sym / int8_asym : int8 per row, float32 scale [M] (+ int32 zero [M])      (affine.py)
  fp8_row / fp8_tensor : e4m3, float32 scale [M] or [] (tensor amax given)       (float8.py)
  mxfp8 / nvfp4        : quantize then dequantize in place, output in x's dtype  (microscaling.py)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast_to, float_to_e2m1, round_half_even, round_to_e4m3

FP32_EPS = tl.constexpr(1.1920928955078125e-07)  # globals a kernel reads must be constexpr
FLOAT8_EPS = tl.constexpr(1e-12)
E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _ceil_log2(v):
    """ceil(log2(v)) for float32 v > 0, exact (from the bits); subnormals give -127."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    exponent = tl.where((bits & 0x7FFFFF) != 0, exponent + 1, exponent)
    return tl.where(((bits >> 23) & 0xFF) == 0, -127, exponent).to(tl.float32)


@triton.jit
def nan_in(x, axis: tl.constexpr):
    """NaN where x holds a NaN along axis, else 0: added to a tl.max / tl.min, which skip NaNs (maxnum on the GPU,
    nanmax in the interpreter) where torch's reductions return NaN. Without it a NaN activation quantized to
    finite values and its outputs were finite and wrong, instead of NaN as in float (found by the randomized
    suite); the scale clamps below keep the NaN with propagate_nan=ALL for the same reason."""
    return tl.sum(tl.where(x != x, x, 0.0), axis=axis)


@triton.jit
def amax_of(x, axis: tl.constexpr):
    """max |x| along axis, NaN if x holds a NaN (torch's amax)."""
    return tl.max(tl.abs(x), axis=axis) + nan_in(x, axis)


@triton.jit
def fp8_scale(amax, x_dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """The e4m3 scale of values whose largest magnitude is amax: amax / 448 rounded to the activation's dtype,
    as torch divides bf16 / fp16 tensors (quant/float8.py), at least FLOAT8_EPS; NaN stays NaN."""
    return tl.maximum(cast_to(amax / E4M3_MAX, x_dtype, BF16_BY_BITS).to(tl.float32), FLOAT8_EPS,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_e4m3(x, scale, HW_FP8: tl.constexpr):
    """x / scale on the e4m3 grid (saturated at ±448), as float32. HW_FP8: the GPU's conversion (sm_89+
    `cvt.rn.satfinite.e4m3x2.f32`, two values an instruction; round to nearest even like round_to_e4m3, which
    the interpreter runs: its fp8 casts are not that rounding)."""
    v = tl.minimum(tl.maximum(x / scale, -E4M3_MAX), E4M3_MAX)
    if HW_FP8:
        return v.to(tl.float8e4nv).to(tl.float32)
    return round_to_e4m3(v)


@triton.jit
def quantize_activation_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, tensor_amax_ptr, K, stride_xm, stride_qm,
                               FORMAT: tl.constexpr, BLOCK_K: tl.constexpr, DEQUANTIZE: tl.constexpr,
                               BF16_BY_BITS: tl.constexpr, HW_FP8: tl.constexpr):
    """DEQUANTIZE (int8 / fp8 formats): write (q - zero) * scale in q_ptr's dtype (x's) instead of q, scale and
    zero: the activation a float GEMM (dequantize-then-cuBLAS) multiplies, in one pass."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    in_row = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=in_row, other=0.0).to(tl.float32)
    q_ptrs = q_ptr + row * stride_qm + offs
    if FORMAT == "int8_sym" or FORMAT == "int8_asym" or FORMAT == "fp8_row" or FORMAT == "fp8_tensor":
        zero = 0.0
        if FORMAT == "int8_sym":
            scale = tl.maximum(amax_of(x, 0) / 127.5, FP32_EPS, propagate_nan=tl.PropagateNan.ALL)
            q = tl.minimum(tl.maximum(round_half_even(x * (1.0 / scale)), -128.0), 127.0)
        elif FORMAT == "int8_asym":
            nan = nan_in(x, 0)
            min_neg = tl.minimum(tl.min(x, axis=0) + nan, 0.0, propagate_nan=tl.PropagateNan.ALL)
            max_pos = tl.maximum(tl.max(x, axis=0) + nan, 0.0, propagate_nan=tl.PropagateNan.ALL)
            scale = tl.maximum((max_pos - min_neg) / 255.0, FP32_EPS, propagate_nan=tl.PropagateNan.ALL)
            zero = tl.minimum(tl.maximum(-128.0 - round_half_even(min_neg / scale), -128.0), 127.0)
            q = tl.minimum(tl.maximum(round_half_even(x * (1.0 / scale)) + zero, -128.0), 127.0)
        else:
            if FORMAT == "fp8_row":
                amax = amax_of(x, 0)
            else:
                amax = tl.load(tensor_amax_ptr).to(tl.float32)
            scale = fp8_scale(amax, x_ptr.dtype.element_ty, BF16_BY_BITS)
            q = quantize_e4m3(x, scale, HW_FP8)
        if DEQUANTIZE:
            tl.store(q_ptrs, cast_to((q - zero) * scale, q_ptr.dtype.element_ty, BF16_BY_BITS), mask=in_row)
        else:
            tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty), mask=in_row)
            if FORMAT == "fp8_tensor":
                tl.store(scale_ptr, scale, mask=row == 0)
            else:
                tl.store(scale_ptr + row, scale)
            if FORMAT == "int8_asym":
                tl.store(zero_ptr + row, zero.to(tl.int32))
    elif FORMAT == "mxfp8":  # blocks of 32, scale 2^ceil(log2(amax / 448)), e4m3 elements
        blocks = tl.reshape(x, (BLOCK_K // 32, 32))
        amax = amax_of(blocks, 1)
        # NaN / inf blocks: _ceil_log2 gives 128+, e8m0's NaN scale (the reference's)
        exponent = tl.where(amax == 0, -127.0, _ceil_log2(amax / E4M3_MAX))
        exponent = tl.minimum(tl.maximum(exponent, -127.0), 128.0)
        scale = tl.where(exponent > 127.0, float("nan"), tl.exp2(exponent))[:, None]
        q = round_to_e4m3(tl.minimum(tl.maximum(blocks / scale, -E4M3_MAX), E4M3_MAX))
        out = tl.reshape(q * scale, (BLOCK_K,))
        tl.store(q_ptrs, cast_to(out, q_ptr.dtype.element_ty, BF16_BY_BITS), mask=in_row)
    else:  # nvfp4: blocks of 16, e4m3 block scale, float32 tensor scale, e2m1 elements
        tensor_scale = tl.maximum(tl.load(tensor_amax_ptr).to(tl.float32) / (E4M3_MAX * 6.0), FLOAT8_EPS,
                                  propagate_nan=tl.PropagateNan.ALL)
        blocks = tl.reshape(x, (BLOCK_K // 16, 16))
        block_amax = tl.max(tl.abs(blocks), axis=1)
        block_scale = tl.minimum(tl.maximum(block_amax / 6.0 / tensor_scale, -E4M3_MAX), E4M3_MAX)
        total = (round_to_e4m3(block_scale) * tensor_scale)[:, None]
        safe = tl.where(total == 0, 1.0, total)
        out = tl.reshape(float_to_e2m1(blocks / safe) * total, (BLOCK_K,))
        tl.store(q_ptrs, cast_to(out, q_ptr.dtype.element_ty, BF16_BY_BITS), mask=in_row)
