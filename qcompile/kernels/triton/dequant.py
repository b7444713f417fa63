"""Weight-load and decode steps of the Triton linear template: one small `@triton.jit` function per format.

`load_weight_tile` returns the weight for the rows `offs_n` and K columns [k0, k0 + BLOCK_K) as a [BLOCK_N,
BLOCK_K] tile (K contiguous, as stored), decoded as qcompile.quant writes the format. Packed bytes are loaded
once, as wide vectors, and spread to values with shifts and interleaves; group parameters are loaded once per
group and broadcast over the group's values.
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
def small_int_to_float(u, OFFSET: tl.constexpr):
    """float32(u - OFFSET) for int32 0 <= u < 2^22, exactly, by placing u in the mantissa of 2^23: two
    full-rate instructions instead of a quarter-rate integer-to-float conversion."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def mantissa_fma(acc, words, x, WIDTH: tl.constexpr, POS: tl.constexpr, LOW: tl.constexpr, USE_PTX: tl.constexpr):
    """acc + u * 2^LOW * x for the WIDTH-bit values u at bit POS of uint32 `words` (POS + WIDTH <= 23): u is
    masked where it lies and or-ed into the mantissa of 2^E, E = 23 + LOW - POS (one LOP3, inline on CUDA: the
    compiler emits an AND and an OR), whose mantissa's unit at bit POS is 2^LOW: minus 2^E it is u * 2^LOW
    exactly, so x is used as it is (no scaling per position)."""
    MASK: tl.constexpr = ((1 << WIDTH) - 1) << POS
    EXPONENT: tl.constexpr = 23 + LOW - POS
    MAGIC: tl.constexpr = (127 + EXPONENT) << 23
    if USE_PTX:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xea;", "=r,r,r,r",
                                         [words, tl.full(words.shape, MASK, tl.uint32),
                                          tl.full(words.shape, MAGIC, tl.uint32)], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    else:
        bits = (words & MASK) | MAGIC
    u = bits.to(tl.float32, bitcast=True) - (2.0 ** EXPONENT)
    return acc + u * x[None, :]


@triton.jit
def to_float(w):
    """A weight tile as float32; int8 goes through small_int_to_float."""
    if w.dtype == tl.int8:
        return small_int_to_float(w.to(tl.int32) + 128, 128)
    else:
        return w.to(tl.float32)


