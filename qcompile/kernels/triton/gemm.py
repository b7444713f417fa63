"""The one Triton template for quantized linears: out[M, N] = x[M, K] @ dequant(W[N, K])^T, scaled, + bias.

Constexprs pick the variant: the weight format (dequant.load_weight_tile), the activation format (float, or
int8 / e4m3 from activation.py, multiplied natively), GEMV (BLOCK_M == 1: multiply-accumulate on CUDA cores,
one reduction at the end) or tiled `tl.dot` (BLOCK_M >= 16, wgmma on Hopper), optionally swapped (SWAP_AB:
out^T = W x^T, so the weight tile, decoded in registers, is the dot's wide first operand and the few rows of a
decode batch its narrow second one; the accumulator is [BLOCK_N, BLOCK_M] until the epilogue; PLANES: sub-byte
weights decoded bit plane by bit plane into K-planes by packed bf16x2 instructions, dequant.decode_planes_ptx;
PAIR_DECODE: int4 words decoded byte pair by byte pair straight into wgmma's register operand, _pair_decode_dot),
and split-K (SPLIT_K > 1: each split stores its fp32 partial [M, N] in its slice of out [SPLIT_K, M, N]; the
caller sums them: no zero-filled buffer, no atomics, the same answer every run). A_FUSED (float8_dynamic per row
at M=1): the elementwise GEMV takes x in its own dtype and quantizes it to e4m3 itself, the row's scale from a
first pass over K — one launch instead of the activation kernel's and the GEMV's. The epilogue applies the
activation's row/tensor scale, the weight's row/tensor scale and the bias in float32 and casts once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activation import amax_of, fp8_scale, quantize_e4m3
from .dequant import (INT4_MAGIC_BF16, INT4_MAGIC_F16, MXFP8_BLOCK, NVFP4_BLOCK, affine_shift, cast_to,
                      decode_int4_words, decode_int4_words_raw, decode_plane, decode_planes_ptx, load_plane_words,
                      load_weight_tile, mantissa_fma, prefetch_group_params, to_float)


@triton.jit
def _ordered_dot(a, w, SWAP_AB: tl.constexpr, INT_DOT: tl.constexpr):
    """a [BLOCK_M, BLOCK_K] x w [BLOCK_N, BLOCK_K]^T -> [BLOCK_M, BLOCK_N], or its transpose w a^T (SWAP_AB)."""
    if SWAP_AB:
        if INT_DOT:
            return tl.dot(w, tl.trans(a), out_dtype=tl.int32)
        else:
            return tl.dot(w, tl.trans(a))
    else:
        if INT_DOT:
            return tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        else:
            return tl.dot(a, tl.trans(w))


@triton.jit
def _tile_dot(a, w, A_FORMAT: tl.constexpr, INT_DOT: tl.constexpr, DOT_FP32: tl.constexpr, SWAP_AB: tl.constexpr):
    """The tile product on tensor cores in the accumulator's orientation (int32 for INT_DOT)."""
    if INT_DOT:
        return _ordered_dot(a, w, SWAP_AB, True)
    elif DOT_FP32:  # the interpreter multiplies bf16 bit patterns in tl.dot
        return _ordered_dot(a.to(tl.float32), w.to(tl.float32), SWAP_AB, False)
    elif A_FORMAT == "fp8":
        if w.dtype == tl.float8e4nv:
            return _ordered_dot(a, w, SWAP_AB, False)
        else:  # int4 values are exact in e4m3
            return _ordered_dot(a, w.to(tl.float16).to(tl.float8e4nv), SWAP_AB, False)
    else:
        return _ordered_dot(a, w.to(a.dtype), SWAP_AB, False)


@triton.jit
def _along_n(v, SWAP_AB: tl.constexpr):
    """A per-output-column vector [BLOCK_N] broadcast against the accumulator."""
    if SWAP_AB:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _along_m(v, SWAP_AB: tl.constexpr):
    """A per-row vector [BLOCK_M] broadcast against the accumulator."""
    if SWAP_AB:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _as_dot_operand(a, a_zero, A_FORMAT: tl.constexpr, A_HAS_ZERO: tl.constexpr, DOT_FP32: tl.constexpr):
    """x's tile for a dot with decoded bf16 weights: a quantized activation is multiplied as the exact bf16 of
    its integers (|q - zero| <= 255, e4m3); its scale is the epilogue's."""
    if A_FORMAT == "int8":
        a = a.to(tl.int32)
        if A_HAS_ZERO:
            a -= a_zero[:, None]
        a = a.to(tl.float32)
    elif A_FORMAT == "fp8":
        a = a.to(tl.float32)
    if A_FORMAT != "float" and not DOT_FP32:  # (the interpreter's bf16 casts are not exact)
        a = a.to(tl.bfloat16)
    return a


@triton.jit
def _plane(planes, words, scale, shift, J: tl.constexpr, WIDTH: tl.constexpr, USE_PTX: tl.constexpr):
    """K-plane J of the decoded words: from the inline-PTX tuple, or decoded in float32 (the interpreter)."""
    if USE_PTX:
        return planes[J]
    else:
        return decode_plane(words, scale, shift, J, WIDTH)


