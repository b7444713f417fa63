"""float8 e4m3 quantization with float32 scales (torchao `_choose_scale_float8` / `_quantize_affine_float8`).

  scale = amax / 448 per block (row of the last dim, or the whole tensor), computed in x's dtype as torchao does
  (for a bf16 x the scale is a bf16 value, stored as float32);  q = clamp(x / scale, ±448) -> e4m3
Deviation from torchao: scale = max(scale, eps) with eps = 1e-12 (torchao's training recipe's EPS). torchao's
inference path has no eps, so an all-zero row divides by zero and gives NaN; here it gives zeros.
The clamp makes the cast saturate on every torch version (eager casts did not saturate before 2.12).
"""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
FLOAT8_EPS = 1e-12


def round_to_dtype(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `v` rounded to the nearest `dtype` value (bfloat16 / float16, ties to even: what `v.to(dtype)`
    gives, subnormals, overflow to inf and NaN included), returned in float32. In integer and power-of-two ops
    because Inductor computes low-precision intermediates in float32 and drops a `.to(dtype).float()` round
    trip: the compiled float8 activation scale was the unrounded ratio, a different grid from the reference's."""
    if dtype == torch.float32:
        return v
    bits = v.view(torch.int32)
    if dtype == torch.bfloat16:  # bf16 is float32's high half: round the low 16 bits off, carrying upward
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).view(torch.float32)
        return torch.where(v.isnan(), v, rounded)
    if dtype != torch.float16:
        raise ValueError(f"round_to_dtype takes bfloat16, float16 or float32, not {dtype}")
    # float16: 10 mantissa bits below the exponent, which stops at -14 (smaller values are subnormal, quantum
    # 2^-24); v / quantum and back are exact, torch.round ties to even
    exponent_field = ((bits >> 23) & 0xFF).clamp(min=127 - 14)
    quantum = ((exponent_field - 10) << 23).view(torch.float32)
    rounded = torch.round(v / quantum) * quantum
    return torch.where(rounded.abs() > torch.finfo(torch.float16).max, rounded * float("inf"), rounded)


def choose_scale_float8(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 scale: [..., 1] for "row" (one per row of the last dim), [] for "tensor"."""
    a = x.abs()
    amax = a.amax(-1, keepdim=True) if granularity == "row" else a.amax()
    # the division rounded to x's dtype, as torchao divides in it (explicitly: see round_to_dtype)
    return round_to_dtype(amax.float() / E4M3_MAX, x.dtype).clamp(min=FLOAT8_EPS)


def quantize_float8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize_float8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)
