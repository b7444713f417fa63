"""Affine (integer) quantization: choose qparams, quantize, dequantize — torchao's conventions.

Every function is pure torch and works on the last dimension in groups of `group_size`
(group_size = K gives per-row; per-token activations are per-row of the flattened input).
Formulas (torchao `quant_primitives.py`):
  symmetric  : scale = max(-min(x,0), max(x,0)) / ((qmax - qmin) / 2),  zero = 0 (int8) / mid (unsigned)
  asymmetric : scale = (max(x,0) - min(x,0)) / (qmax - qmin),  zero = clamp(qmin - round(min(x,0)/scale))
  tinygemm   : scale = (max - min) / (qmax - qmin),  zero = min + scale * mid   (float zero-point domain)
  scale = max(scale, eps);  q = clamp(round(x * (1/scale)) + zero);  x' = (q - zero) * scale
Rounding is half-to-even (torch.round). Statistics are taken in float32 whatever the input dtype.
Non-finite values: a NaN/inf in a group makes that group's scale non-finite, so the dequantized group
(and every output that reads it) is NaN/inf, as in float; the stored integer for it is 0 / mid.
"""
from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [..., K] as [..., K // group_size, group_size] in float32."""
    K = x.shape[-1]
    if K % group_size:
        raise ValueError(f"last dimension {K} is not divisible by group_size {group_size}")
    return x.float().reshape(*x.shape[:-1], K // group_size, group_size)


def choose_qparams_symmetric(x: torch.Tensor, group_size: int, bits: int, eps: float = FP32_EPS) -> torch.Tensor:
    """Symmetric scale per group, float32 [..., K // group_size]. Zero point is implicit (0 signed)."""
    g = _grouped(x, group_size)
    qmin, qmax = int_range(bits, signed=True)
    amax = torch.maximum(-g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0))
    return (amax / ((qmax - qmin) / 2)).clamp(min=eps)


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Signed integers in [-2^(b-1), 2^(b-1)-1] as int8, shape of x."""
    g = _grouped(x, group_size)
    qmin, qmax = int_range(bits, signed=True)
    q = torch.round(g * (1.0 / scale.unsqueeze(-1))).clamp(qmin, qmax)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8).reshape(x.shape)


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    g = q.float().reshape(*q.shape[:-1], -1, group_size)
    return (g * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


def choose_qparams_asymmetric(x: torch.Tensor, group_size: int, bits: int, signed: bool,
                              eps: float = FP32_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale float32, zero int32) per group; zero is in the integer domain and 0.0 is exact."""
    g = _grouped(x, group_size)
    qmin, qmax = int_range(bits, signed)
    min_neg = g.amin(-1).clamp(max=0)
    max_pos = g.amax(-1).clamp(min=0)
    scale = ((max_pos - min_neg) / (qmax - qmin)).clamp(min=eps)
    zero = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bits: int,
                        signed: bool) -> torch.Tensor:
    g = _grouped(x, group_size)
    qmin, qmax = int_range(bits, signed)
    q = (torch.round(g * (1.0 / scale.unsqueeze(-1))) + zero.unsqueeze(-1)).clamp(qmin, qmax)
    q = torch.where(q.isnan(), zero.unsqueeze(-1).float(), q)
    return q.to(torch.int8 if signed else torch.uint8).reshape(x.shape)


def dequantize_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                          dtype: torch.dtype) -> torch.Tensor:
    g = q.float().reshape(*q.shape[:-1], -1, group_size)
    return ((g - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


# --- tinygemm float zero-point domain (torchao Int4WeightOnlyConfig) -----------------------------------

def choose_qparams_tinygemm(x: torch.Tensor, group_size: int, bits: int = 4,
                            eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scale, zero) in float32; zero = min + scale * mid (mid = 2^(b-1)), not exactly representable.
    eps defaults to the smallest normal of x's dtype, as torchao."""
    if eps is None:
        eps = torch.finfo(x.dtype).smallest_normal if x.dtype.is_floating_point else FP32_EPS
    g = _grouped(x, group_size)
    qmin, qmax = int_range(bits, signed=False)
    mn, mx = g.amin(-1), g.amax(-1)
    scale = ((mx - mn) / (qmax - qmin)).clamp(min=eps)
    mid = (qmax + qmin + 1) / 2
    return scale, mn + scale * mid


def quantize_tinygemm(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      bits: int = 4) -> torch.Tensor:
    """Unsigned integers [0, 2^b-1] as uint8: q = clamp(round((x - (zero - scale*mid)) / scale))."""
    g = _grouped(x, group_size)
    qmin, qmax = int_range(bits, signed=False)
    mid = (qmax + qmin + 1) / 2
    min_val = (zero.float() - scale.float() * mid).unsqueeze(-1)
    q = torch.round((g - min_val) / scale.float().unsqueeze(-1)).clamp(qmin, qmax)
    return torch.nan_to_num(q, nan=mid).to(torch.uint8).reshape(x.shape)


def dequantize_tinygemm(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                        dtype: torch.dtype, bits: int = 4) -> torch.Tensor:
    """x' = (q - mid) * scale + zero."""
    mid = 1 << (bits - 1)
    g = q.float().reshape(*q.shape[:-1], -1, group_size)
    out = (g - mid) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return out.reshape(q.shape).to(dtype)
