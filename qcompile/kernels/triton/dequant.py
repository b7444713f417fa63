"""Weight-load and decode steps of the Triton linear template: one small `@triton.jit` function per format.

Each `load_*_tile` returns the weight tile for K rows [k0, k0 + BLOCK_K) and the columns `offs_n`, laid out
[BLOCK_K, BLOCK_N] (ready for `tl.dot(x_tile, w_tile)`), decoded as qcompile.quant writes the format.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(v):
    """Round float32 to the nearest integer, ties to even (torch.round), for |v| < 2^22."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def cast_to(v, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """float32 -> dtype, rounding to nearest even. BF16_BY_BITS (set only under the interpreter, whose bf16
    cast truncates) rounds to bf16 with integer arithmetic instead of the cast instruction."""
    if BF16_BY_BITS and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def round_to_e4m3(v):
    """float32 already clamped to [-448, 448] -> the nearest e4m3 value (ties to even), still float32; the
    cast to float8e4nv is then exact on every backend (the interpreter's own cast rounds ties away)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp = tl.exp2((tl.maximum(exponent, -6) - 3).to(tl.float32))  # 3 mantissa bits; subnormals below 2^-6
    return round_half_even(v / ulp) * ulp


@triton.jit
def unpack_bit_planes(w_ptr, row_offsets, offs_k, K, BITS: tl.constexpr):
    """b-bit unsigned values at [k, n] from bit-plane packed rows (quant/packing.py): planes widest first,
    plane of width w holds 8/w values per byte, low bits first; the widest plane holds the high bits."""
    u = tl.zeros(offs_k.shape, dtype=tl.int32)[:, None] + tl.zeros(row_offsets.shape, dtype=tl.int32)[None, :]
    for p in tl.static_range(4):
        width: tl.constexpr = 8 >> p
        if (BITS & width) != 0:
            per_byte: tl.constexpr = 8 // width
            low: tl.constexpr = BITS & (width - 1)  # the narrower planes hold the low bits
            col: tl.constexpr = BITS - (BITS & (2 * width - 1))  # wider planes' bits = start column in K/8
            byte = tl.load(w_ptr + row_offsets[None, :] + (col * K) // 8 + (offs_k // per_byte)[:, None])
            shift = ((offs_k % per_byte) * width)[:, None]
            u = u | (((byte.to(tl.int32) >> shift) & ((1 << width) - 1)) << low)
    return u


@triton.jit
def load_group_param(ptr, offs_n, k0, offs_k, n_groups, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """A per-(row n, group of K) parameter as a float32 tile broadcastable to [BLOCK_K, BLOCK_N]: one load
    per column when the K block sits inside one group, else one per element."""
    if BLOCK_K <= GROUP_SIZE:
        return tl.load(ptr + offs_n * n_groups + k0 // GROUP_SIZE).to(tl.float32)[None, :]
    else:
        return tl.load(ptr + offs_n[None, :] * n_groups + ((k0 + offs_k) // GROUP_SIZE)[:, None]).to(tl.float32)


@triton.jit
def e2m1_to_float(code):
    """fp4 e2m1 code (sign bit 3) -> float32: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6."""
    mag_code = code & 7
    exponent = mag_code >> 1
    mantissa = (mag_code & 1).to(tl.float32)
    normal = tl.exp2((exponent - 1).to(tl.float32)) * (1.0 + 0.5 * mantissa)
    mag = tl.where(exponent == 0, 0.5 * mantissa, normal)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def float_to_e2m1(v):
    """Nearest fp4 e2m1 value of float32 v (|v| saturates at 6; ties to the even code; NaN -> 0)."""
    m = tl.minimum(tl.abs(v), 6.0)
    idx = ((m > 0.25).to(tl.int32) + (m > 0.75).to(tl.int32) + (m > 1.25).to(tl.int32) + (m > 1.75).to(tl.int32)
           + (m > 2.5).to(tl.int32) + (m > 3.5).to(tl.int32) + (m > 5.0).to(tl.int32))
    idx += (m == 0.75).to(tl.int32) + (m == 1.75).to(tl.int32) + (m == 3.5).to(tl.int32)  # odd ties round up
    mag = tl.where(idx < 4, 0.5 * idx.to(tl.float32),
                   tl.where(idx == 4, 2.0, tl.where(idx == 5, 3.0, tl.where(idx == 6, 4.0, 6.0))))
    return tl.where((v < 0) & (idx > 0), -mag, mag)


@triton.jit
def e8m0_to_float(e):
    """Biased power-of-two exponent (uint8) -> float32; 255 is NaN."""
    f = tl.exp2(e.to(tl.float32) - 127.0)
    return tl.where(e.to(tl.int32) == 255, float("nan"), f)


@triton.jit
def load_weight_tile(w_ptr, s_ptr, z_ptr, aux_ptr, offs_n, k0, offs_k, K, stride_wn,
                     W_FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     HAS_ZERO: tl.constexpr, RAW: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile. RAW=True (quantized activations): integer values (u - zero) as int8,
    or e4m3 as stored; group scales are then applied to the partial product by the caller. RAW=False:
    float32 with every scale that varies along K applied (row scales stay for the epilogue)."""
    ks = k0 + offs_k
    if W_FORMAT == "int8" or W_FORMAT == "fp8":
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None])
        if not RAW:
            w = w.to(tl.float32)
    elif W_FORMAT == "mxfp8":
        q = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None]).to(tl.float32)
        e = tl.load(s_ptr + offs_n[None, :] * (K // 32) + (ks // 32)[:, None])
        w = q * e8m0_to_float(e)
    else:  # sub-byte formats, bit-plane packed along K
        u = unpack_bit_planes(w_ptr, offs_n * stride_wn, ks, K, BITS)
        n_groups = K // GROUP_SIZE
        if W_FORMAT == "int4_tinygemm":  # (q - 8) * scale + zero, float zero domain
            scale = load_group_param(s_ptr, offs_n, k0, offs_k, n_groups, GROUP_SIZE, BLOCK_K)
            zero = load_group_param(z_ptr, offs_n, k0, offs_k, n_groups, GROUP_SIZE, BLOCK_K)
            w = (u.to(tl.float32) - 8.0) * scale + zero
        elif W_FORMAT == "intx":  # (u - zero) * scale; symmetric: zero = 2^(bits-1)
            if HAS_ZERO:
                zero = tl.load(z_ptr + offs_n[None, :] * n_groups + (ks // GROUP_SIZE)[:, None]).to(tl.int32)
                centred = u - zero
            else:
                centred = u - (1 << (BITS - 1))
            if RAW:
                w = centred.to(tl.int8)
            else:
                w = centred.to(tl.float32) * load_group_param(s_ptr, offs_n, k0, offs_k, n_groups, GROUP_SIZE,
                                                              BLOCK_K)
        elif W_FORMAT == "codebook":  # lookup; the row scale is applied in the epilogue
            w = tl.load(aux_ptr + u)
        else:  # nvfp4: e2m1 * e4m3 block scale (per 16) * float32 tensor scale
            block_scale = tl.load(s_ptr + offs_n[None, :] * (K // 16) + (ks // 16)[:, None]).to(tl.float32)
            w = e2m1_to_float(u) * (block_scale * tl.load(aux_ptr))
    return w