@triton.jit
def _plane_pair(planes, words, scale, shift, A: tl.constexpr, B: tl.constexpr, WIDTH: tl.constexpr,
                USE_PTX: tl.constexpr):
    """K-planes A and B joined along a new fastest axis."""
    return tl.join(_plane(planes, words, scale, shift, A, WIDTH, USE_PTX),
                   _plane(planes, words, scale, shift, B, WIDTH, USE_PTX))


@triton.jit
def _planes_in_k_order(planes, words, scale, shift, WIDTH: tl.constexpr, USE_PTX: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K-planes of a 4- or 2-bit plane joined back into K order, [BLOCK_N, BLOCK_K]: plane j holds K = (32 /
    WIDTH) c + j, and tl.join adds its new axis as the fastest, so joining plane a with plane a + n/2, then those
    results likewise, down to one tensor, gives index ((c * 2 + j_top) * 2 + ...) * 2 + j_0 = (32 / WIDTH) c + j."""
    if WIDTH == 4:
        joined = tl.join(tl.join(_plane_pair(planes, words, scale, shift, 0, 4, 4, USE_PTX),
                                 _plane_pair(planes, words, scale, shift, 2, 6, 4, USE_PTX)),
                         tl.join(_plane_pair(planes, words, scale, shift, 1, 5, 4, USE_PTX),
                                 _plane_pair(planes, words, scale, shift, 3, 7, 4, USE_PTX)))
    else:  # WIDTH == 2: sixteen planes
        joined = tl.join(
            tl.join(tl.join(_plane_pair(planes, words, scale, shift, 0, 8, 2, USE_PTX),
                            _plane_pair(planes, words, scale, shift, 4, 12, 2, USE_PTX)),
                    tl.join(_plane_pair(planes, words, scale, shift, 2, 10, 2, USE_PTX),
                            _plane_pair(planes, words, scale, shift, 6, 14, 2, USE_PTX))),
            tl.join(tl.join(_plane_pair(planes, words, scale, shift, 1, 9, 2, USE_PTX),
                            _plane_pair(planes, words, scale, shift, 5, 13, 2, USE_PTX)),
                    tl.join(_plane_pair(planes, words, scale, shift, 3, 11, 2, USE_PTX),
                            _plane_pair(planes, words, scale, shift, 7, 15, 2, USE_PTX))))
    return tl.reshape(joined, (BLOCK_N, BLOCK_K))


@triton.jit
def _plane_dots(acc, x_ptr, rows_in, stride_xm, a_zero, w_ptr, w_scale_ptr, w_zero_ptr, cols_in, k0, K, stride_wn,
                stride_pn, stride_pg, A_FORMAT: tl.constexpr, A_HAS_ZERO: tl.constexpr, W_FORMAT: tl.constexpr,
                BITS: tl.constexpr, WIDTH: tl.constexpr, W_HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
                BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, JOIN: tl.constexpr, USE_PTX: tl.constexpr,
                DOT_FP32: tl.constexpr):
    """acc + the K block's product with the WIDTH-bit plane of the weights (none if BITS has no such plane):
    one dot per K-plane j (K positions k0 + (32 / WIDTH) c + j) against the matching strided columns of x, or
    (JOIN, 4- and 2-bit planes) the planes joined back into K order and one dot against x's contiguous tile,
    which Triton's pipeliner can prefetch (strided column loads it cannot, and each plane's dot waited for its
    own)."""
    # the PTX decodes into bf16, the dot operand of bf16 activations and of quantized ones (exact integers)
    BF16_PTX: tl.constexpr = USE_PTX and (A_FORMAT != "float" or x_ptr.dtype.element_ty == tl.bfloat16)
    if (BITS & WIDTH) != 0:
        PER_WORD: tl.constexpr = 32 // WIDTH
        words, scale, shift = load_plane_words(w_ptr, w_scale_ptr, w_zero_ptr, cols_in, k0, K, stride_wn,
                                               stride_pn, stride_pg, W_FORMAT,
                                               BITS, WIDTH, BITS & (WIDTH - 1), BITS - (BITS & (2 * WIDTH - 1)),
                                               W_HAS_ZERO, GROUP_SIZE, BLOCK_K)
        if BF16_PTX:
            planes = decode_planes_ptx(words, scale, shift, WIDTH)
        else:
            planes = words  # unused: _plane decodes in float32
        if JOIN and WIDTH != 1:
            w = _planes_in_k_order(planes, words, scale, shift, WIDTH, BF16_PTX, cols_in.shape[0], BLOCK_K)
            a = tl.load(x_ptr + rows_in[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :])
            acc += _tile_dot(_as_dot_operand(a, a_zero, A_FORMAT, A_HAS_ZERO, DOT_FP32), w, "float", False,
                             DOT_FP32, SWAP_AB)
        else:
            plane_k = k0 + PER_WORD * tl.arange(0, BLOCK_K // PER_WORD)
            for j in tl.static_range(PER_WORD):
                a = tl.load(x_ptr + rows_in[:, None] * stride_xm + (plane_k + j)[None, :])
                acc += _tile_dot(_as_dot_operand(a, a_zero, A_FORMAT, A_HAS_ZERO, DOT_FP32),
                                 _plane(planes, words, scale, shift, j, WIDTH, BF16_PTX), "float", False, DOT_FP32,
                                 SWAP_AB)
    return acc


@triton.jit
def _in_fragment_order(values, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The decoded words (a tuple: entry j = K offset j of word 4 s + t of the K block, [BLOCK_N, spans s, 4]) as
    one [BLOCK_N, BLOCK_K] tile in the order of wgmma's register A fragment, so that no value moves between
    threads or through shared memory: there, a thread holds for each 32 columns the 8 at (in the tile's order)
    2 t + {0, 1, 8, 9, 16, 17, 24, 25} (t = lane % 4), which we give the 8 values of word 4 s + t (K = 32 s + 8 t
    + 0..7). The tile's column 32 s + 16 j2 + 8 j1 + 2 t + j0 is K = 32 s + 8 t + 4 j2 + 2 j1 + j0 (_fragment_k
    gives x the same order)."""
    joined = tl.join(tl.join(tl.join(values[0], values[1]), tl.join(values[2], values[3])),
                     tl.join(tl.join(values[4], values[5]), tl.join(values[6], values[7])))
    # [BLOCK_N, s, t, j0, j1, j2] -> [BLOCK_N, s, j2, j1, t, j0]
    return tl.reshape(tl.permute(joined, (0, 1, 5, 4, 2, 3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _fragment_k(BLOCK_K: tl.constexpr):
    """K offset of each column of _in_fragment_order's tile: pairs of consecutive K (for 4-byte loads of x)."""
    col = tl.arange(0, BLOCK_K)
    k = (col & ~31) + 8 * ((col >> 1) & 3) + 4 * ((col >> 4) & 1) + 2 * ((col >> 3) & 1) + (col & 1)
    return tl.max_contiguous(tl.multiple_of(k, 2), 2)


@triton.jit
def _pair_decode_dot(acc, x_ptr, rows_in, stride_xm, w_ptr, s_ptr, z_ptr, cols_in, k0, stride_wn, stride_pn,
                     stride_pg, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
                     BLOCK_PRODUCT: tl.constexpr, USE_PTX: tl.constexpr, DOT_FP32: tl.constexpr,
                     BF16_BY_BITS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] + the K block's W x^T for int4 tinygemm weights (group_size a multiple of 32): the
    packed words load as they are stored, decode by byte pairs straight into the register operand of the dot, and
    x comes in the same K order (_in_fragment_order). The decode gives (q - 8) * scale + zero (the zero folded in,
    the scale applied once per pair of weights: dequant.decode_int4_words), or with SCALE_AFTER_DOT (the K block
    in one group) just MAGIC + q, exact, and the group's parameters correct the partial product instead: W x^T =
    scale * (MAGIC + q) x^T + (zero - (MAGIC + 8) * scale) * sum x, one instruction per weight fewer, for a wait
    on the dot every K block."""
    BLOCK_N: tl.constexpr = cols_in.shape[0]
    SPANS: tl.constexpr = BLOCK_K // 32
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    word = k0 // 8 + 4 * tl.arange(0, SPANS)[:, None] + tl.arange(0, 4)[None, :]  # [spans, 4]
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + cols_in[:, None, None] * (stride_wn // 4)
                    + word[None, :, :])
    a = tl.load(x_ptr + rows_in[:, None] * stride_xm + (k0 + _fragment_k(BLOCK_K))[None, :])
    if SCALE_AFTER_DOT:
        w = _in_fragment_order(decode_int4_words_raw(words, dtype, USE_PTX), BLOCK_N, BLOCK_K)
        part = _tile_dot(a, w, "float", False, DOT_FP32, True)
        group = cols_in * stride_pn + (k0 // GROUP_SIZE) * stride_pg
        scale = tl.load(s_ptr + group).to(tl.float32)
        magic = INT4_MAGIC_BF16 if dtype == tl.bfloat16 else INT4_MAGIC_F16
        shift = tl.load(z_ptr + group).to(tl.float32) - (magic + 8.0) * scale
        x_sum = tl.sum(a.to(tl.float32), axis=1)
        return acc + part * scale[:, None] + shift[:, None] * x_sum[None, :]
    else:
        span_group = (k0 + 32 * tl.arange(0, SPANS)) // GROUP_SIZE  # a word lies in one group
        group = (cols_in[:, None, None] * stride_pn + (span_group * stride_pg)[None, :, None]
                 + tl.zeros((1, 1, 4), tl.int32))
        scale = tl.load(s_ptr + group).to(dtype)  # at the words' shape: one chain of elementwise ops to the dot
        zero = tl.load(z_ptr + group).to(dtype)
        w = _in_fragment_order(decode_int4_words(words, scale, zero, dtype, USE_PTX, BF16_BY_BITS), BLOCK_N,
                               BLOCK_K)
        part = _tile_dot(a, w, "float", False, DOT_FP32, True)
        if USE_PTX and BLOCK_PRODUCT:
            # the K block's product from zero, added after: accumulating in place (Triton folds acc + dot into the
            # dot's accumulator) made ptxas serialize every wgmma of these register-operand tiles (C7515: "non
            # wgmma instructions defining accumulator registers"; one wait per wgmma in the SASS), so the decode
            # of the next 16 columns never overlapped the tensor cores. The opaque move keeps Triton from folding;
            # the add costs BLOCK_M / BLOCK_K of an instruction per weight (1/8 at 16 tokens, 1 at 128 x 128)
            part = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [part], dtype=tl.float32, is_pure=True,
                                             pack=1)
        return acc + part


@triton.jit
def _plane_gemv(x_ptr, row, stride_xm, w_ptr, cols_in, k0, K, stride_wn, BITS: tl.constexpr, WIDTH: tl.constexpr,
                SIGNED: tl.constexpr, SUB_K: tl.constexpr, X_SUM: tl.constexpr, USE_PTX: tl.constexpr):
    """sum over the SUB_K positions from k0 of (the WIDTH-bit plane's values, at their place in the BITS-bit
    value) * x, per row [BLOCK_N]; zero if BITS has no such plane. Word c of the plane holds K = k0 + (32 /
    WIDTH) c + j at bits WIDTH j: value j is multiplied by the strided column x[k0 + j :: 32 / WIDTH], so
    nothing is interleaved (dequant.mantissa_fma decodes it where it lies). SIGNED: int8 bytes, read as
    u = q + 128 (their top bit flipped). Also returns the sum of x over the positions if X_SUM (else 0): from
    the columns already loaded, reduced like the products (a separate load of x and a reduction across the
    whole program put a barrier in every group)."""
    if (BITS & WIDTH) == 0:
        return tl.zeros((cols_in.shape[0],), tl.float32), 0.0
    PER_WORD: tl.constexpr = 32 // WIDTH
    LOW: tl.constexpr = BITS & (WIDTH - 1)  # where this plane's bits sit in the value (quant/packing.py)
    COL: tl.constexpr = BITS - (BITS & (2 * WIDTH - 1))
    NW: tl.constexpr = SUB_K // PER_WORD
    c = tl.arange(0, NW)
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    words = tl.load(words_ptr + cols_in[:, None] * (stride_wn // 4) + ((COL * K) // 32 + k0 // PER_WORD + c)[None, :])
    words = words.to(tl.uint32, bitcast=True)
    if SIGNED:
        words ^= 0x80808080
    high = words >> 16
    part = tl.zeros((cols_in.shape[0], NW), tl.float32)
    xs = tl.zeros((NW,), tl.float32)
    for j in tl.static_range(PER_WORD):
        xj = tl.load(x_ptr + row * stride_xm + k0 + PER_WORD * c + j).to(tl.float32)
        if X_SUM:
            xs += xj
        if WIDTH * j + WIDTH <= 20:  # in place, or in the word shifted by 16
            part = mantissa_fma(part, words, xj, WIDTH, WIDTH * j, LOW, USE_PTX)
        else:
            part = mantissa_fma(part, high, xj, WIDTH, WIDTH * j - 16, LOW, USE_PTX)
    if X_SUM:
        return tl.sum(part, axis=1), tl.sum(xs, axis=0)
    else:
        return tl.sum(part, axis=1), 0.0


@triton.jit
def _affine_gemv(x_ptr, row, stride_xm, w_ptr, s_ptr, z_ptr, cols_in, k_start, k_end, K, stride_wn, stride_pn,
                 stride_pg, W_FORMAT: tl.constexpr, BITS: tl.constexpr, W_HAS_ZERO: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PTX: tl.constexpr):
    """One row times affine group-wise weights (w = u * scale + shift per group): per group, scale * sum(u x)
    + shift * sum(x), so the weights are never dequantized one by one (~3-4 instructions per weight: decode
    in the float mantissa, subtract, multiply-add). int8 weights are the case of one group per row, u = q +
    128, shift -128, the row scale left to the epilogue. Float or e4m3 activations (an e4m3 one multiplied as
    its float values, its scale the epilogue's); int8 ones take the DP4A GEMV."""
    ROW_SCALED: tl.constexpr = W_FORMAT == "int8"
    PLANE_BITS: tl.constexpr = 8 if ROW_SCALED else BITS
    TOP_PLANE: tl.constexpr = 8 if PLANE_BITS >= 8 else 4 if PLANE_BITS >= 4 else 2 if PLANE_BITS >= 2 else 1
    SUB_K: tl.constexpr = BLOCK_K if ROW_SCALED or BLOCK_K < GROUP_SIZE else GROUP_SIZE  # within one group
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k_block in range(k_start, k_end, BLOCK_K):
        if USE_PTX and not ROW_SCALED:  # the next block's group parameters (dequant.prefetch_group_params)
            prefetch_group_params(s_ptr, z_ptr, cols_in, k_block, K, stride_pn, stride_pg, GROUP_SIZE, W_HAS_ZERO,
                                  BLOCK_K)
        for sub in tl.static_range(BLOCK_K // SUB_K):
            k0 = k_block + sub * SUB_K
            dot = tl.zeros((BLOCK_N,), tl.float32)
            x_sum = 0.0
            for plane_bit in tl.static_range(4):  # the 8-, 4-, 2- and 1-bit planes, those BITS has
                plane_dot, plane_x_sum = _plane_gemv(x_ptr, row, stride_xm, w_ptr, cols_in, k0, K, stride_wn,
                                                     PLANE_BITS, 8 >> plane_bit, ROW_SCALED, SUB_K,
                                                     (8 >> plane_bit) == TOP_PLANE, USE_PTX)
                dot += plane_dot
                x_sum += plane_x_sum  # x summed once, by the widest plane
            if ROW_SCALED:
                acc += dot - 128.0 * x_sum
            else:
                group = cols_in * stride_pn + (k0 // GROUP_SIZE) * stride_pg
                scale = tl.load(s_ptr + group).to(tl.float32)
                zero = tl.load(z_ptr + group).to(tl.float32) if W_HAS_ZERO else None
                acc += dot * scale + affine_shift(scale, zero, W_FORMAT, W_HAS_ZERO, BITS) * x_sum
    return acc


@triton.jit
def _dp4a(a, b, acc, SIGNED_A: tl.constexpr, USE_PTX: tl.constexpr):
    """acc + the dot product of the four bytes of int32 `a` (signed if SIGNED_A, else unsigned) with the four
    signed bytes of `b`, elementwise: one DP4A on the GPU, byte by byte in the interpreter."""
    if USE_PTX:
        if SIGNED_A:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        for byte in tl.static_range(4):
            if SIGNED_A:
                a_byte = (a << (24 - 8 * byte)) >> 24
            else:
                a_byte = (a >> (8 * byte)) & 0xFF
            acc += a_byte * ((b << (24 - 8 * byte)) >> 24)
        return acc


@triton.jit
def _x_lane(x_ptr, row, stride_xm, k0, NW: tl.constexpr, PER_WORD: tl.constexpr, LANES: tl.constexpr,
            LANE: tl.constexpr):
    """The int8 activation bytes that meet byte lane LANE of a WIDTH-bit plane's words, packed as int32 [NW]:
    lane s of word c, (word >> WIDTH s) & (2^WIDTH - 1 in every byte), holds in byte b the value at K = k0 +
    PER_WORD c + LANES b + s (LANES = 8 / WIDTH values per byte)."""
    c = tl.arange(0, NW)
    base = x_ptr + row * stride_xm + k0 + PER_WORD * c + LANE
    word = tl.zeros((NW,), tl.int32)
    for b in tl.static_range(4):
        word |= (tl.load(base + LANES * b).to(tl.int32) & 0xFF) << (8 * b)
    return word


@triton.jit
def _plane_dp4a(x_ptr, row, stride_xm, words_ptr, k0, K, BITS: tl.constexpr, WIDTH: tl.constexpr,
                SUB_K: tl.constexpr, BLOCK_N: tl.constexpr, USE_PTX: tl.constexpr):
    """(sum a u, sum u) per row [BLOCK_N] over the SUB_K positions from k0, for the WIDTH-bit plane's part of
    the values u (at its place in the BITS-bit value); zeros if BITS has no such plane. The plane's words split
    into 8 / WIDTH byte lanes, each met by the activation bytes of its K positions (_x_lane)."""
    if (BITS & WIDTH) == 0:
        return tl.zeros((BLOCK_N,), tl.int32), tl.zeros((BLOCK_N,), tl.int32)
    ONES: tl.constexpr = 0x01010101
    PER_WORD: tl.constexpr = 32 // WIDTH
    LANES: tl.constexpr = 8 // WIDTH
    LOW: tl.constexpr = BITS & (WIDTH - 1)  # where this plane's bits sit in the value (quant/packing.py)
    COL: tl.constexpr = BITS - (BITS & (2 * WIDTH - 1))
    NWP: tl.constexpr = SUB_K // PER_WORD
    w = tl.load(words_ptr + ((COL * K) // 32 + k0 // PER_WORD + tl.arange(0, NWP))[None, :])
    dot = tl.zeros((BLOCK_N, NWP), tl.int32)
    lane_sum = tl.zeros((BLOCK_N, NWP), tl.int32)  # at most 255 (one 8-bit lane) or 30 per byte: no carries
    for lane in tl.static_range(LANES):
        if WIDTH == 8:
            bytes_of_lane = w
        else:  # (the arithmetic shift's sign bits stay above the mask: WIDTH * lane + WIDTH <= 8)
            bytes_of_lane = (w >> (WIDTH * lane)) & (((1 << WIDTH) - 1) * ONES)
        x_lane = _x_lane(x_ptr, row, stride_xm, k0, NWP, PER_WORD, LANES, lane)
        dot = _dp4a(bytes_of_lane, tl.broadcast_to(x_lane[None, :], (BLOCK_N, NWP)), dot, False, USE_PTX)
        lane_sum += bytes_of_lane
    u = _dp4a(lane_sum, tl.full((BLOCK_N, NWP), ONES, tl.int32), tl.zeros((BLOCK_N, NWP), tl.int32), False, USE_PTX)
    return tl.sum(dot, axis=1) << LOW, tl.sum(u, axis=1) << LOW


@triton.jit
def _dp4a_gemv(x_ptr, x_zero_ptr, row, stride_xm, w_ptr, s_ptr, z_ptr, cols_in, k_start, k_end, K, stride_wn,
               stride_pn, stride_pg, A_HAS_ZERO: tl.constexpr, W_FORMAT: tl.constexpr, BITS: tl.constexpr,
               W_HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               USE_PTX: tl.constexpr):
    """One row of an int8 activation times int8 or intx weights in integer arithmetic, four products per DP4A
    instruction: exact, as the reference's integer matmul. int8 weights (symmetric, row-scaled): the int32 dot,
    scales in the epilogue. intx (group-wise, bit planes): each plane's words split into byte lanes (a mask and
    a shift) that meet the activation bytes of the same K positions; per group sum (a - za)(u - zw) = sum a u -
    zw sum a - za sum u + n za zw, every sum by DP4A (sum u against bytes of ones), times the group scale."""
    ONES: tl.constexpr = 0x01010101
    x_words_ptr = x_ptr.to(tl.pointer_type(tl.int32)) + (row * stride_xm) // 4
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + cols_in[:, None] * (stride_wn // 4)
    if W_FORMAT == "int8":
        NW: tl.constexpr = BLOCK_K // 4
        dots = tl.zeros((BLOCK_N, NW), tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x_words = tl.load(x_words_ptr + k0 // 4 + tl.arange(0, NW))
            w = tl.load(words_ptr + (k0 // 4 + tl.arange(0, NW))[None, :])
            dots = _dp4a(w, tl.broadcast_to(x_words[None, :], (BLOCK_N, NW)), dots, True, USE_PTX)
        return tl.sum(dots, axis=1).to(tl.float32)
    else:
        SUB_K: tl.constexpr = BLOCK_K if BLOCK_K < GROUP_SIZE else GROUP_SIZE  # within one group
        SUB_WORDS: tl.constexpr = SUB_K // 4
        x_ones = tl.full((SUB_WORDS,), ONES, tl.int32)
        a_zero = tl.load(x_zero_ptr + row) if A_HAS_ZERO else 0
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for k_block in range(k_start, k_end, BLOCK_K):
            if USE_PTX:  # the next block's group parameters (dequant.prefetch_group_params)
                prefetch_group_params(s_ptr, z_ptr, cols_in, k_block, K, stride_pn, stride_pg, GROUP_SIZE,
                                      W_HAS_ZERO, BLOCK_K)
            for sub in tl.static_range(BLOCK_K // SUB_K):
                k0 = k_block + sub * SUB_K
                dot = tl.zeros((BLOCK_N,), tl.int32)  # sum a u
                u_sum = tl.zeros((BLOCK_N,), tl.int32)
                for plane_bit in tl.static_range(4):  # the 8-, 4-, 2- and 1-bit planes, those BITS has
                    plane_dot, plane_u = _plane_dp4a(x_ptr, row, stride_xm, words_ptr, k0, K, BITS, 8 >> plane_bit,
                                                     SUB_K, BLOCK_N, USE_PTX)
                    dot += plane_dot
                    u_sum += plane_u
                a_sum = tl.sum(_dp4a(tl.load(x_words_ptr + k0 // 4 + tl.arange(0, SUB_WORDS)), x_ones,
                                     tl.zeros((SUB_WORDS,), tl.int32), True, USE_PTX), axis=0)
                group = cols_in * stride_pn + (k0 // GROUP_SIZE) * stride_pg
                w_zero = tl.load(z_ptr + group).to(tl.int32) if W_HAS_ZERO else 1 << (BITS - 1)  # symmetric
                exact = dot - w_zero * a_sum - a_zero * u_sum + SUB_K * a_zero * w_zero
                acc += exact.to(tl.float32) * tl.load(s_ptr + group).to(tl.float32)
        return acc


@triton.jit
def quantized_linear_kernel(
        x_ptr, x_scale_ptr, x_zero_ptr, w_ptr, w_scale_ptr, w_zero_ptr, w_aux_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_pn, stride_pg, stride_om,
        A_FORMAT: tl.constexpr,  # "float" (x's dtype), "int8", "fp8"
        A_SCALE: tl.constexpr,  # "none", "row", "tensor"
        A_HAS_ZERO: tl.constexpr,
        W_FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, W_HAS_ZERO: tl.constexpr,
        W_SCALE: tl.constexpr,  # weight scale left for the epilogue: "none", "row", "tensor"
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, PLANES: tl.constexpr, JOIN_PLANES: tl.constexpr,
        USE_PTX: tl.constexpr,
        DOT_FP32: tl.constexpr, BF16_BY_BITS: tl.constexpr,
        A_FUSED: tl.constexpr,  # the elementwise GEMV quantizes x (in its own dtype) to e4m3 per row itself
        REDUCE_EACH: tl.constexpr = False,  # the elementwise GEMV sums each K block's products per row
        PAIR_DECODE: tl.constexpr = False,  # swapped int4 tinygemm tile: words decoded by byte pairs into wgmma's A
        SCALE_AFTER_DOT: tl.constexpr = False,  # ... the group scale and zero applied to each K block's product
        BLOCK_PRODUCT: tl.constexpr = False):  # ... each K block's product from zero, added after (_pair_decode_dot)
    USE_DOT: tl.constexpr = BLOCK_M >= 16  # else BLOCK_M == 1: the GEMV variant
    RAW: tl.constexpr = A_FORMAT != "float"
    SCALE_PER_GROUP: tl.constexpr = RAW and W_FORMAT == "intx"  # group scales multiply partial products
    INT_DOT: tl.constexpr = USE_DOT and A_FORMAT == "int8"

    # grouped program order: GROUP_M row blocks share each weight block while it is in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = rows % M  # loads stay in bounds without masks; the store is masked
    cols_in = cols % N
    offs_k = tl.arange(0, BLOCK_K)

    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_span
    k_end = min(K, k_start + k_span)
    if USE_DOT:
        ACC_SHAPE: tl.constexpr = (BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N)
        if INT_DOT and not SCALE_PER_GROUP:
            acc = tl.zeros(ACC_SHAPE, dtype=tl.int32)
        else:
            acc = tl.zeros(ACC_SHAPE, dtype=tl.float32)
        a_zero = tl.load(x_zero_ptr + rows_in).to(tl.int32) if A_HAS_ZERO else None
        PARAM_GROUP: tl.constexpr = NVFP4_BLOCK if W_FORMAT == "nvfp4" else MXFP8_BLOCK if W_FORMAT == "mxfp8" \
            else GROUP_SIZE
        PREFETCH: tl.constexpr = USE_PTX and (W_FORMAT == "int4_tinygemm" or W_FORMAT == "intx"
                                              or W_FORMAT == "nvfp4" or W_FORMAT == "mxfp8")
        for k0 in range(k_start, k_end, BLOCK_K):
            if PREFETCH:  # the next block's group parameters, while this block is decoded and multiplied
                prefetch_group_params(w_scale_ptr, w_zero_ptr, cols_in, k0, K, stride_pn, stride_pg, PARAM_GROUP,
                                      W_HAS_ZERO, BLOCK_K)
            if PLANES:  # bit planes as K-planes of 32-bit words, decoded two words at a time; a dot per plane
                for plane_bit in tl.static_range(3):  # the 4-, 2- and 1-bit planes, those BITS has
                    acc = _plane_dots(acc, x_ptr, rows_in, stride_xm, a_zero, w_ptr, w_scale_ptr, w_zero_ptr,
                                      cols_in, k0, K, stride_wn, stride_pn, stride_pg, A_FORMAT, A_HAS_ZERO,
                                      W_FORMAT, BITS, 4 >> plane_bit, W_HAS_ZERO, GROUP_SIZE, BLOCK_K, SWAP_AB,
                                      JOIN_PLANES, USE_PTX, DOT_FP32)
            elif PAIR_DECODE:  # int4 words decoded by byte pairs into the dot's register operand
                acc = _pair_decode_dot(acc, x_ptr, rows_in, stride_xm, w_ptr, w_scale_ptr, w_zero_ptr, cols_in, k0,
                                       stride_wn, stride_pn, stride_pg, GROUP_SIZE, BLOCK_K, SCALE_AFTER_DOT,
                                       BLOCK_PRODUCT, USE_PTX, DOT_FP32, BF16_BY_BITS)
            else:
                a = tl.load(x_ptr + rows_in[:, None] * stride_xm + (k0 + offs_k)[None, :])
                w = load_weight_tile(w_ptr, w_scale_ptr, w_zero_ptr, w_aux_ptr, cols_in, k0, K, stride_wn,
                                     stride_pn, stride_pg, W_FORMAT, BITS, GROUP_SIZE, W_HAS_ZERO, RAW, BLOCK_K)
                part = _tile_dot(a, w, A_FORMAT, INT_DOT, DOT_FP32, SWAP_AB)
                if SCALE_PER_GROUP:  # the K block lies in one group: one scale per output column
                    if A_HAS_ZERO:  # sum (a - za) w = sum a w - za * sum w
                        w_sum = tl.sum(w.to(tl.int32), axis=1)
                        part -= (_along_m(a_zero, SWAP_AB) * _along_n(w_sum, SWAP_AB)).to(part.dtype)
                    scale = tl.load(w_scale_ptr + cols_in * stride_pn + (k0 // GROUP_SIZE) * stride_pg)
                    scale = scale.to(tl.float32)
                    acc += part.to(tl.float32) * _along_n(scale, SWAP_AB)
                else:
                    acc += part
        if SWAP_AB:
            acc = tl.trans(acc)
    elif A_FORMAT == "int8" and (W_FORMAT == "int8" or W_FORMAT == "intx"):  # DP4A GEMV
        acc = _dp4a_gemv(x_ptr, x_zero_ptr, pid_m % M, stride_xm, w_ptr, w_scale_ptr, w_zero_ptr, cols_in, k_start,
                         k_end, K, stride_wn, stride_pn, stride_pg, A_HAS_ZERO, W_FORMAT, BITS, W_HAS_ZERO,
                         GROUP_SIZE, BLOCK_N, BLOCK_K, USE_PTX)[None, :]
    elif W_FORMAT == "int4_tinygemm" or W_FORMAT == "intx" or W_FORMAT == "int8":  # GEMV of words, group sums
        acc = _affine_gemv(x_ptr, pid_m % M, stride_xm, w_ptr, w_scale_ptr, w_zero_ptr, cols_in, k_start, k_end, K,
                           stride_wn, stride_pn, stride_pg, W_FORMAT, BITS, W_HAS_ZERO, GROUP_SIZE, BLOCK_N, BLOCK_K,
                           USE_PTX)[None, :]
    else:  # GEMV (one row): products accumulate elementwise in a [BLOCK_N, BLOCK_K] tile, reduced once (no
        # zero-point activation reaches the GEMVs but the DP4A one: int8_asym comes only with intx weights)
        row = pid_m % M
        if A_FUSED:  # the row's e4m3 scale from its largest magnitude over all of K (every split reads the row)
            amax = 0.0
            for k0 in range(0, K, BLOCK_K):
                amax = tl.maximum(amax, amax_of(tl.load(x_ptr + row * stride_xm + k0 + offs_k).to(tl.float32), 0),
                                  propagate_nan=tl.PropagateNan.ALL)
            a_scale = fp8_scale(amax, x_ptr.dtype.element_ty, BF16_BY_BITS)
        # REDUCE_EACH: per-row sums after every K block (shuffles each step) instead of a [BLOCK_N, BLOCK_K] fp32
        # tile reduced once — sm_90: 56 registers instead of ~119 at 16 x 512, so twice the programs per SM to keep
        # loads in flight, for ~0.6 more SASS instructions per weight
        ACC_K: tl.constexpr = 1 if REDUCE_EACH else BLOCK_K
        acc_tile = tl.zeros((BLOCK_N, ACC_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            a = tl.load(x_ptr + row * stride_xm + k0 + offs_k).to(tl.float32)
            if A_FUSED:
                a = quantize_e4m3(a, a_scale, USE_PTX)
            w = load_weight_tile(w_ptr, w_scale_ptr, w_zero_ptr, w_aux_ptr, cols_in, k0, K, stride_wn, stride_pn,
                                 stride_pg, W_FORMAT, BITS, GROUP_SIZE, W_HAS_ZERO, RAW, BLOCK_K)
            products = to_float(w) * a[None, :]
            if REDUCE_EACH:
                products = tl.sum(products, axis=1, keep_dims=True)
            acc_tile += products
        acc = tl.sum(acc_tile, axis=1)[None, :]
        if A_FUSED:  # where the epilogue applies a row scale, in the same order
            acc = acc * a_scale

    out = acc.to(tl.float32)
    if A_SCALE == "row":
        out *= tl.load(x_scale_ptr + rows_in)[:, None]
    elif A_SCALE == "tensor":
        out *= tl.load(x_scale_ptr)
    if W_SCALE == "row":
        out *= tl.load(w_scale_ptr + cols_in).to(tl.float32)[None, :]
    elif W_SCALE == "tensor":
        out *= tl.load(w_scale_ptr).to(tl.float32)
    if HAS_BIAS:  # added by the first K split only
        out += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :] * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + pid_k * M * stride_om + rows[:, None] * stride_om + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, cast_to(out, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)
    else:  # every split stores, an empty one its zeros
        tl.store(out_ptrs, out, mask=mask)


@triton.jit
def dequantize_weight_kernel(w_ptr, w_scale_ptr, w_zero_ptr, w_aux_ptr, out_ptr, N, K, stride_wn, stride_pn,
                             stride_pg,
                             W_FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                             W_HAS_ZERO: tl.constexpr, W_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """The whole weight in out's dtype, every scale applied: the first half of the dequantize-then-cuBLAS
    candidate the autotuner may pick at large M (where the GEMM is compute-bound and cuBLAS's is fastest)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = cols % N
    k0 = tl.program_id(1) * BLOCK_K
    w = load_weight_tile(w_ptr, w_scale_ptr, w_zero_ptr, w_aux_ptr, cols_in, k0, K, stride_wn, stride_pn, stride_pg,
                         W_FORMAT, BITS, GROUP_SIZE, W_HAS_ZERO, False, BLOCK_K)
    if W_SCALE == "row":
        w = w * tl.load(w_scale_ptr + cols_in).to(tl.float32)[:, None]
    elif W_SCALE == "tensor":
        w = w * tl.load(w_scale_ptr).to(tl.float32)
    out_ptrs = out_ptr + cols[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :]
    tl.store(out_ptrs, cast_to(w, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=(cols < N)[:, None])
