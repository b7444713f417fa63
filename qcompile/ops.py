"""The `qcompile::` operators the linear pass inserts — one named node per step of a scheme.

Each op's implementation is the pure-torch reference from `qcompile.quant`, registered as
CompositeImplicitAutograd: a printed graph shows `qcompile.quantize_int8_per_token`, `qcompile.matmul_int8`,
..., and when Inductor (or AOTInductor) traces the graph these decompose into plain aten ops, so a compiled
model or an exported package never needs qcompile at run time. Device lowerings (passes/lower_*.py) replace
patterns of these ops with fused kernels before that trace.

Shapes: activations are [..., K]; weights are [N, K] (or packed along K); outputs [..., N].
"""
from __future__ import annotations

import torch

from .quant import affine, codebook, float8, microscaling, packing

NAMESPACE = "qcompile"
_lib = torch.library.Library(NAMESPACE, "DEF")


def _op(schema: str):
    """Define `qcompile::<schema>` with the decorated function as its reference implementation."""
    def register(fn):
        name = schema.split("(", 1)[0]
        _lib.define(schema)
        _lib.impl(name, fn, "CompositeImplicitAutograd")
        return getattr(torch.ops.qcompile, name).default
    return register


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# --- activation quantization (dynamic, per call) ---------------------------------------------------------

@_op("quantize_int8_per_token(Tensor x) -> (Tensor q, Tensor scale)")
def quantize_int8_per_token(x):
    """Symmetric int8 per token (row of the last dim): q int8 [..., K], scale float32 [..., 1]."""
    scale = affine.choose_qparams_symmetric(x, x.shape[-1], bits=8)
    return affine.quantize_symmetric(x, scale, x.shape[-1], bits=8), scale


@_op("quantize_int8_per_token_asym(Tensor x) -> (Tensor q, Tensor scale, Tensor zero)")
def quantize_int8_per_token_asym(x):
    """Asymmetric int8 per token: q int8, scale float32 [..., 1], zero int32 [..., 1]."""
    scale, zero = affine.choose_qparams_asymmetric(x, x.shape[-1], bits=8, signed=True)
    return affine.quantize_asymmetric(x, scale, zero, x.shape[-1], bits=8, signed=True), scale, zero


@_op("quantize_float8(Tensor x, str granularity) -> (Tensor q, Tensor scale)")
def quantize_float8(x, granularity):
    """e4m3 with a float32 scale per row ([..., 1]) or per tensor ([])."""
    scale = float8.choose_scale_float8(x, granularity)
    return float8.quantize_float8(x, scale), scale


@_op("quantize_mxfp8(Tensor x) -> (Tensor q, Tensor scale)")
def quantize_mxfp8(x):
    return microscaling.quantize_mxfp8(x)


@_op("quantize_nvfp4(Tensor x) -> (Tensor q, Tensor block_scale, Tensor tensor_scale)")
def quantize_nvfp4(x):
    return microscaling.quantize_nvfp4(x)


# --- weight dequantization (weight-only schemes, and emulated block-scaled formats) ----------------------

@_op("dequantize_int8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor")
def dequantize_int8(q, scale, dtype):
    return affine.dequantize_symmetric(q, scale.reshape(-1, 1), q.shape[-1], dtype)


@_op("dequantize_float8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor")
def dequantize_float8(q, scale, dtype):
    return float8.dequantize_float8(q, scale.reshape(-1, 1), dtype)  # [N] per row, or [] per tensor


@_op("dequantize_int4_tinygemm(Tensor packed, Tensor scale, Tensor zero, int group_size, ScalarType dtype) -> Tensor")
def dequantize_int4_tinygemm(packed, scale, zero, group_size, dtype):
    q = packing.unpack_along_k(packed, 4, packed.shape[-1] * 2)
    return affine.dequantize_tinygemm(q, scale, zero, group_size, dtype)


