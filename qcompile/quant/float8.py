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


def choose_scale_float8(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 scale: [..., 1] for "row" (one per row of the last dim), [] for "tensor"."""
    a = x.abs()
    amax = a.amax(-1, keepdim=True) if granularity == "row" else a.amax()
    return (amax / E4M3_MAX).float().clamp(min=FLOAT8_EPS)  # the division in x's dtype: torchao's rounding


def quantize_float8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize_float8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)
