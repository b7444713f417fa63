"""A scheme's group-wise weight grid as data, so the rounding algorithms (RTN, GPTQ, HQQ) quantize onto it.

Every grid is  w' = (q - zero) * scale  per group of `group_size` along K, q an integer in [qmin, qmax]:
  zero_domain "none"  : symmetric, zero = 0, q signed (intx, float8_dynamic_int4)
  zero_domain "int"   : asymmetric, q unsigned, zero an integer in [qmin, qmax] (int8_dynamic_int4)
  zero_domain "float" : tinygemm, q unsigned, the stored zero is a value: w' = (q - mid) * scale + value_zero,
                        i.e. zero = mid - value_zero / scale (int4_weight_only)
Scales (and tinygemm's value zero) are rounded to `qparam_dtype` as the scheme stores them, so the values
GPTQ and HQQ optimise against are the ones the compiled model computes with. All math in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import affine

ZERO_DOMAINS = ("none", "int", "float")


@dataclass(frozen=True)
class AffineGrid:
    bits: int
    zero_domain: str
    qparam_dtype: torch.dtype = torch.float32
    eps: float | None = None  # None: the scheme's RTN default (affine's float32 eps / tinygemm's smallest normal)

    def __post_init__(self):
        if self.zero_domain not in ZERO_DOMAINS:
            raise ValueError(f"zero_domain must be one of {ZERO_DOMAINS}, got {self.zero_domain!r}")

    @property
    def qmin(self) -> int:
        return affine.int_range(self.bits, signed=self.zero_domain == "none")[0]

    @property
    def qmax(self) -> int:
        return affine.int_range(self.bits, signed=self.zero_domain == "none")[1]

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)

    # --- parameters per group -------------------------------------------------------------------------

    def choose_qparams(self, w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max (RTN) scale and zero per group, float32 [..., K // group_size], already representable."""
        eps = {} if self.eps is None else {"eps": self.eps}
        if self.zero_domain == "none":
            scale = affine.choose_qparams_symmetric(w, group_size, self.bits, **eps)
            zero = torch.zeros_like(scale)
        elif self.zero_domain == "int":
            scale, zero = affine.choose_qparams_asymmetric(w, group_size, self.bits, signed=False, **eps)
        else:
            scale, value_zero = affine.choose_qparams_tinygemm(w, group_size, self.bits, **eps)
            scale = scale.to(self.qparam_dtype).float()
            return scale, self.mid - value_zero.to(self.qparam_dtype).float() / scale
        return self.representable(scale, zero.float())

    def representable(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest (scale, zero) the scheme can store: scale in qparam_dtype, zero per the domain."""
        floor = affine.FP32_EPS if self.eps is None else self.eps
        scale = scale.float().clamp(min=floor).to(self.qparam_dtype).float()
        if self.zero_domain == "none":
            zero = torch.zeros_like(scale)
        elif self.zero_domain == "int":
            zero = torch.round(zero.float()).clamp(self.qmin, self.qmax)
        else:
            zero = self.mid - self.value_zero(scale, zero).float() / scale
        return scale, zero

    def value_zero(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """tinygemm's stored zero (a value, in qparam_dtype) for a float-domain zero."""
        return ((self.mid - zero.float()) * scale.float()).to(self.qparam_dtype)

    # --- elementwise (any broadcastable shapes) --------------------------------------------------------

    def quantize_values(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer-valued float32 q = clamp(round(w / scale + zero))."""
        return torch.round(w.float() / scale + zero).clamp(self.qmin, self.qmax)

    @staticmethod
    def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (q - zero) * scale

    # --- group-wise along the last dim -----------------------------------------------------------------

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
        g = affine._grouped(w, group_size)
        return self.quantize_values(g, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(w.shape)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
        g = q.float().reshape(*q.shape[:-1], -1, group_size)
        return self.dequantize_values(g, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(q.shape)

    def round_to_nearest(self, w: torch.Tensor, group_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RTN onto this grid: (q float32 integer-valued [..., K], scale, zero [..., K // group_size])."""
        scale, zero = self.choose_qparams(w, group_size)
        return self.quantize(w, scale, zero, group_size), scale, zero