@triton.jit
def _unpack_plane(w_ptr, row_offsets, k0, K, WIDTH: tl.constexpr, LOW: tl.constexpr, COL: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """One bit plane's values for [rows, k0:k0+BLOCK_K], shifted to their place (LOW) in the b-bit value."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    MASK: tl.constexpr = (1 << WIDTH) - 1
    cols = (COL * K) // 8 + k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
    b = tl.load(w_ptr + row_offsets[:, None] + cols[None, :]).to(tl.int32)
    if PER_BYTE == 1:
        v = b
    elif PER_BYTE == 2:  # value k sits in byte k // 2 at bit (k % 2) * 4: interleave low and high nibbles
        v = tl.interleave(b & MASK, b >> 4)
    elif PER_BYTE == 4:
        v = tl.interleave(tl.interleave(b & MASK, (b >> 4) & MASK), tl.interleave((b >> 2) & MASK, b >> 6))
    else:
        v = tl.interleave(
            tl.interleave(tl.interleave(b & 1, (b >> 4) & 1), tl.interleave((b >> 2) & 1, (b >> 6) & 1)),
            tl.interleave(tl.interleave((b >> 1) & 1, (b >> 5) & 1), tl.interleave((b >> 3) & 1, b >> 7)))
    return v << LOW


@triton.jit
def unpack_bit_planes(w_ptr, row_offsets, k0, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """b-bit unsigned values [rows, BLOCK_K] from bit-plane packed rows (quant/packing.py): planes widest
    first; the narrower planes hold the low bits; plane p starts at column K * (bits of wider planes) / 8."""
    u = tl.zeros((row_offsets.shape[0], BLOCK_K), dtype=tl.int32)
    if (BITS & 8) != 0:
        u = u | _unpack_plane(w_ptr, row_offsets, k0, K, 8, 0, 0, BLOCK_K)
    if (BITS & 4) != 0:
        u = u | _unpack_plane(w_ptr, row_offsets, k0, K, 4, BITS & 3, BITS - (BITS & 7), BLOCK_K)
    if (BITS & 2) != 0:
        u = u | _unpack_plane(w_ptr, row_offsets, k0, K, 2, BITS & 1, BITS - (BITS & 3), BLOCK_K)
    if (BITS & 1) != 0:
        u = u | _unpack_plane(w_ptr, row_offsets, k0, K, 1, 0, BITS - 1, BLOCK_K)
    return u


NVFP4_BLOCK = tl.constexpr(16)  # elements per e4m3 block scale
MXFP8_BLOCK = tl.constexpr(32)  # elements per e8m0 scale


@triton.jit
def group_param_offsets(offs_n, k0, stride_pn, stride_pg, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets of the tile's per-(row, group) parameters: [BLOCK_N] when the K block sits inside one group, else
    [BLOCK_N, groups in the tile]. Strides (row, group): on CUDA they are stored column-major (layout.py) so
    that the tile's rows at one group are contiguous."""
    if BLOCK_K <= GROUP_SIZE:
        return offs_n * stride_pn + (k0 // GROUP_SIZE) * stride_pg
    else:
        groups = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
        return offs_n[:, None] * stride_pn + groups[None, :] * stride_pg


@triton.jit
def load_group_param(ptr, offs_n, k0, stride_pn, stride_pg, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The per-(row, group) parameters of the tile as float32 [BLOCK_N, groups in the tile] (one per row when
    the K block sits inside one group)."""
    p = tl.load(ptr + group_param_offsets(offs_n, k0, stride_pn, stride_pg, GROUP_SIZE, BLOCK_K)).to(tl.float32)
    if BLOCK_K <= GROUP_SIZE:
        return p[:, None]
    else:
        return p


@triton.jit
def _prefetch_to_l1(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_group_params(s_ptr, z_ptr, offs_n, k0, K, stride_pn, stride_pg, GROUP_SIZE: tl.constexpr,
                          HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """Prefetch into L1 the group parameters of the K block after k0 (the last block's own at the end). The
    tile loop loads a K block's parameters right before decoding it; they are a few bytes per thread, too
    few for Triton's pipeliner (cp.async takes 4+), so each iteration waited an L2 round trip for them."""
    offsets = group_param_offsets(offs_n, tl.minimum(k0 + BLOCK_K, K - BLOCK_K), stride_pn, stride_pg, GROUP_SIZE,
                                  BLOCK_K)
    _prefetch_to_l1(s_ptr + offsets)
    if HAS_ZERO:
        _prefetch_to_l1(z_ptr + offsets)


@triton.jit
def affine_shift(scale, zero, W_FORMAT: tl.constexpr, HAS_ZERO: tl.constexpr, BITS: tl.constexpr):
    """shift such that w = u * scale + shift: tinygemm's float zero z (w = (q - 8) scale + z), intx's integer
    zero (w = (u - z) scale), or the symmetric zero 2^(BITS-1)."""
    if W_FORMAT == "int4_tinygemm":
        return zero - 8.0 * scale
    elif HAS_ZERO:
        return -zero * scale
    else:
        return -(1 << (BITS - 1)) * scale


@triton.jit
def group_affine(v, scale, shift, SHIFT_FIRST: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per group along K: (v - shift) * scale (SHIFT_FIRST) or v * scale + shift; v [BLOCK_N, BLOCK_K], the
    parameters [BLOCK_N, groups in the tile] from load_group_param."""
    if BLOCK_K <= GROUP_SIZE:
        if SHIFT_FIRST:
            return (v - shift) * scale
        else:
            return v * scale + shift
    else:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        g = tl.reshape(v, (v.shape[0], NG, GROUP_SIZE))
        if SHIFT_FIRST:
            g = (g - shift[:, :, None]) * scale[:, :, None]
        else:
            g = g * scale[:, :, None] + shift[:, :, None]
        return tl.reshape(g, (v.shape[0], BLOCK_K))


@triton.jit
def e2m1_to_float(code):
    """fp4 e2m1 code (sign bit 3) -> float32 (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), built from bits: exponent
    field e, mantissa bit m: 2^(e-1) * (1 + m/2), or m/2 when e = 0."""
    code = code.to(tl.int32)
    exponent = (code >> 1) & 3
    mantissa = code & 1
    bits = tl.where(exponent == 0, mantissa * (126 << 23), ((exponent + 126) << 23) | (mantissa << 22))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


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
def _pick(bit, book_ptr, hi: tl.constexpr, lo: tl.constexpr):
    return tl.where(bit, tl.load(book_ptr + hi), tl.load(book_ptr + lo))


@triton.jit
def codebook_lookup(book_ptr, index):
    """book[index] for 4-bit indices: a select tree over the index bits on the 16 entries as scalars in
    registers (a per-weight gather from memory costs far more)."""
    b0 = (index & 1) != 0
    b1 = (index & 2) != 0
    b2 = (index & 4) != 0
    low = tl.where(b1, _pick(b0, book_ptr, 3, 2), _pick(b0, book_ptr, 1, 0))
    low = tl.where(b2, tl.where(b1, _pick(b0, book_ptr, 7, 6), _pick(b0, book_ptr, 5, 4)), low)
    high = tl.where(b1, _pick(b0, book_ptr, 11, 10), _pick(b0, book_ptr, 9, 8))
    high = tl.where(b2, tl.where(b1, _pick(b0, book_ptr, 15, 14), _pick(b0, book_ptr, 13, 12)), high)
    return tl.where((index & 8) != 0, high, low)


@triton.jit
def load_weight_tile(w_ptr, s_ptr, z_ptr, aux_ptr, offs_n, k0, K, stride_wn, stride_pn, stride_pg,
                     W_FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     HAS_ZERO: tl.constexpr, RAW: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile. RAW=True (quantized activations): integer values (u - zero) as int8,
    or e4m3 as stored; group scales are then applied to the partial product by the caller. RAW=False:
    float32 with every scale that varies along K applied (row scales stay for the epilogue)."""
    rows = offs_n * stride_wn
    if W_FORMAT == "int8" or W_FORMAT == "fp8" or W_FORMAT == "mxfp8":
        w = tl.load(w_ptr + rows[:, None] + (k0 + tl.arange(0, BLOCK_K))[None, :])
        if W_FORMAT == "mxfp8":  # e4m3 * 2^(e - 127) per 32
            e = load_group_param(s_ptr, offs_n, k0, stride_pn, stride_pg, MXFP8_BLOCK, BLOCK_K)
            w = group_affine(w.to(tl.float32), e8m0_to_float(e), tl.zeros((1, 1), tl.float32), False, MXFP8_BLOCK,
                             BLOCK_K)
        elif not RAW:
            w = to_float(w)
    else:  # sub-byte formats, bit-plane packed along K
        u = unpack_bit_planes(w_ptr, rows, k0, K, BITS, BLOCK_K)
        if W_FORMAT == "int4_tinygemm":  # (q - 8) * scale + zero, float zero domain
            scale = load_group_param(s_ptr, offs_n, k0, stride_pn, stride_pg, GROUP_SIZE, BLOCK_K)
            zero = load_group_param(z_ptr, offs_n, k0, stride_pn, stride_pg, GROUP_SIZE, BLOCK_K)
            w = group_affine(small_int_to_float(u, 8), scale, zero, False, GROUP_SIZE, BLOCK_K)
        elif W_FORMAT == "intx":  # (u - zero) * scale; symmetric: zero = 2^(bits-1)
            if RAW:  # BLOCK_K <= GROUP_SIZE here: one zero per row
                if HAS_ZERO:
                    zero = tl.load(z_ptr + offs_n * stride_pn + (k0 // GROUP_SIZE) * stride_pg).to(tl.int32)
                    w = (u - zero[:, None]).to(tl.int8)
                else:
                    w = (u - (1 << (BITS - 1))).to(tl.int8)
            else:
                scale = load_group_param(s_ptr, offs_n, k0, stride_pn, stride_pg, GROUP_SIZE, BLOCK_K)
                if HAS_ZERO:
                    zero = load_group_param(z_ptr, offs_n, k0, stride_pn, stride_pg, GROUP_SIZE, BLOCK_K)
                    w = group_affine(small_int_to_float(u, 0), scale, zero, True, GROUP_SIZE, BLOCK_K)
                else:  # the symmetric zero point folds into the conversion
                    w = group_affine(small_int_to_float(u, 1 << (BITS - 1)), scale, tl.zeros((1, 1), tl.float32),
                                     False, GROUP_SIZE, BLOCK_K)
        elif W_FORMAT == "codebook":  # lookup; the row scale is applied in the epilogue
            w = codebook_lookup(aux_ptr, u)
        else:  # nvfp4: e2m1 * e4m3 block scale (per 16) * float32 tensor scale
            block_scale = load_group_param(s_ptr, offs_n, k0, stride_pn, stride_pg, NVFP4_BLOCK, BLOCK_K)
            w = group_affine(e2m1_to_float(u), block_scale * tl.load(aux_ptr), tl.zeros((1, 1), tl.float32), False,
                             NVFP4_BLOCK, BLOCK_K)
    return w


def _planes_ptx(width: int) -> str:
    """Inline PTX decoding two 32-bit words of a `width`-bit plane (2 x 32 / width values) into 32 / width
    K-planes of bf16x2 (one value of each word per register): PRMT gathers byte b of both words into the low and
    high halves of one register, LOP3 puts a value in each half's bf16 mantissa (0x4300 | u = 128 + u, exact),
    one packed FMA takes the 128 off (exact) and one gives u * scale + shift for both words: ~2 instructions per
    weight where decoding value by value in float32 takes ~6 (benchmarks/experiments/sass_count.py counts them).
    Output i holds the value at bits [width*i, width*(i+1)) of each word, i.e. its K offset i (quant/packing.py's
    little-endian order). Operands: outputs $0..$(n-1), the two words, the scale pair, the shift pair."""
    per_byte, mask, n = 8 // width, (1 << width) - 1, 32 // width
    lines = ["{", ".reg .b32 x, t, one, offset;", "mov.b32 one, 0x3f803f80;", "mov.b32 offset, 0xc300c300;"]
    for byte in range(4):
        lines.append(f"prmt.b32 x, ${n}, ${n + 1}, {byte | ((4 + byte) << 8):#x};")
        for p in range(per_byte):
            if p:
                lines.append(f"shr.u32 x, x, {width};")
            lines += [f"lop3.b32 t, x, {mask * 0x10001:#x}, 0x43004300, 0xea;",
                      "fma.rn.bf16x2 t, t, one, offset;",
                      f"fma.rn.bf16x2 ${byte * per_byte + p}, t, ${n + 2}, ${n + 3};"]
    # One line: Inductor copies this global into the kernel source it generates, and torch 2.11 writes it
    # between quotes as is (a newline there ends the string literal); PTX needs none between statements.
    return " ".join(lines + ["}"])


PLANES_PTX_4 = tl.constexpr(_planes_ptx(4))
PLANES_PTX_2 = tl.constexpr(_planes_ptx(2))
PLANES_PTX_1 = tl.constexpr(_planes_ptx(1))
PLANES_CONSTRAINTS_4 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 4))
PLANES_CONSTRAINTS_2 = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 4))
PLANES_CONSTRAINTS_1 = tl.constexpr(",".join(["=r"] * 32 + ["r"] * 4))


@triton.jit
def decode_plane(words, scale, shift, j: tl.constexpr, WIDTH: tl.constexpr):
    """Plane j of `words` decoded in float32, u * scale + shift (the interpreter's and fp16 models' path)."""
    return ((words >> (WIDTH * j)) & ((1 << WIDTH) - 1)).to(tl.float32) * scale + shift


@triton.jit
def load_plane_words(w_ptr, s_ptr, z_ptr, offs_n, k0, K, stride_wn, stride_pn, stride_pg, W_FORMAT: tl.constexpr,
                     BITS: tl.constexpr, WIDTH: tl.constexpr, LOW: tl.constexpr, COL: tl.constexpr,
                     HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """One bit plane (WIDTH bits, the value's bits LOW.., starting at byte column COL * K / 8 of each row:
    quant/packing.py) of a BITS-bit weight tile [BLOCK_N, BLOCK_K], as 32-bit words [BLOCK_N, BLOCK_K * WIDTH
    / 32] with its decode parameters per word, such that the weight is the sum over planes of u * scale + shift:
    scale = s * 2^LOW; shift (on the plane holding the value's top bits, 0 on the others) = -2^(BITS-1) * s,
    plus the zero point: tinygemm's float zero z (w = (q - 8) s + z) or intx's integer zero (w = (u - z) s).
    A word lies in one group: the parameters are loaded once per row when the K block lies in one group (a 2-D
    gather costs a relayout), else once per word."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    word_k = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    w = tl.load(words_ptr + offs_n[:, None] * (stride_wn // 4) + ((COL * K) // 32 + word_k)[None, :])
    if BLOCK_K <= GROUP_SIZE:
        group = offs_n * stride_pn + (k0 // GROUP_SIZE) * stride_pg
        s = tl.load(s_ptr + group).to(tl.float32)[:, None]
        zero = tl.load(z_ptr + group).to(tl.float32)[:, None] if HAS_ZERO else None
    else:
        group = offs_n[:, None] * stride_pn + (word_k * PER_WORD // GROUP_SIZE)[None, :] * stride_pg
        s = tl.load(s_ptr + group).to(tl.float32)
        zero = tl.load(z_ptr + group).to(tl.float32) if HAS_ZERO else None
    if COL != 0:  # a lower plane: its bits only
        shift = tl.zeros_like(s)
    else:
        shift = affine_shift(s, zero, W_FORMAT, HAS_ZERO, BITS)
    return w, s * (1 << LOW), shift


@triton.jit
def decode_planes_ptx(w, scale, shift, WIDTH: tl.constexpr):
    """Every plane of the words as bf16, by inline PTX (a tuple of 32 / WIDTH tensors)."""
    if WIDTH == 4:
        return tl.inline_asm_elementwise(PLANES_PTX_4, PLANES_CONSTRAINTS_4,
                                         [w, scale.to(tl.bfloat16), shift.to(tl.bfloat16)],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    elif WIDTH == 2:
        return tl.inline_asm_elementwise(PLANES_PTX_2, PLANES_CONSTRAINTS_2,
                                         [w, scale.to(tl.bfloat16), shift.to(tl.bfloat16)],
                                         dtype=(tl.bfloat16,) * 16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(PLANES_PTX_1, PLANES_CONSTRAINTS_1,
                                         [w, scale.to(tl.bfloat16), shift.to(tl.bfloat16)],
                                         dtype=(tl.bfloat16,) * 32, is_pure=True, pack=2)


def _int4_pairs_ptx(dtype: str) -> str:
    """Inline PTX decoding one 32-bit word of int4 tinygemm values (nibble j = K offset j, quant/packing.py) into
    its 8 weights (q - 8) * scale + zero in bf16 / fp16, by pairs: byte i holds K offsets 2i, 2i + 1, which the
    wgmma A fragment holds in one 32-bit register. Per byte: PRMT puts it in the low half and the word shifted by
    4 in the high half (the two nibbles at bits 0 and 16), LOP3 places them in the mantissas of a magic number
    (bf16 0x4300 = 128, fp16 0x6400 = 1024: 128 + q exact), one packed FMA takes 128 + 8 off (exact) and one gives
    (q - 8) * scale + zero, rounded once: (1 SHF + 4 PRMT + 4 LOP3 + 8 FMA) / 8 = 2.1 instructions per weight.
    Operands: outputs $0..$7 (16-bit), the word $8, the scale $9 and the zero $10 (16-bit)."""
    magic, offset, one, fma = {"bf16": ("0x43004300", "0xc308c308", "0x3f803f80", "fma.rn.bf16x2"),
                               "f16": ("0x64006400", "0xe408e408", "0x3c003c00", "fma.rn.f16x2")}[dtype]
    lines = ["{", ".reg .b32 high, pair, one, offset, scale2, zero2;", f"mov.b32 one, {one};",
             f"mov.b32 offset, {offset};", "mov.b32 scale2, {$9, $9};", "mov.b32 zero2, {$10, $10};",
             "shr.u32 high, $8, 4;"]
    for byte in range(4):
        selector = byte | (byte << 4) | ((4 + byte) << 8) | ((4 + byte) << 12)
        lines += [f"prmt.b32 pair, $8, high, {selector:#x};",
                  f"lop3.b32 pair, pair, 0x000f000f, {magic}, 0xea;",
                  f"{fma} pair, pair, one, offset;",
                  f"{fma} pair, pair, scale2, zero2;",
                  f"mov.b32 {{${2 * byte}, ${2 * byte + 1}}}, pair;"]
    return " ".join(lines + ["}"])  # one line: see _planes_ptx


def _int4_raw_pairs_ptx(magic: str) -> str:
    """As _int4_pairs_ptx without the two FMAs: each pair of values as MAGIC + q (exact, bf16 128 + q or fp16
    1024 + q), for a dot whose partial product the group scale and zero then correct ((1 SHF + 4 PRMT + 4 LOP3) /
    8 = 1.1 instructions per weight). Operands: outputs $0..$7 (16-bit), the word $8."""
    lines = ["{", ".reg .b32 high, pair;", "shr.u32 high, $8, 4;"]
    for byte in range(4):
        selector = byte | (byte << 4) | ((4 + byte) << 8) | ((4 + byte) << 12)
        lines += [f"prmt.b32 pair, $8, high, {selector:#x};", f"lop3.b32 pair, pair, 0x000f000f, {magic}, 0xea;",
                  f"mov.b32 {{${2 * byte}, ${2 * byte + 1}}}, pair;"]
    return " ".join(lines + ["}"])  # one line: see _planes_ptx


INT4_PAIRS_PTX_BF16 = tl.constexpr(_int4_pairs_ptx("bf16"))
INT4_PAIRS_PTX_F16 = tl.constexpr(_int4_pairs_ptx("f16"))
INT4_PAIRS_CONSTRAINTS = tl.constexpr(",".join(["=h"] * 8 + ["r", "h", "h"]))
INT4_RAW_PAIRS_PTX_BF16 = tl.constexpr(_int4_raw_pairs_ptx("0x43004300"))
INT4_RAW_PAIRS_PTX_F16 = tl.constexpr(_int4_raw_pairs_ptx("0x64006400"))
INT4_RAW_PAIRS_CONSTRAINTS = tl.constexpr(",".join(["=h"] * 8 + ["r"]))
INT4_MAGIC_BF16 = tl.constexpr(128.0)  # the magic numbers' values: 0x4300 in bf16, 0x6400 in fp16
INT4_MAGIC_F16 = tl.constexpr(1024.0)


@triton.jit
def decode_int4_words(words, scale, zero, dtype: tl.constexpr, USE_PTX: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """The 8 int4 tinygemm weights of each 32-bit word, (q - 8) * scale + zero in `dtype` (bf16 / fp16), as a
    tuple: entry j holds K offset j of every word. `scale` and `zero` come at the words' shape, in `dtype`. On the
    GPU by byte pairs in inline PTX (_int4_pairs_ptx); in the interpreter in float32, rounded once."""
    if USE_PTX:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(INT4_PAIRS_PTX_BF16, INT4_PAIRS_CONSTRAINTS, [words, scale, zero],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(INT4_PAIRS_PTX_F16, INT4_PAIRS_CONSTRAINTS, [words, scale, zero],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        s = scale.to(tl.float32)
        z = zero.to(tl.float32)
        return (cast_to((((words >> 0) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 4) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 8) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 12) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 16) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 20) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 24) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS),
                cast_to((((words >> 28) & 15) - 8).to(tl.float32) * s + z, dtype, BF16_BY_BITS))


@triton.jit
def decode_int4_words_raw(words, dtype: tl.constexpr, USE_PTX: tl.constexpr):
    """The 8 int4 values of each 32-bit word as MAGIC + q in `dtype` (exact: 128 + q in bf16, 1024 + q in fp16),
    a tuple as decode_int4_words; the caller applies (q - 8) * scale + zero to the dot's partial product."""
    if USE_PTX:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(INT4_RAW_PAIRS_PTX_BF16, INT4_RAW_PAIRS_CONSTRAINTS, [words],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(INT4_RAW_PAIRS_PTX_F16, INT4_RAW_PAIRS_CONSTRAINTS, [words],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        magic = INT4_MAGIC_BF16 if dtype == tl.bfloat16 else INT4_MAGIC_F16
        return ((((words >> 0) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 4) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 8) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 12) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 16) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 20) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 24) & 15).to(tl.float32) + magic).to(dtype),
                (((words >> 28) & 15).to(tl.float32) + magic).to(dtype))
