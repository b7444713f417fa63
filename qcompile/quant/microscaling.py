"""Block-scaled float formats: mxfp8 (OCP MX) and nvfp4 — emulated exactly in pure torch.

mxfp8 : blocks of 32 along K, e4m3 elements, one e8m0 scale per block (a power of two, stored as its biased
        exponent in uint8). Scale choice RCEIL (torchao's default): scale = 2^ceil(log2(amax / 448)), so no
        element saturates. amax = 0 gives the smallest scale (2^-127) and zeros.
nvfp4 : blocks of 16 along K, fp4 e2m1 elements {0, .5, 1, 1.5, 2, 3, 4, 6} with sign, one e4m3 scale per
        block and one float32 scale per tensor: tensor_scale = amax / (448 * 6); block_scale =
        e4m3(block_amax / 6 / tensor_scale); element = round_to_e2m1(x / (block_scale * tensor_scale)),
        nearest with ties to even. Two fp4 codes per byte along K, low nibble = even k (see packing.py).
"""
from __future__ import annotations

import torch

from .float8 import E4M3, E4M3_MAX, FLOAT8_EPS
from .packing import pack_along_k, unpack_along_k

MX_BLOCK = 32
NVFP4_BLOCK = 16
E8M0_BIAS = 127
FP4_MAX = 6.0
# e2m1 magnitudes indexed by the 3 low bits of the code; bit 3 is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    K = x.shape[-1]
    if K % block:
        raise ValueError(f"last dimension {K} is not divisible by the block size {block}")
    return x.float().reshape(*x.shape[:-1], K // block, block)


# --- mxfp8 ----------------------------------------------------------------------------------------------

def quantize_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], e8m0 exponents uint8 [..., K/32])."""
    b = _blocks(x, MX_BLOCK)
    amax = b.abs().amax(-1)
    exp = torch.ceil(torch.log2(amax / E4M3_MAX))
    exp = torch.where(amax == 0, torch.full_like(exp, -E8M0_BIAS), exp)
    exp = torch.nan_to_num(exp, nan=E8M0_BIAS + 1.0, posinf=E8M0_BIAS + 1.0).clamp(-E8M0_BIAS, E8M0_BIAS + 1)
    scale = torch.exp2(exp)
    # exponent 128 (biased 255) is e8m0's NaN: a block holding NaN/inf keeps a NaN scale
    scale = torch.where(exp > E8M0_BIAS, torch.full_like(scale, float("nan")), scale)
    q = (b / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).reshape(x.shape)
    return q, (exp + E8M0_BIAS).to(torch.uint8)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    f = torch.exp2(e.float() - E8M0_BIAS)
    return torch.where(e == 255, torch.full_like(f, float("nan")), f)


def dequantize_mxfp8(q: torch.Tensor, scale_e8m0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = q.float().reshape(*q.shape[:-1], -1, MX_BLOCK)
    return (b * e8m0_to_float(scale_e8m0).unsqueeze(-1)).reshape(q.shape).to(dtype)


# --- nvfp4 ----------------------------------------------------------------------------------------------

def _fp4_grid(device) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, device=device)


def float_to_fp4_code(v: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest e2m1 value (ties to the even code; |v| saturates at 6; NaN -> 0), return
    4-bit codes (uint8). Elementwise comparisons with the midpoints between neighbours (not a bucketize: Inductor
    fuses these into the surrounding kernel, where bucketize stayed a separate op and took a third of an nvfp4
    forward on CPU)."""
    mag = v.abs().clamp(max=FP4_MAX)
    idx = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    for i, (low, high) in enumerate(zip(FP4_VALUES[:-1], FP4_VALUES[1:])):
        mid = (low + high) / 2
        # above the midpoint: the upper neighbour; on it: the even code of the two (the upper one when i is odd)
        idx = idx + ((mag > mid) | ((mag == mid) & (i % 2 == 1))).to(torch.int32)
    sign = ((v < 0) & (idx > 0)).to(torch.int32) << 3
    return (idx | sign).to(torch.uint8)


def fp4_code_to_float(c: torch.Tensor) -> torch.Tensor:
    grid = _fp4_grid(c.device)
    mag = grid[(c & 7).long()]
    return torch.where((c & 8) != 0, -mag, mag)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    return (x.float().abs().amax() / (E4M3_MAX * FP4_MAX)).clamp(min=FLOAT8_EPS)


def quantize_nvfp4(x: torch.Tensor, tensor_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed codes uint8 [..., K/2], e4m3 block scales [..., K/16], float32 tensor scale [])."""
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(x)
    b = _blocks(x, NVFP4_BLOCK)
    block_amax = b.abs().amax(-1)
    block_scale = (block_amax / FP4_MAX / tensor_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    total = block_scale.float() * tensor_scale
    # a zero block scale (all-zero block, or underflow to e4m3 zero) gives zeros, not 0/0
    safe = torch.where(total == 0, torch.ones_like(total), total)
    codes = float_to_fp4_code(b / safe.unsqueeze(-1)).reshape(x.shape)
    return pack_along_k(codes, 4), block_scale, tensor_scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    K = packed.shape[-1] * 2
    v = fp4_code_to_float(unpack_along_k(packed, 4, K)).reshape(*packed.shape[:-1], -1, NVFP4_BLOCK)
    out = v * (block_scale.float() * tensor_scale.float()).unsqueeze(-1)
    return out.reshape(*packed.shape[:-1], K).to(dtype)