@_op("dequantize_intx(Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size, ScalarType dtype) -> Tensor")
def dequantize_intx(packed, scale, zero, bits, group_size, dtype):
    """w = (u - zero) * scale per group; zero=None means symmetric (zero = 2^(bits-1))."""
    u = packing.unpack_along_k(packed, bits, packed.shape[-1] * 8 // bits)
    z = torch.full_like(scale, 1 << (bits - 1)) if zero is None else zero
    return affine.dequantize_asymmetric(u, scale, z, group_size, dtype)


@_op("dequantize_codebook(Tensor packed, Tensor codebook, Tensor scale, ScalarType dtype) -> Tensor")
def dequantize_codebook(packed, codebook_, scale, dtype):
    return codebook.dequantize_codebook(packed, codebook_, scale, dtype)


@_op("dequantize_mxfp8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor")
def dequantize_mxfp8(q, scale, dtype):
    return microscaling.dequantize_mxfp8(q, scale, dtype)


@_op("dequantize_nvfp4(Tensor packed, Tensor block_scale, Tensor tensor_scale, ScalarType dtype) -> Tensor")
def dequantize_nvfp4(packed, block_scale, tensor_scale, dtype):
    return microscaling.dequantize_nvfp4(packed, block_scale, tensor_scale, dtype)


# --- quantized matmuls (accumulate, no output scaling) ---------------------------------------------------

@_op("matmul_int8(Tensor a, Tensor b) -> Tensor")
def matmul_int8(a, b):
    """int8 [..., K] x int8 [N, K] -> exact int32 [..., N]."""
    rows = _flat(a)
    m, (n, k) = rows.shape[0], b.shape
    if rows.is_cuda and (k % 8 or n % 8):  # cuBLAS's int8 GEMM wants K and N in multiples of 8: exact in float64
        return (rows.double() @ b.double().t()).to(torch.int32).reshape(*a.shape[:-1], n)
    # CUDA's _int_mm wants more than 16 rows; ATen's CPU one misreads a single row of stride 0 (as Inductor may
    # lay one out): pad with zero rows into a fresh tensor
    min_rows = 17 if rows.is_cuda else 2
    if m < min_rows:
        rows = torch.cat([rows, rows.new_zeros(min_rows - m, k)])
    return torch._int_mm(rows, b.t())[:m].reshape(*a.shape[:-1], n)


@_op("matmul_float8(Tensor a, Tensor b) -> Tensor")
def matmul_float8(a, b):
    """e4m3 [..., K] x e4m3 [N, K] -> float32 [..., N]."""
    return (_flat(a).float() @ b.float().t()).reshape(*a.shape[:-1], b.shape[0])


@_op("matmul_intx(Tensor a, Tensor? a_zero, Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size) -> Tensor")
def matmul_intx(a, a_zero, packed, scale, zero, bits, group_size):
    """Quantized activation (int8, or e4m3) [..., K] x group-wise b-bit weight -> float32 [..., N]:
    sum over groups g of scale[n, g] * sum_{k in g} (a[k] - a_zero) * (w[n, k] - zero[n, g]).
    The activation's own scale is applied after, by scale_output."""
    w = dequantize_intx(packed, scale, zero, bits, group_size, torch.float32)
    af = a.float() if a_zero is None else a.float() - a_zero.float()
    return (_flat(af) @ w.t()).reshape(*a.shape[:-1], w.shape[0])


@_op("scale_output(Tensor acc, Tensor a_scale, Tensor? w_scale, Tensor? bias, ScalarType dtype) -> Tensor")
def scale_output(acc, a_scale, w_scale, bias, dtype):
    """acc * a_scale [* w_scale per output channel] [+ bias], in float32, cast to dtype."""
    out = acc.float() * a_scale
    if w_scale is not None:
        out = out * w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


# --- attention ----------------------------------------------------------------------------------------------

@_op("grouped_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float? scale) -> Tensor")
def grouped_query_attention(q, k, v, mask, scale):
    """softmax(scale * q k^T + mask) v where query head h reads key/value head h // rep (q [B, Hq, Lq, D], k, v
    [B, Hkv, Lk, D], Hq = rep * Hkv; mask additive or boolean, broadcastable to [B, Hq, Lq, Lk]), without repeating k
    and v: each key/value head's rep query heads become rep * Lq rows of one head (rows are independent), then are
    unfolded. The mask folds the same way — a view where it is shared by the query rows (Lq = 1, or one row
    broadcast). Computed as transformers' eager attention computes it — q k^T in the inputs' dtype, scaled, masked
    and softmaxed in float32, the probabilities cast back for the product with v — which Inductor compiles into two
    batched GEMMs and one fused softmax: at decode sizes (4 folded rows x 288 keys, Llama-8B shapes, H100) 7 us a
    layer against cuDNN's fused SDPA kernel's 11.3, and 2.1 against 2.7 ms a step at batch 128."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    rows = q.reshape(B, Hkv, rep * Lq, D)
    scores = (rows @ k.transpose(-1, -2)).float() * (D ** -0.5 if scale is None else scale)
    if mask is not None:
        mask = mask.expand(B, Hq, Lq, Lk).reshape(B, Hkv, rep * Lq, Lk)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return (scores.softmax(-1).to(q.dtype) @ v).reshape(B, Hq, Lq, D)
